"""The paper's claims at a realistic width: a K sweep beside the authors' GPT-2 figures.

    python benchmarks/synthetic_realistic.py                      # everything below
    python benchmarks/synthetic_realistic.py --study sweep        # K sweep, 3 seeds at K=8
    python benchmarks/synthetic_realistic.py --study tokens       # has the curve settled?
    python benchmarks/synthetic_realistic.py --study ablations    # Scale e=2 / Switch, K=8
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
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.synthetic import SyntheticModel
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from saelens_moe.ground_truth import (
    BenchmarkSize,
    Variant,
    evaluate_variant,
    record_stream,
    synthetic_model_config,
    torch_threads,
    train_variant,
)
from saelens_moe.lazy_adam import DENSE_STEP_FRACTION, LazyAdam
from saelens_moe.metrics import highpass_decoder
from saelens_moe.presets import paper_lr, paper_setting

REALISTIC = BenchmarkSize(
    "realistic", 1536, 96, 1536, 8, 8, 1_000_000, 1024, 50_000, 64, 4, lr=1e-3
)
"""1536 true features in 96 dims, d_sae 1536, N 8; tokens chosen by the tokens study."""
TOKEN_COUNTS = (250_000, 500_000, 1_000_000, 2_000_000, 4_000_000)
LONG_TOKENS = 4_000_000
"""Where duplicates have formed in Switch: the redundancy sweep's tokens."""
ABLATION_TOKENS = 2_000_000
"""Twice the sweep's tokens: where duplicates have formed (see the tokens study)."""
DEAD_SPELL_STEPS = 100
"""Steps without firing that make a latent count as dead during training: our
`dead_latent_window` default, after which AuxK starts to pull on it."""
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
    steps = ABLATION_TOKENS // REALISTIC.batch_size
    paper = paper_setting(steps, REALISTIC.d_sae)
    no_rescaling = {"rescale_acts_by_decoder_norm": False}
    scale_rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("feature scaling off", {**e2, "feature_scaling": False}, {}),
        ("auxk off", {**e2, "aux_loss_coefficient": 0.0}, {}),
        ("window None (SAELens 1000)", {**e2, "dead_latent_window": None}, {}),
        (DICTIONARY_LEARNING_INIT, e2, {}),
        (COLUMN_NORMALISED, {**e2, **no_rescaling}, {}),
        ("no decoder-norm rescaling", {**e2, **no_rescaling}, {}),
        ("decoder_init_norm 0.1", {**e2, "decoder_init_norm": 0.1}, {}),
        ("lb=0.01", {**e2, "load_balancing_coefficient": 0.01}, {}),
        ("lb=0", {**e2, "load_balancing_coefficient": 0.0}, {}),
        ("lr decay last 20%", e2, {"lr_decay_steps": steps // 5}),
        (
            f"lr {paper_lr(REALISTIC.d_sae):.2g} (authors' rule)",
            e2,
            {"lr": paper.runner["lr"]},
        ),
        ("paper_setting", {**e2, **paper.sae}, paper.runner),
        ("weighting=uniform", {**e2, "expert_weighting": "uniform"}, {}),
        ("weighting=renormalized", {**e2, "expert_weighting": "renormalized"}, {}),
        ("window 20", {**e2, "dead_latent_window": 20}, {}),
    ]
    others = [
        Variant("switch auxk off", "switch", {"aux_loss_coefficient": 0.0}),
        Variant("switch paper_setting", "switch", {**paper.sae}, paper.runner),
        Variant("switch lb=0.01", "switch", {"load_balancing_coefficient": 0.01}),
        Variant(f"switch {DICTIONARY_LEARNING_INIT}", "switch"),
        Variant(f"switch {COLUMN_NORMALISED}", "switch", no_rescaling),
        Variant("topk window 100", "topk", runner_options={"dead_feature_window": 100}),
    ]
    return [
        *(
            Variant(name, "scale", options, runner)
            for name, options, runner in scale_rows
        ),
        *others,
    ]


# ------------------------------------------------------------- initialisation, revival

DICTIONARY_LEARNING_INIT = "dictionary_learning init"
COLUMN_NORMALISED = "decoder columns unit-norm each step"


@torch.no_grad()
def geometric_median(points: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """The point with the least summed distance to `points` (Weiszfeld). [d_in]"""
    median = points.mean(dim=0)
    for _ in range(steps):
        weights = 1 / (points - median).norm(dim=-1).clamp(min=1e-8)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


@torch.no_grad()
def dictionary_learning_init(sae: TrainingSAE[Any], stream: torch.Tensor) -> None:
    """The initialisation of `dictionary_learning`, the Switch SAE authors' codebase.

    Encoder like `nn.Linear`'s default (uniform in +-1/sqrt(d_in), columns of norm
    about 0.58), decoder rows its unit-normalised columns, b_enc 0 and b_dec the
    geometric median of the first batch. The Scale SAE authors' code was not
    available to read; the paper's Switch baseline comes from this codebase.
    """
    bound = sae.cfg.d_in**-0.5
    sae.W_enc.uniform_(-bound, bound)
    sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=-1, keepdim=True))
    sae.get_parameter("b_enc").zero_()
    sae.b_dec.copy_(geometric_median(stream[: REALISTIC.batch_size]))


def normalise_decoder_columns(sae: TrainingSAE[Any], _stream: torch.Tensor) -> None:
    """Before every step, give each decoder column (not row) unit norm.

    The design notes say the authors' code normalises the decoder along the wrong
    axis; this measures what that does (with `rescale_acts_by_decoder_norm=False`).
    """
    step = sae.training_forward_pass

    def normalised_step(step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=0, keepdim=True))
        return step(step_input)

    setattr(sae, "training_forward_pass", normalised_step)  # noqa: B010


PREPARATIONS: dict[str, Callable[[TrainingSAE[Any], torch.Tensor], None]] = {
    DICTIONARY_LEARNING_INIT: dictionary_learning_init,
    f"switch {DICTIONARY_LEARNING_INIT}": dictionary_learning_init,
    COLUMN_NORMALISED: normalise_decoder_columns,
    f"switch {COLUMN_NORMALISED}": normalise_decoder_columns,
}
"""Ablations that change the SAE itself, by variant name."""


class DeadSpells:
    """Latents that went `DEAD_SPELL_STEPS` training steps without firing at some point.

    A latent live at the end that had such a spell was revived (by AuxK, or by the
    drift of the others); `redundancy_breakdown` counts its duplicates apart.
    """

    def __init__(self) -> None:
        self.ever_dead = torch.zeros(0, dtype=torch.bool)

    def watch(self, sae: TrainingSAE[Any]) -> None:
        """Count, after every training step of `sae`, which latents fired."""
        steps_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        self.ever_dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        step = sae.training_forward_pass

        def observed_step(step_input: TrainStepInput) -> TrainStepOutput:
            output = step(step_input)
            acts = output.feature_acts
            dense = acts if acts.layout == torch.strided else acts.to_dense()
            fired = (dense > 0).any(dim=0).cpu()
            steps_since_fired.copy_(torch.where(fired, 0, steps_since_fired + 1))
            self.ever_dead |= steps_since_fired >= DEAD_SPELL_STEPS
            return output

        setattr(sae, "training_forward_pass", observed_step)  # noqa: B010


# ----------------------------------------------------------------------- redundancy


@torch.no_grad()
def firing(
    sae: TrainingSAE[Any], model: SyntheticModel, n_samples: int, seed: int
) -> torch.Tensor:
    """Which latents fire on each of `n_samples` fresh synthetic tokens. [tokens, d_sae]"""
    torch.manual_seed(seed)
    batches = [model.sample(10_000) for _ in range(n_samples // 10_000)]
    return torch.cat([sae.encode(batch) > 0 for batch in batches])


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
    W_dec: torch.Tensor,
    n_experts: int,
    live: torch.Tensor,
    revived: torch.Tensor | None = None,
) -> dict[str, float]:
    """Redundancy over all and live latents, by pair kind, intra/inter, high-pass.

    `revived` (live latents that had a dead spell in training) adds the share of
    latents whose duplicate pair involves a revived latent.
    """
    d_sae = W_dec.shape[0]
    all_rows = torch.ones(d_sae, dtype=torch.bool)
    expert = torch.arange(d_sae) // (d_sae // n_experts)
    out: dict[str, float] = {"n_live": float(live.sum())}
    if revived is not None:
        out["n_revived"] = float(revived.sum())
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
                if revived is not None:
                    kinds["revived"] = revived | revived[partner]
                for kind, mask in kinds.items():
                    out[f"pairs/{kind}/{tau}"] = (above & mask).float().mean().item()
    return out


@torch.no_grad()
def duplicated_features(
    W_dec: torch.Tensor, model: SyntheticModel, fires: torch.Tensor
) -> dict[str, float]:
    """What the duplicated latents (cos > 0.8) are: which true features, how common,
    how close to them, and whether the two of a pair fire on the same tokens.

    Each latent is matched to the true feature nearest its decoder row (cosine);
    features are ranked by firing probability (rank 0 fires most often). `fires`:
    `firing` on fresh tokens. co_firing = tokens where both latents of a duplicate
    pair fire / tokens where either does (0: they split the tokens between them).
    """
    rows = W_dec.detach().float()
    unit_rows = rows / rows.norm(dim=-1, keepdim=True)
    features = model.feature_dict.feature_vectors.float()
    cosines = unit_rows @ (features / features.norm(dim=-1, keepdim=True)).T
    closeness, nearest = cosines.max(dim=-1)  # [d_sae]
    probabilities = model.activation_generator.firing_probabilities
    rank = probabilities.argsort(descending=True).argsort()[nearest].float()
    best, partner = _best_partners(rows, torch.ones(rows.shape[0], dtype=torch.bool))
    duplicated, live = best > 0.8, fires.any(dim=0)
    copies = torch.bincount(nearest[duplicated], minlength=features.shape[0])
    both = (fires & fires[:, partner]).sum(dim=0)[duplicated].sum()
    either = (fires | fires[:, partner]).sum(dim=0)[duplicated].sum()

    def median(values: torch.Tensor, where: torch.Tensor) -> float:
        return values[where].median().item() if where.any() else -1

    return {
        "latents": float(duplicated.sum()),
        "features": float((copies > 0).sum()),
        "most_copies": float(copies.max()),
        "median_rank": median(rank, duplicated),
        "median_rank_live": median(rank, live),
        "true_cosine": median(closeness, duplicated),
        "true_cosine_live": median(closeness, live),
        "co_firing": (both / either.clamp(min=1)).item(),
    }


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


Shard = tuple[int, int]
"""(i, n): this process takes every n-th point from the i-th; shards run side by side."""


def run_points(
    study: str,
    variants: Sequence[Variant],
    k_values: Sequence[int],
    seed: int,
    size: BenchmarkSize,
    shard: Shard = (0, 1),
) -> None:
    """Train and score each variant at each K on one recorded stream; append results."""
    points = [(k, v) for k in k_values for v in variants][shard[0] :: shard[1]]
    todo = [
        (k, v)
        for k, v in points
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
        spells = DeadSpells()
        prepare = partial(_prepare, PREPARATIONS.get(variant.name), stream, spells)
        with updated_shares() as shares:
            sae, seconds = train_variant(
                variant, sized, model, seed, None, stream, prepare
            )
        result = evaluate_variant(variant, sae, model, sized, seconds, seed)
        fires = firing(sae, model, sized.eval_samples, seed + 4)
        live = fires.any(dim=0)
        revived = live & spells.ever_dead
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
            "breakdown": redundancy_breakdown(sae.W_dec, n_experts, live, revived),
            "duplicates": duplicated_features(sae.W_dec, model, fires),
            "metrics": result.metrics,
        }
        if shares:
            entry["updated_share"] = statistics.fmean(shares)
        _append(entry)
        print(
            f"{study} K={k} seed={seed} {variant.name}: EV {result.explained_variance:.3f} "
            f"MCC {result.mcc:.3f} dead {result.dead_latents} red0.8 "
            f"{result.redundancy_08:.3f} red0.9 {result.redundancy_09:.3f} "
            f"train {seconds:.0f} s",
            flush=True,
        )


def _prepare(
    reinitialise: Callable[[TrainingSAE[Any], torch.Tensor], None] | None,
    stream: torch.Tensor,
    spells: DeadSpells,
    sae: TrainingSAE[Any],
) -> None:
    if reinitialise is not None:
        reinitialise(sae, stream)
    spells.watch(sae)


@contextmanager
def updated_shares() -> Generator[list[float]]:
    """The share of the dictionary each lazy Adam step updates while the block runs
    (dense steps count as whole ones)."""
    shares: list[float] = []

    def record(optimizer: Optimizer, *_: Any) -> None:
        if not isinstance(optimizer, LazyAdam):
            return
        share = optimizer.last_touched_share
        if share is not None:
            shares.append(1.0 if share >= DENSE_STEP_FRACTION else share)

    handle = register_optimizer_step_post_hook(record)
    try:
        yield shares
    finally:
        handle.remove()


STUDIES: dict[str, Callable[[BenchmarkSize, Shard], None]] = {}


def sweep(size: BenchmarkSize, shard: Shard) -> None:
    """K in 2..32 at seed 0, then seeds 1 and 2 at K=8."""
    run_points("sweep", sweep_variants(), (8, 2, 32, 4, 16), 0, size, shard)
    for seed in EXTRA_SEEDS_AT_K8:
        run_points("sweep", sweep_variants(), (8,), seed, size, shard)


def ablations(size: BenchmarkSize, shard: Shard) -> None:
    """One change at a time at K=8, seed 0, at `ABLATION_TOKENS`."""
    sized = replace(size, training_samples=ABLATION_TOKENS)
    run_points("ablations", ablation_variants(), (8,), 0, sized, shard)


def tokens(size: BenchmarkSize, shard: Shard) -> None:
    """Every sweep variant at K=8, seed 0, at 1/4 to 4x the tokens: has it settled?"""
    for n in TOKEN_COUNTS:
        if n != size.training_samples:
            sized = replace(size, training_samples=n)
            run_points("tokens", sweep_variants(), (8,), 0, sized, shard)


def redundancy(size: BenchmarkSize, shard: Shard) -> None:
    """Switch, Scale e=2 and e=4 at `LONG_TOKENS` and K 2, 8, 32: the authors'
    redundancy points (K=8 comes from `tokens`)."""
    variants = [v for v in sweep_variants() if v.name in LONG_VARIANTS]
    sized = replace(size, training_samples=LONG_TOKENS)
    run_points("redundancy", variants, (2, 32), 0, sized, shard)


def optimizer(size: BenchmarkSize, shard: Shard) -> None:
    """Scale e=2 with SAELens's Adam and with lazy Adam at K 8 and 32, seed 0, then
    seeds 1 and 2 at K=8: is lazy Adam's quality within seed noise? Then the same at
    `WIDE_FACTOR` times the width, where most latents wait between updates."""
    run_points("optimizer", optimizer_variants(), (8, 32), 0, size, shard)
    for seed in EXTRA_SEEDS_AT_K8:
        run_points("optimizer", optimizer_variants(), (8,), seed, size, shard)
    for seed in (0, *EXTRA_SEEDS_AT_K8):  # is the gap Feature Scaling's dropped term?
        run_points("optimizer", optimizer_variants(False), (8,), seed, size, shard)
    wide = replace(
        size,
        d_sae=size.d_sae * WIDE_FACTOR,
        n_experts=size.n_experts * WIDE_FACTOR,
    )
    for seed in (0, *EXTRA_SEEDS_AT_K8):
        run_points("optimizer", optimizer_variants(width=wide), (8,), seed, wide, shard)
    run_points("optimizer", optimizer_variants(False, wide), (8,), 0, wide, shard)


WIDE_FACTOR = 8
"""The optimizer study's wide point: d_sae 12,288 in experts of the same 192 latents,
where a step of 1024 tokens x K 8 can reach at most two thirds of the latents."""


def optimizer_variants(
    feature_scaling: bool = True, width: BenchmarkSize | None = None
) -> list[Variant]:
    options: dict[str, Any] = {"n_active_experts": 2}
    name = "scale e=2"
    if width is not None:
        name += f" d_sae {width.d_sae}"
    if not feature_scaling:
        options["feature_scaling"] = False
        name += " feature scaling off"
    return [
        Variant(name, "scale", options),
        Variant(f"{name} lazy adam", "scale", options, lazy_adam=True),
    ]


LONG_VARIANTS = ("switch", "scale e=2", "scale e=4")
STUDIES.update(
    sweep=sweep,
    tokens=tokens,
    redundancy=redundancy,
    ablations=ablations,
    optimizer=optimizer,
)


# --------------------------------------------------------------------------- output


def _mean(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean, std = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


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
                f"| {_mean([float(r['dead_latents']) for r in rows], 0)} | {len(rows)} |"
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
        "| revived / its pairs (0.8) | intra / inter (0.8) | high-pass 0.8 / 0.9 "
        "| duplicated: latents / features / most copies / median rank (live) / "
        "cos to true feature (live) / co-firing "
        "| load entropy | purity (chance) | train s |",
        "|" + " --- |" * 18,
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
            f"{b['pairs/dead-dead/0.8']:.3f} | {_revived(b)} "
            f"| {b['raw/intra/0.8']:.3f} / {b['raw/inter/0.8']:.3f} "
            f"| {b['highpass/all/0.8']:.3f} / {b['highpass/all/0.9']:.3f} "
            f"| {_duplicates(r.get('duplicates'))} "
            f"| {'-' if entropy is None else f'{entropy:.3f}'} | {purity} "
            f"| {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _duplicates(found: dict[str, float] | None) -> str:
    if found is None:
        return "-"  # measured before duplicates were matched to true features
    if found["latents"] == 0:
        return "0"
    text = (
        f"{found['latents']:.0f} / {found['features']:.0f} / "
        f"{found['most_copies']:.0f} / {found['median_rank']:.0f} "
        f"({found['median_rank_live']:.0f})"
    )
    if "co_firing" in found:  # measured since pairs were checked on fresh tokens
        text += (
            f" / {found['true_cosine']:.2f} ({found['true_cosine_live']:.2f}) "
            f"/ {found['co_firing']:.3f}"
        )
    return text


def _revived(breakdown: dict[str, float]) -> str:
    if "n_revived" not in breakdown:
        return "-"  # measured before revival was tracked
    return f"{breakdown['n_revived']:.0f} / {breakdown['pairs/revived/0.8']:.3f}"


def plot_sweep(entries: Sequence[dict[str, Any]], path: Path, tokens_: int) -> Path:
    """Ours (FVU, redundancy 0.8 and 0.9 vs K) over the authors' (MSE, redundancy 0.9)."""
    trained = {e["name"] for e in entries}
    names = [v.name for v in sweep_variants() if v.name in trained]
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
            xscale="log",
            xlabel="K",
            ylabel=label,
            title=f"ours (synthetic, {tokens_ / 1e6:g}M tokens): {label}",
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
        plot_sweep(
            sweep_rows,
            RESULTS / "synthetic_realistic_k_sweep.png",
            REALISTIC.training_samples,
        )
    token_rows = _token_rows()
    if token_rows:
        parts += ["## Tokens (K=8, seed 0)", token_tables(token_rows)]
        plot_tokens(token_rows, RESULTS / "synthetic_realistic_tokens.png")
    long_rows = _rows("redundancy") + [
        r
        for r in token_rows
        if r["tokens"] == LONG_TOKENS and r["name"] in LONG_VARIANTS
    ]
    if long_rows:
        parts += [
            f"## Redundancy over K at {LONG_TOKENS:,} tokens (seed 0)",
            sweep_tables(long_rows),
            "",
            detail_table(long_rows),
        ]
        path = RESULTS / "synthetic_realistic_k_sweep_4m.png"
        plot_sweep(long_rows, path, LONG_TOKENS)
    ablation_rows = _rows("ablations", ABLATION_TOKENS)
    if ablation_rows:
        baselines = [r for r in token_rows if r["tokens"] == ABLATION_TOKENS]
        parts += [
            f"## Ablations (K=8, seed 0, {ABLATION_TOKENS:,} tokens)",
            detail_table([*baselines, *ablation_rows]),
        ]
    earlier = _rows("ablations", 500_000)
    if earlier:
        parts += [
            "## Earlier ablations (K=8, seed 0, 500k tokens, decoder_init_norm 0.1)",
            detail_table(earlier),
        ]
    optimizer_rows = _rows("optimizer", REALISTIC.training_samples)
    if optimizer_rows:
        parts += [
            "## SAELens's Adam and lazy Adam (Scale e=2, 1M tokens)",
            optimizer_table(optimizer_rows),
        ]
    extra = _rows("moex")  # measured with an experimental router, since removed
    if extra:
        parts += ["## MoE-X routing (K=8, seed 0; code removed)", detail_table(extra)]
    MD_PATH.write_text("\n\n".join(parts) + "\n")


def optimizer_table(entries: Sequence[dict[str, Any]]) -> str:
    """Per optimizer and K: explained variance, MCC and dead latents over seeds."""
    lines = [
        "| variant | K | seeds | explained variance | MCC | dead latents "
        "| latents updated per step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = sorted(dict.fromkeys(e["name"] for e in entries), key=_optimizer_order)
    for name in names:
        for k in sorted({e["k"] for e in entries}):
            rows = sorted(_by(entries, name, k), key=lambda r: r["seed"])
            if not rows:
                continue
            seeds = ",".join(str(r["seed"]) for r in rows)
            cells = [
                _mean([r[key] for r in rows])
                for key in ("explained_variance", "mcc", "dead_latents")
            ]
            shares = [r["updated_share"] for r in rows if "updated_share" in r]
            cells.append(f"{statistics.fmean(shares):.0%}" if shares else "all")
            lines.append(f"| {name} | {k} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _optimizer_order(name: str) -> tuple[bool, bool, bool]:
    """Width, then Feature Scaling on before off, then SAELens's Adam before lazy."""
    return ("d_sae" in name, "feature scaling off" in name, "lazy adam" in name)


def _token_rows() -> list[dict[str, Any]]:
    """The tokens study and the sweep's K=8, seed 0 points, by variant and tokens."""
    rows = _rows("tokens") + [
        r for r in _rows("sweep", REALISTIC.training_samples) if r["k"] == 8
    ]
    order = [v.name for v in sweep_variants()]
    return sorted(
        (r for r in rows if r["seed"] == 0),
        key=lambda r: (r["tokens"], order.index(r["name"])),
    )


def token_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Each variant per token count, then Scale's FVU cut over Switch per count."""
    lines = [
        "| tokens | variant | EV | MCC | dead | revived | red>0.8 | red>0.9 |",
        "|" + " --- |" * 8,
    ]
    for r in rows:
        revived = r["breakdown"].get("n_revived")
        lines.append(
            f"| {r['tokens']:,} | {r['name']} | {r['explained_variance']:.3f} "
            f"| {r['mcc']:.3f} | {r['dead_latents']} "
            f"| {'-' if revived is None else f'{revived:.0f}'} "
            f"| {r['redundancy_08']:.3f} | {r['redundancy_09']:.3f} |"
        )
    lines += [
        "",
        "| tokens | FVU cut over Switch, e=2 | e=4 | e=8 | TopK's FVU cut over e=2 |",
        "|" + " --- |" * 5,
    ]
    for n in sorted({r["tokens"] for r in rows}):
        fvu = {r["name"]: 1 - r["explained_variance"] for r in rows if r["tokens"] == n}
        cuts = [
            _relative_change(fvu[a], fvu[b]) if a in fvu and b in fvu else "-"
            for a, b in (
                ("scale e=2", "switch"),
                ("scale e=4", "switch"),
                ("scale e=8", "switch"),
                ("topk", "scale e=2"),
            )
        ]
        lines.append(f"| {n:,} | " + " | ".join(cuts) + " |")
    return "\n".join(lines)


def plot_tokens(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """FVU, redundancy(0.8) and dead latents of every variant against tokens (K=8)."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    metrics: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("FVU (1 - EV)", lambda r: 1 - r["explained_variance"]),
        ("redundancy, cos > 0.8", lambda r: r["redundancy_08"]),
        ("dead latents", lambda r: r["dead_latents"]),
    ]
    for axis, (label, value) in zip(axes, metrics, strict=True):
        for name in (v.name for v in sweep_variants()):
            mine = [r for r in rows if r["name"] == name]
            axis.plot(
                [r["tokens"] for r in mine],
                [value(r) for r in mine],
                marker="o",
                label=name,
                color=COLORS[name],
            )
        axis.set(xscale="log", xlabel="training tokens", ylabel=label, title=label)
        axis.set_xticks(TOKEN_COUNTS, [f"{n / 1e6:g}M" for n in TOKEN_COUNTS])
        axis.minorticks_off()
    axes[0].legend()
    figure.suptitle("K = 8, seed 0: does the comparison settle with more tokens?")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="I/N: run every N-th point from the I-th, to split a study over processes",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen studies (skipping points already in the JSON), then report."""
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        studies = list(STUDIES) if args.study == "all" else [args.study]
        index, count = (int(part) for part in args.shard.split("/"))
        with torch_threads(args.threads):
            for study in studies:
                STUDIES[study](REALISTIC, (index, count))
                write_report()
    write_report()


if __name__ == "__main__":
    main()
