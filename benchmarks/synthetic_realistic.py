"""The paper's claims at a realistic width: a K sweep beside the authors' GPT-2 figures.

    python benchmarks/synthetic_realistic.py                      # everything below
    python benchmarks/synthetic_realistic.py --study sweep        # K sweep, 3 seeds at K=8
    python benchmarks/synthetic_realistic.py --study ablations    # Scale e=2 / Switch, K=8
    python benchmarks/synthetic_realistic.py --study tokens       # has the curve settled?
    python benchmarks/synthetic_realistic.py --plot-only          # tables and plots again

Size `realistic` (`benchmarks/synthetic.py`): 1536 true features in 96 dimensions,
d_sae 1536, N 8 experts of 192 latents. Every variant of one seed trains on the
same recorded token stream (`saelens_moe.ground_truth.record_stream`). Each trained
SAE is scored as in `benchmarks/synthetic.py`, plus `redundancy_breakdown`:
redundancy over live latents only, by pair kind (live-live, live-dead, dead-dead),
intra / inter expert, and on the high-pass decoder (each row minus its expert's
mean row). Results are appended to `results/synthetic_realistic.json` after every
SAE, so an interrupted run keeps what it finished; `results/synthetic_realistic.md`
and the `results/synthetic_realistic_*.png` plots are written from that file.
"""

import argparse
import fcntl
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from sae_lens.saes.sae import TrainingSAE
from sae_lens.synthetic import SyntheticModel

from saelens_moe.ground_truth import (
    BenchmarkSize,
    Variant,
    evaluate_variant,
    record_stream,
    synthetic_model_config,
    torch_threads,
    train_variant,
)
from saelens_moe.metrics import highpass_decoder
from saelens_moe.presets import paper_setting

REALISTIC = BenchmarkSize(
    "realistic", 1536, 96, 1536, 8, 8, 500_000, 1024, 50_000, 64, 4, lr=1e-3
)
"""1536 true features in 96 dims, d_sae 1536, N 8; tokens set by calibration."""
K_VALUES = (2, 4, 8, 16, 32)
EXTRA_SEEDS_AT_K8 = (1, 2)
RESULTS = Path(__file__).parent / "results"
JSON_PATH = RESULTS / "synthetic_realistic.json"
MD_PATH = RESULTS / "synthetic_realistic.md"
THRESHOLDS = (0.8, 0.9)
COLORS = {
    "topk": "C4",
    "switch": "C3",
    "scale e=2": "C0",
    "scale e=4": "C1",
    "scale e=8": "C2",
}

# The authors' GPT-2 small figure data (../shared/design/scale-sae.md): d_sae 24576, N 64.
AUTHORS_MSE: dict[str, dict[int, float]] = {
    "scale e=2": {8: 2359.5, 32: 1303.8, 128: 825.8},
    "scale e=4": {8: 2556.6, 32: 1344.4, 128: 846.9},
    "scale e=8": {8: 2668.2, 32: 1446.1, 128: 882.0},
    "switch": {8: 2908.5, 32: 2076.5, 128: 1446.7},
    "topk": {8: 3083.8, 32: 2240.8, 128: 1437.1},
}
AUTHORS_REDUNDANCY_09: dict[str, dict[int, float]] = {
    "switch": {2: 0.1199, 8: 0.0493, 32: 0.0077},
    "scale e=2": {2: 0.00033, 8: 0.00346, 32: 0.00505},
    "scale e=8": {2: 0.00024, 8: 0.00008, 32: 0.00073},
}


def sweep_variants() -> list[Variant]:
    """TopK at equal width, Switch, Scale e = 2, 4, 8; package defaults throughout."""
    return [
        Variant("topk", "topk"),
        Variant("switch", "switch"),
        *(Variant(f"scale e={e}", "scale", {"n_active_experts": e}) for e in (2, 4, 8)),
    ]


def ablation_variants() -> list[Variant]:
    """Scale e=2 (and Switch, TopK) with one way our defaults differ from the authors'."""
    e2: dict[str, Any] = {"n_active_experts": 2}
    steps = REALISTIC.training_samples // REALISTIC.batch_size
    paper = paper_setting(steps, REALISTIC.d_sae)
    scale_rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("scale e=2 (defaults)", e2, {}),
        ("auxk off", {**e2, "aux_loss_coefficient": 0.0}, {}),
        ("window None (SAELens 1000)", {**e2, "dead_latent_window": None}, {}),
        ("window 20", {**e2, "dead_latent_window": 20}, {}),
        ("window 500", {**e2, "dead_latent_window": 500}, {}),
        ("lb=0.01", {**e2, "load_balancing_coefficient": 0.01}, {}),
        ("lb=0.3", {**e2, "load_balancing_coefficient": 0.3}, {}),
        ("lb=0", {**e2, "load_balancing_coefficient": 0.0}, {}),
        (
            "no decoder-norm rescaling",
            {**e2, "rescale_acts_by_decoder_norm": False},
            {},
        ),
        ("decoder_init_norm 1", {**e2, "decoder_init_norm": 1.0}, {}),
        ("lr decay last 20%", e2, {"lr_decay_steps": steps // 5}),
        (
            "scale e=4 decoder_init_norm 1",
            {"n_active_experts": 4, "decoder_init_norm": 1.0},
            {},
        ),
        ("paper_setting", {**e2, **paper.sae}, paper.runner),
        ("lr 3e-4", e2, {"lr": 3e-4}),
        ("weighting=uniform", {**e2, "expert_weighting": "uniform"}, {}),
        ("weighting=renormalized", {**e2, "expert_weighting": "renormalized"}, {}),
        (
            "scale e=8 decoder_init_norm 1",
            {"n_active_experts": 8, "decoder_init_norm": 1.0},
            {},
        ),
    ]
    variants = [
        Variant(name, "scale", options, runner) for name, options, runner in scale_rows
    ]
    others = [
        Variant("switch decoder_init_norm 1", "switch", {"decoder_init_norm": 1.0}),
        Variant("topk decoder_init_norm 1", "topk", {"decoder_init_norm": 1.0}),
        Variant("topk window 100", "topk", runner_options={"dead_feature_window": 100}),
        Variant("switch auxk off", "switch", {"aux_loss_coefficient": 0.0}),
        Variant("switch paper_setting", "switch", {**paper.sae}, paper.runner),
        Variant("switch window None", "switch", {"dead_latent_window": None}),
        Variant("switch lb=0.01", "switch", {"load_balancing_coefficient": 0.01}),
    ]
    # the first eleven Scale rows ran first; the rest in order of what they can decide
    return [*variants[:12], *others[:3], *variants[12:], *others[3:]]


# ----------------------------------------------------------------------- redundancy


@torch.no_grad()
def firing_counts(
    sae: TrainingSAE[Any], model: SyntheticModel, n_samples: int, seed: int
) -> torch.Tensor:
    """How often each latent fires on fresh synthetic tokens. [d_sae]"""
    torch.manual_seed(seed)
    counts = torch.zeros(sae.cfg.d_sae)
    for _ in range(n_samples // 10_000):
        counts += (sae.encode(model.sample(10_000)) > 0).sum(dim=0).float()
    return counts


@torch.no_grad()
def _best_partners(
    rows: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the largest cosine with another allowed row and that row's index."""
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    sims = unit @ unit.T
    sims.fill_diagonal_(float("-inf"))
    sims[:, ~allowed] = float("-inf")
    best = sims.max(dim=-1)
    return best.values, best.indices


def redundancy_breakdown(
    W_dec: torch.Tensor, n_experts: int, live: torch.Tensor
) -> dict[str, float]:
    """Redundancy over all and live latents, by pair kind, intra/inter, high-pass."""
    d_sae = W_dec.shape[0]
    all_rows = torch.ones(d_sae, dtype=torch.bool)
    expert = torch.arange(d_sae) // (d_sae // n_experts)
    out: dict[str, float] = {"n_live": float(live.sum())}
    for name, rows in (
        ("raw", W_dec.detach().float()),
        ("highpass", highpass_decoder(W_dec.detach().float(), n_experts)),
    ):
        best, partner = _best_partners(rows, all_rows)
        best_live, _ = _best_partners(rows, live)
        same = expert[partner] == expert
        for tau in THRESHOLDS:
            above = best > tau
            out[f"{name}/all/{tau}"] = above.float().mean().item()
            out[f"{name}/live/{tau}"] = (
                (best_live[live] > tau).float().mean().item() if live.any() else 0.0
            )
            out[f"{name}/intra/{tau}"] = (above & same).float().mean().item()
            out[f"{name}/inter/{tau}"] = (above & ~same).float().mean().item()
            if name == "raw":
                partner_live = live[partner]
                kinds = {
                    "live-live": live & partner_live,
                    "live-dead": live ^ partner_live,
                    "dead-dead": ~live & ~partner_live,
                }
                for kind, mask in kinds.items():
                    out[f"pairs/{kind}/{tau}"] = (above & mask).float().mean().item()
    return out


# -------------------------------------------------------------------------- running


def _load() -> list[dict[str, Any]]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []


def _append(entry: dict[str, Any]) -> None:
    """Add one result; a lock lets several studies run side by side."""
    with (Path(tempfile.gettempdir()) / "synthetic_realistic.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _load()
        entries.append(entry)
        temporary = JSON_PATH.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(JSON_PATH)


def _done(study: str, name: str, k: int, seed: int, tokens: int) -> bool:
    return any(
        e["study"] == study
        and e["name"] == name
        and e["k"] == k
        and e["seed"] == seed
        and e["tokens"] == tokens
        for e in _load()
    )


def run_points(
    study: str,
    variants: Sequence[Variant],
    k_values: Sequence[int],
    seed: int,
    size: BenchmarkSize,
) -> None:
    """Train and score each variant at each K on one recorded stream; append results."""
    todo = [
        (k, v)
        for k in k_values
        for v in variants
        if not _done(study, v.name, k, seed, size.training_samples)
    ]
    if not todo:
        return
    model = SyntheticModel(synthetic_model_config(size, seed))
    start = time.perf_counter()
    stream = record_stream(model, size, seed)
    print(f"recorded {stream.shape[0]} tokens in {time.perf_counter() - start:.0f} s")
    for k, variant in todo:
        sized = replace(size, k=k)
        sae, seconds = train_variant(variant, sized, model, seed, None, stream)
        result = evaluate_variant(variant, sae, model, sized, seconds, seed)
        live = firing_counts(sae, model, sized.eval_samples, seed + 4) > 0
        n_experts = result.n_experts
        entry = {
            "study": study,
            "name": variant.name,
            "k": k,
            "seed": seed,
            "tokens": size.training_samples,
            "options": variant.options,
            "runner_options": variant.runner_options,
            **{key: val for key, val in asdict(result).items() if key != "metrics"},
            "breakdown": redundancy_breakdown(sae.W_dec, n_experts, live),
            "metrics": result.metrics,
        }
        _append(entry)
        print(
            f"{study} K={k} seed={seed} {variant.name}: EV {result.explained_variance:.3f} "
            f"MCC {result.mcc:.3f} dead {result.dead_latents} red0.8 "
            f"{result.redundancy_08:.3f} red0.9 {result.redundancy_09:.3f} "
            f"train {seconds:.0f} s",
            flush=True,
        )


STUDIES: dict[str, Callable[[BenchmarkSize], None]] = {}


def sweep(size: BenchmarkSize) -> None:
    """K in 2..32 at seed 0, then seeds 1 and 2 at K=8."""
    run_points("sweep", sweep_variants(), (8, 2, 32, 4, 16), 0, size)
    for seed in EXTRA_SEEDS_AT_K8:
        run_points("sweep", sweep_variants(), (8,), seed, size)


def ablations(size: BenchmarkSize) -> None:
    """One change at a time at K=8, seed 0."""
    run_points("ablations", ablation_variants(), (8,), 0, size)


def tokens(size: BenchmarkSize) -> None:
    """Scale e=2 and TopK at K=8 for several token counts: has the curve settled?"""
    variants = [v for v in sweep_variants() if v.name in ("topk", "scale e=2")]
    for n in (250_000, 2 * size.training_samples):
        run_points("tokens", variants, (8,), 0, replace(size, training_samples=n))


def longer(size: BenchmarkSize) -> None:
    """Switch and Scale e=2 at twice the tokens, where duplicates have had time to form."""
    old_init = {"decoder_init_norm": 0.1}
    variants = [
        Variant("switch (init 0.1)", "switch", old_init),
        Variant("switch", "switch"),
        Variant("scale e=2", "scale", {"n_active_experts": 2}),
        Variant("topk (init 1)", "topk", {"decoder_init_norm": 1.0}),
    ]
    run_points("longer", variants, (8,), 0, replace(size, training_samples=1_000_000))


STUDIES.update(sweep=sweep, ablations=ablations, tokens=tokens, longer=longer)


# --------------------------------------------------------------------------- output


def _mean(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _rows(study: str, tokens_: int | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in _load()
        if e["study"] == study and (tokens_ is None or e["tokens"] == tokens_)
    ]


def _by(entries: Sequence[dict[str, Any]], name: str, k: int) -> list[dict[str, Any]]:
    return [e for e in entries if e["name"] == name and e["k"] == k]


def _relative_change(ours: float, base: float) -> str:
    return "-" if base == 0 else f"{100 * (1 - ours / base):+.0f}%"


def sweep_tables(entries: Sequence[dict[str, Any]]) -> str:
    """FVU, redundancy and dead latents per K; Scale's improvement over Switch."""
    names = [v.name for v in sweep_variants()]
    lines = [
        "| K | variant | FVU | MCC | red>0.8 | red>0.9 | live-only red>0.8 | "
        "high-pass red>0.8 | dead | seeds |",
        "|" + " --- |" * 10,
    ]
    for k in K_VALUES:
        for name in names:
            rows = _by(entries, name, k)
            if not rows:
                continue
            b = [r["breakdown"] for r in rows]
            lines.append(
                f"| {k} | {name} | {_mean([1 - r['explained_variance'] for r in rows])} "
                f"| {_mean([r['mcc'] for r in rows])} "
                f"| {_mean([r['redundancy_08'] for r in rows])} "
                f"| {_mean([r['redundancy_09'] for r in rows])} "
                f"| {_mean([x['raw/live/0.8'] for x in b])} "
                f"| {_mean([x['highpass/all/0.8'] for x in b])} "
                f"| {_mean([float(r['dead_latents']) for r in rows])} | {len(rows)} |"
            )
    lines += ["", improvement_table(entries)]
    return "\n".join(lines)


def improvement_table(entries: Sequence[dict[str, Any]]) -> str:
    """Scale's relative improvement over Switch per K, ours beside the authors'."""
    lines = [
        "| K | e | FVU/MSE cut, ours | MSE cut, authors | red>0.9 cut, ours "
        "| red>0.9 cut, authors | red>0.8 cut, ours |",
        "|" + " --- |" * 7,
    ]
    for k in sorted({*K_VALUES, 128}):
        for e in (2, 4, 8):
            name = f"scale e={e}"
            ours, switch = _by(entries, name, k), _by(entries, "switch", k)
            if ours and switch:
                fvu = _relative_change(
                    statistics.mean(1 - r["explained_variance"] for r in ours),
                    statistics.mean(1 - r["explained_variance"] for r in switch),
                )
                red9 = _relative_change(
                    statistics.mean(r["redundancy_09"] for r in ours),
                    statistics.mean(r["redundancy_09"] for r in switch),
                )
                red8 = _relative_change(
                    statistics.mean(r["redundancy_08"] for r in ours),
                    statistics.mean(r["redundancy_08"] for r in switch),
                )
            else:
                fvu = red9 = red8 = "-"
            their_mse = AUTHORS_MSE[name].get(k)
            their_red = AUTHORS_REDUNDANCY_09.get(name, {}).get(k)
            mse = (
                "-"
                if their_mse is None
                else _relative_change(their_mse, AUTHORS_MSE["switch"][k])
            )
            red = (
                "-"
                if their_red is None
                else _relative_change(their_red, AUTHORS_REDUNDANCY_09["switch"][k])
            )
            if {fvu, mse, red} != {"-"}:
                lines.append(f"| {k} | {e} | {fvu} | {mse} | {red9} | {red} | {red8} |")
    return "\n".join(lines)


def detail_table(entries: Sequence[dict[str, Any]]) -> str:
    """Redundancy split by pair kind, expert and decoder, with dead latents."""
    lines = [
        "| K | variant | seed | EV | MCC | dead | live | red>0.8 | red>0.9 "
        "| live-only 0.8 / 0.9 | live-live / live-dead / dead-dead (0.8) "
        "| intra / inter (0.8) | high-pass 0.8 / 0.9 | load entropy | purity (chance) "
        "| train s |",
        "|" + " --- |" * 16,
    ]
    for r in entries:
        b = r["breakdown"]
        purity = (
            "-"
            if r["purity"] is None
            else f"{r['purity']:.3f} ({r['chance_purity']:.3f})"
        )
        entropy = r["expert_load_entropy"]
        lines.append(
            f"| {r['k']} | {r['name']} | {r['seed']} | {r['explained_variance']:.3f} "
            f"| {r['mcc']:.3f} | {r['dead_latents']} | {b['n_live']:.0f} "
            f"| {r['redundancy_08']:.3f} | {r['redundancy_09']:.3f} "
            f"| {b['raw/live/0.8']:.3f} / {b['raw/live/0.9']:.3f} "
            f"| {b['pairs/live-live/0.8']:.3f} / {b['pairs/live-dead/0.8']:.3f} / "
            f"{b['pairs/dead-dead/0.8']:.3f} "
            f"| {b['raw/intra/0.8']:.3f} / {b['raw/inter/0.8']:.3f} "
            f"| {b['highpass/all/0.8']:.3f} / {b['highpass/all/0.9']:.3f} "
            f"| {'-' if entropy is None else f'{entropy:.3f}'} | {purity} "
            f"| {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot_sweep(entries: Sequence[dict[str, Any]], path: Path) -> Path:
    """Ours (FVU, redundancy 0.8 and 0.9 vs K) over the authors' (MSE, redundancy 0.9)."""
    names = [v.name for v in sweep_variants()]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    metrics: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("FVU (1 - EV)", lambda r: 1 - r["explained_variance"]),
        ("redundancy, cos > 0.8", lambda r: r["redundancy_08"]),
        ("redundancy, cos > 0.9", lambda r: r["redundancy_09"]),
    ]
    for axis, (label, value) in zip(axes[0], metrics, strict=True):
        for name in names:
            ks = [k for k in K_VALUES if _by(entries, name, k)]
            ys = [statistics.mean(value(r) for r in _by(entries, name, k)) for k in ks]
            axis.plot(ks, ys, marker="o", label=name, color=COLORS[name])
        axis.set(
            xscale="log", xlabel="K", ylabel=label, title=f"ours (synthetic): {label}"
        )
        axis.set_xticks(K_VALUES, [str(k) for k in K_VALUES])
        axis.minorticks_off()
    axes[0][0].legend()
    for name, points in AUTHORS_MSE.items():
        axes[1][0].plot(
            list(points),
            list(points.values()),
            marker="s",
            label=name,
            color=COLORS[name],
        )
    axes[1][0].set(
        xscale="log", xlabel="K", ylabel="MSE", title="authors (GPT-2 L8): MSE"
    )
    for name, points in AUTHORS_REDUNDANCY_09.items():
        axes[1][2].plot(
            list(points),
            list(points.values()),
            marker="s",
            label=name,
            color=COLORS[name],
        )
    axes[1][2].set(
        xscale="log",
        xlabel="K",
        ylabel="redundancy",
        title="authors (GPT-2 L8): redundancy (labelled 0.9)",
    )
    for axis in (axes[1][0], axes[1][2]):
        ticks = (2, 8, 32, 128)
        axis.set_xticks(ticks, [str(k) for k in ticks])
        axis.minorticks_off()
    axes[1][0].legend()
    axes[1][2].legend()
    axes[1][1].axis("off")
    axes[1][1].text(
        0.0,
        0.5,
        "Authors: d_sae 24576, N 64, ~82M tokens,\n"
        "no AuxK, MSE summed over 768 dims.\n"
        "Ours: d_sae 1536, N 8, synthetic\n"
        "ground truth (1536 features, d 96).",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report() -> None:
    """synthetic_realistic.md and the plots, from the JSON so far."""
    parts = [
        "# Synthetic, realistic size (written by benchmarks/synthetic_realistic.py)"
    ]
    sweep_rows = _rows("sweep", REALISTIC.training_samples)
    if sweep_rows:
        parts += ["## K sweep", sweep_tables(sweep_rows), "", detail_table(sweep_rows)]
        plot_sweep(sweep_rows, RESULTS / "synthetic_realistic_k_sweep.png")
    ablation_rows = _rows("ablations")
    if ablation_rows:
        parts += ["## Ablations (K=8, seed 0)", detail_table(ablation_rows)]
    token_rows = [
        r
        for r in _load()
        if r["study"] in ("tokens", "sweep")
        and r["k"] == 8
        and r["seed"] == 0
        and r["name"] in ("topk", "scale e=2")
    ]
    if token_rows:
        token_rows.sort(key=lambda r: (r["name"], r["tokens"]))
        parts += ["## Tokens (K=8, seed 0)", _token_table(token_rows)]
    longer_rows = _rows("longer") + [
        r for r in _rows("tokens", 1_000_000) if r["name"] == "scale e=2"
    ]
    if longer_rows:
        parts += ["## 1M tokens (K=8, seed 0)", detail_table(longer_rows)]
    extra = _rows("moex")  # measured with an experimental router, since removed
    if extra:
        parts += ["## MoE-X routing (K=8, seed 0; code removed)", detail_table(extra)]
    MD_PATH.write_text("\n\n".join(parts) + "\n")


def _token_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| variant | tokens | EV | MCC | dead | red>0.8 | red>0.9 |",
        "|" + " --- |" * 7,
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tokens']:,} | {r['explained_variance']:.3f} "
            f"| {r['mcc']:.3f} | {r['dead_latents']} | {r['redundancy_08']:.3f} "
            f"| {r['redundancy_09']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen studies (skipping points already in the JSON), then report."""
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        studies = list(STUDIES) if args.study == "all" else [args.study]
        with torch_threads(args.threads):
            for study in studies:
                STUDIES[study](REALISTIC)
                write_report()
    write_report()


if __name__ == "__main__":
    main()
