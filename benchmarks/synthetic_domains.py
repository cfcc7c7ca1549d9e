"""Do experts specialise when the data has domains? The study of issue 23.

    python benchmarks/synthetic_domains.py                        # the whole grid
    python benchmarks/synthetic_domains.py --shard 0/2            # and 1/2 beside it
    python benchmarks/synthetic_domains.py --strengths 0.9        # one strength
    python benchmarks/synthetic_domains.py --quick                # a pilot in seconds
    python benchmarks/synthetic_domains.py --ideas                # k-means vs random routers
    python benchmarks/synthetic_domains.py --tokens 4000000 --strengths 0.9 --k 8 --n 8
        --extra-seeds --variants switch "scale e=2" "scale e=4"   # (one line) 4M tokens
    python benchmarks/synthetic_domains.py --plot-only            # tables and plot again

Ground truth: the realistic size of `synthetic_realistic.py` (1536 true features in
96 dimensions, 64 hierarchy trees; d_sae 1536) made a `DomainSyntheticModel`: 16
domains, a second domain on half the tokens, the most frequent 12.5% of the features
domain-free, at each clustering strength in `STRENGTHS` (0 is the independent ground
truth). Grid per strength: TopK at equal width, Switch and Scale e = 2, 4, 8 at K 8
and 32 and N 8 and 16 (TopK once per K), seed 0, plus seeds 1 and 2 at the headline
point K 8, N 8. Every SAE of one strength and seed trains on the same recorded token
stream (`saelens_moe.ground_truth.record_stream`), at `SIZE.training_samples`
tokens (1M, the tokens study's choice for reconstruction; redundancy forms later,
so `--tokens` can raise it).

The grid's routed SAEs keep the random router they were run with; `--ideas` compares
it with the k-means router (`router_init`) for Switch and Scale e = 2, 4 at K 8, N 8,
strengths 0 and 0.9, seeds 0-2, in `results/synthetic_domains_ideas.*`.

Per SAE: explained variance, MCC, dead latents (from `evaluate_variant`); on fresh
labelled tokens, the NMI between selected experts and token domains, each expert's
domain purity and effective number of domains served, each beside its chance level
(`saelens_moe.metrics.routing_specialisation`); the domain purity of each expert's
latents (the domain of the true feature nearest each decoder row, against shuffled
labels); redundancy of live latents at cosine > 0.8 and > 0.9, split intra / inter
expert. Results are appended to `results/synthetic_domains.json` after every SAE;
`results/synthetic_domains.md` and `results/synthetic_domains.png` are written from
it.
"""

import argparse
import fcntl
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from sae_lens.saes.sae import TrainingSAE

from saelens_moe.domains import DomainConfig, DomainSyntheticModel
from saelens_moe.ground_truth import (
    BenchmarkSize,
    Variant,
    evaluate_variant,
    record_stream,
    synthetic_model_config,
    torch_threads,
    train_variant,
)
from saelens_moe.metrics import (
    decoder_redundancy,
    expert_specialisation,
    route_activations,
    routing_specialisation,
)

SIZE = BenchmarkSize(
    "realistic", 1536, 96, 1536, 8, 8, 1_000_000, 1024, 50_000, 64, 4, lr=1e-3
)
"""The realistic size of `synthetic_realistic.py` (the same tokens, 1M)."""
DOMAINS = DomainConfig(n_domains=16, second_domain_probability=0.5)
"""Domains at every strength; `strength` is set per point."""
STRENGTHS = (0.0, 0.5, 0.9)
"""Independent, half of each domain feature's off-domain firing removed, 90%."""
K_VALUES = (8, 32)
N_VALUES = (8, 16)
HEADLINE = (8, 8)
"""(K, N) of the extra seeds."""
EXTRA_SEEDS = (1, 2)
THRESHOLDS = (0.8, 0.9)
ROUTING_SHUFFLES = 20
RESULTS = Path(__file__).parent / "results"
COLORS = {
    "topk": "C4",
    "switch": "C3",
    "scale e=2": "C0",
    "scale e=4": "C1",
    "scale e=8": "C2",
    "switch k-means": "C5",
    "scale e=2 k-means": "C6",
    "scale e=4 k-means": "C7",
}
"""Plot colours, in table order; rows of other names (ideas tried and removed, see
benchmarks/README.md) come last."""


def study_variants() -> list[Variant]:
    """TopK at equal width, Switch, Scale e = 2, 4, 8; package defaults, with the
    random router the grid was run with (before `router_init="kmeans"`)."""
    random: dict[str, Any] = {"router_init": "random"}
    return [
        Variant("topk", "topk"),
        Variant("switch", "switch", random),
        *(
            Variant(f"scale e={e}", "scale", {"n_active_experts": e, **random})
            for e in (2, 4, 8)
        ),
    ]


def idea_variants() -> list[Variant]:
    """Item 4's kept idea, a router started from k-means, against the random router,
    for Switch and Scale e = 2 and 4."""
    variants: list[Variant] = []
    for name, architecture, fields in (
        ("switch", "switch", {}),
        ("scale e=2", "scale", {"n_active_experts": 2}),
        ("scale e=4", "scale", {"n_active_experts": 4}),
    ):
        for init, suffix in (("random", ""), ("kmeans", " k-means")):
            options = {**fields, "router_init": init}
            variants.append(Variant(name + suffix, architecture, options))
    return variants


@dataclass(frozen=True)
class Study:
    """One grid: the ground truth, the SAEs and where results go."""

    name: str
    """"grid" or "quick"; the results files are synthetic_domains[_quick].*"""
    size: BenchmarkSize
    """Synthetic model, SAE and training sizes; k and n_experts are set per point."""
    domains: DomainConfig
    """Domain structure; strength is set per point."""
    strengths: tuple[float, ...]
    """Clustering strengths, 0 (independent) included."""
    variants: tuple[Variant, ...]
    """SAEs at each point."""
    k_values: tuple[int, ...]
    """Latents kept per token."""
    n_values: tuple[int, ...]
    """Experts N of the routed SAEs (TopK runs once per K)."""
    headline: tuple[int, int]
    """(K, N) where `extra_seeds` run too."""
    extra_seeds: tuple[int, ...]
    """Seeds beyond 0 at the headline point."""
    labelled_tokens: int
    """Fresh labelled tokens for routing and live latents."""


GRID = Study(
    "grid",
    SIZE,
    DOMAINS,
    STRENGTHS,
    tuple(study_variants()),
    K_VALUES,
    N_VALUES,
    HEADLINE,
    EXTRA_SEEDS,
    SIZE.eval_samples,
)
QUICK = Study(
    "quick",
    BenchmarkSize("tiny", 64, 16, 64, 4, 4, 8_192, 256, 2_048, 4, 3, lr=3e-3),
    DomainConfig(n_domains=4),
    (0.0, 0.9),
    (
        Variant("topk", "topk"),
        Variant("switch", "switch"),
        Variant("scale e=2", "scale", {"n_active_experts": 2}),
    ),
    (4,),
    (4,),
    (4, 4),
    (),
    2_048,
)
"""Six SAEs on a 64-feature ground truth with 4 domains: checks the machinery."""
IDEAS = replace(
    GRID,
    name="ideas",
    strengths=(0.0, 0.9),
    variants=tuple(idea_variants()),
    k_values=(HEADLINE[0],),
    n_values=(HEADLINE[1],),
)
"""Item 4: routers started from k-means against random ones, independent and
clustered, seeds 0-2."""


@dataclass(frozen=True)
class Point:
    """One SAE of the grid."""

    strength: float
    """Clustering strength of the ground truth."""
    seed: int
    """Seed of the ground truth, the SAE and the token stream."""
    k: int
    """Latents kept per token."""
    n_experts: int | None
    """Experts N; None for TopK, which has none."""
    variant: Variant
    """The SAE."""

    def key(self, tokens: int) -> tuple[Any, ...]:
        """What identifies the point in the results file."""
        return (
            self.strength,
            self.variant.name,
            self.k,
            self.n_experts,
            self.seed,
            tokens,
        )


def grid_points(study: Study) -> list[Point]:
    """Seed 0 over every (K, N), the extra seeds at the headline; TopK once per K."""
    points: list[Point] = []
    everywhere = [(k, n) for k in study.k_values for n in study.n_values]
    for strength in study.strengths:
        for seed in (0, *study.extra_seeds):
            for k, n in everywhere if seed == 0 else [study.headline]:
                for variant in study.variants:
                    if variant.architecture != "topk":
                        points.append(Point(strength, seed, k, n, variant))
                    elif n == study.headline[1]:
                        points.append(Point(strength, seed, k, None, variant))
    return points


# ---------------------------------------------------------------------- scoring


@torch.no_grad()
def labelled_tokens(
    model: DomainSyntheticModel, n_tokens: int, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh hidden activations [n_tokens, d_in] and their domains [n_tokens, D]."""
    torch.manual_seed(seed)
    hidden: list[torch.Tensor] = []
    domains: list[torch.Tensor] = []
    for start in range(0, n_tokens, batch_size):
        batch_hidden, _, batch_domains = model.sample_with_domains(
            min(batch_size, n_tokens - start)
        )
        hidden.append(batch_hidden)
        domains.append(batch_domains)
    return torch.cat(hidden), torch.cat(domains)


@torch.no_grad()
def domain_scores(
    sae: TrainingSAE[Any],
    model: DomainSyntheticModel,
    n_experts: int,
    n_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Routing against domains, latent domain purity, live redundancy, for one SAE."""
    hidden, domains = labelled_tokens(model, n_tokens, batch_size, seed)
    live = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    experts: list[torch.Tensor] = []
    for batch in hidden.split(batch_size):
        live |= (sae.encode(batch) > 0).any(dim=0).cpu()
        if n_experts > 1:
            experts.append(route_activations(sae, batch).experts.cpu())
    redundancy = decoder_redundancy(sae.W_dec, n_experts, THRESHOLDS, live=live)
    out: dict[str, Any] = {"n_live": int(live.sum())}
    out |= {f"live/{k}": v for k, v in redundancy.to_dict().items()}
    if n_experts > 1:
        routing = routing_specialisation(
            torch.cat(experts), domains, n_experts, ROUTING_SHUFFLES, seed
        )
        latents = expert_specialisation(
            sae.W_dec,
            n_experts,
            model.feature_dict.feature_vectors,
            model.layout.domain_of_feature,
            seed=seed,
        )
        out |= routing.to_dict("routing/")
        matched = latents.n_matched > 0
        out |= {
            "latents/domain_purity": latents.overall_purity if matched else None,
            "latents/chance_domain_purity": latents.chance_purity if matched else None,
            "latents/n_matched": latents.n_matched,
        }
    return out


# ---------------------------------------------------------------------- running


def json_path(study: Study, output_dir: Path) -> Path:
    """Where the study's results accumulate."""
    suffix = "" if study.name == "grid" else f"_{study.name}"
    return output_dir / f"synthetic_domains{suffix}.json"


def load_entries(path: Path) -> list[dict[str, Any]]:
    """Every result so far."""
    return json.loads(path.read_text()) if path.exists() else []


def append_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add one result under a lock, so shards can run side by side."""
    with (Path(tempfile.gettempdir()) / f"{path.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = load_entries(path)
        entries.append(entry)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(path)


def _entry_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (
        entry["strength"],
        entry["name"],
        entry["k"],
        entry["grid_n_experts"],
        entry["seed"],
        entry["tokens"],
    )


Shard = tuple[int, int]
"""(i, n): this process takes every n-th point from the i-th."""


def run_study(
    study: Study, output_dir: Path, shard: Shard = (0, 1), log: bool = True
) -> None:
    """Train and score this shard's points not yet in the results file."""
    path = json_path(study, output_dir)
    tokens = study.size.training_samples
    done = {_entry_key(e) for e in load_entries(path)}
    todo = [
        p for p in grid_points(study)[shard[0] :: shard[1]] if p.key(tokens) not in done
    ]
    recorded: tuple[float, int] | None = None  # (strength, seed) of the stream held
    model: DomainSyntheticModel | None = None
    stream = torch.empty(0)
    for point in todo:
        if model is None or recorded != (point.strength, point.seed):
            domains = replace(study.domains, strength=point.strength)
            model = DomainSyntheticModel(
                synthetic_model_config(study.size, point.seed), domains
            )
            start = time.perf_counter()
            stream = torch.empty(0)  # let go of the last recording first
            stream = record_stream(model, study.size, point.seed)
            recorded = (point.strength, point.seed)
            if log:
                print(
                    f"strength {point.strength} seed {point.seed}: recorded "
                    f"{tokens:,} tokens in {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
        entry = train_and_score(study, point, model, stream)
        append_entry(path, entry)
        if log:
            print(summary_line(entry), flush=True)


def train_and_score(
    study: Study, point: Point, model: DomainSyntheticModel, stream: torch.Tensor
) -> dict[str, Any]:
    """One SAE: trained on the recorded stream, scored against the truth."""
    sized = replace(study.size, k=point.k, n_experts=point.n_experts or 1)
    start = time.perf_counter()
    sae, seconds = train_variant(point.variant, sized, model, point.seed, None, stream)
    result = evaluate_variant(point.variant, sae, model, sized, seconds, point.seed)
    scores = domain_scores(
        sae,
        model,
        result.n_experts,
        study.labelled_tokens,
        sized.batch_size,
        point.seed + 5,
    )
    return {
        "study": study.name,
        "strength": point.strength,
        "name": point.variant.name,
        "k": point.k,
        "grid_n_experts": point.n_experts,
        "seed": point.seed,
        "tokens": sized.training_samples,
        "domains": asdict(replace(study.domains, strength=point.strength)),
        **{key: val for key, val in asdict(result).items() if key != "metrics"},
        "scores": scores,
        "point_seconds": time.perf_counter() - start,
        "load_average": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "metrics": result.metrics,
    }


def summary_line(entry: dict[str, Any]) -> str:
    """One line per trained SAE for the log."""
    s = entry["scores"]
    routing = (
        f" NMI {s['routing/nmi']:.3f} (chance {s['routing/chance_nmi']:.3f})"
        if "routing/nmi" in s
        else ""
    )
    return (
        f"strength {entry['strength']} K={entry['k']} N={entry['grid_n_experts']} "
        f"seed={entry['seed']} {entry['name']}: EV {entry['explained_variance']:.3f} "
        f"dead {entry['dead_latents']}{routing} live red0.8 "
        f"{s['live/redundancy/0.8']:.3f} train {entry['train_seconds']:.0f} s, "
        f"point {entry['point_seconds']:.0f} s"
    )


# ---------------------------------------------------------------------- output


def _mean(values: Sequence[float | None], digits: int = 3) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"


def _score(rows: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    return [r["scores"].get(key) for r in rows]


def _with_chance(rows: Sequence[dict[str, Any]], key: str, chance: str) -> str:
    """Mean ± std of `key` over seeds, with the mean chance level in brackets."""
    value = _mean(_score(rows, key))
    levels = [v for v in _score(rows, chance) if v is not None]
    return value if not levels else f"{value} ({statistics.mean(levels):.3f})"


TABLE_HEADER = (
    "| strength | K | N | variant | seeds | EV | MCC | dead | NMI (chance) "
    "| routing purity (chance) | domains served (chance) "
    "| latent domain purity (chance) [matched] | live red>0.8 all / intra / inter "
    "| live red>0.9 all / intra / inter | train s |"
)


def _matched(rows: Sequence[dict[str, Any]]) -> str:
    """Mean latents matched to a domain feature (cosine >= 0.5): what purity rests on."""
    counts = [
        r["scores"]["latents/n_matched"]
        for r in rows
        if "latents/n_matched" in r["scores"]
    ]
    return f" [{statistics.mean(counts):.0f}]" if counts else ""


def _redundancy(rows: Sequence[dict[str, Any]], tau: float) -> str:
    scopes = ("redundancy/", "redundancy/intra_expert/", "redundancy/inter_expert/")
    return " / ".join(_mean(_score(rows, f"live/{scope}{tau:g}")) for scope in scopes)


def results_table(entries: Sequence[dict[str, Any]]) -> str:
    """One row per (strength, K, N, variant), mean ± std over seeds."""
    lines = [TABLE_HEADER, "|" + " --- |" * (TABLE_HEADER.count("|") - 1)]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(
            (e["strength"], e["k"], e["grid_n_experts"] or 0, e["name"]), []
        ).append(e)
    order = list(COLORS)

    def rank(name: str) -> tuple[int, str]:
        return (order.index(name) if name in order else len(order), name)

    for key in sorted(groups, key=lambda g: (g[0], g[1], g[2], rank(g[3]))):
        rows = groups[key]
        strength, k, n, name = key
        lines.append(
            f"| {strength:g} | {k} | {n or '-'} | {name} | {len(rows)} "
            f"| {_mean([r['explained_variance'] for r in rows])} "
            f"| {_mean([r['mcc'] for r in rows])} "
            f"| {_mean([float(r['dead_latents']) for r in rows], 0)} "
            f"| {_with_chance(rows, 'routing/nmi', 'routing/chance_nmi')} "
            f"| {_with_chance(rows, 'routing/overall_purity', 'routing/chance_overall_purity')} "
            f"| {_with_chance(rows, 'routing/mean_domains_served', 'routing/chance_mean_domains_served')} "
            f"| {_with_chance(rows, 'latents/domain_purity', 'latents/chance_domain_purity')}"
            f"{_matched(rows)} "
            f"| {_redundancy(rows, 0.8)} | {_redundancy(rows, 0.9)} "
            f"| {_mean([r['train_seconds'] for r in rows], 0)} |"
        )
    return "\n".join(lines)


Value = Callable[[dict[str, Any]], float | None]


def _curve(rows: Sequence[dict[str, Any]], value: Value) -> list[tuple[float, float]]:
    """(strength, mean of `value` over the rows at that strength), where present."""
    out: list[tuple[float, float]] = []
    for strength in sorted({r["strength"] for r in rows}):
        values = [value(r) for r in rows if r["strength"] == strength]
        present = [v for v in values if v is not None]
        if present:
            out.append((strength, statistics.mean(present)))
    return out


def plot_strengths(
    entries: Sequence[dict[str, Any]], path: Path, k: int, n: int
) -> Path:
    """FVU, NMI (chance dotted) and live redundancy (0.8) against strength at (K, N)."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels: list[tuple[str, Value, Value | None]] = [
        ("FVU (1 - EV)", lambda r: 1 - r["explained_variance"], None),
        (
            "NMI(selected experts; domains)",
            lambda r: r["scores"].get("routing/nmi"),
            lambda r: r["scores"].get("routing/chance_nmi"),
        ),
        (
            "live redundancy, cos > 0.8",
            lambda r: r["scores"]["live/redundancy/0.8"],
            None,
        ),
    ]
    for axis, (label, value, chance) in zip(axes, panels, strict=True):
        for name, color in COLORS.items():
            rows = [
                r
                for r in entries
                if r["name"] == name
                and r["k"] == k
                and r["grid_n_experts"] in (n, None)
            ]
            for measure, style, legend in ((value, "-", name), (chance, ":", None)):
                curve = [] if measure is None else _curve(rows, measure)
                if curve:
                    xs, ys = zip(*curve, strict=True)
                    axis.plot(xs, ys, style, marker="o", label=legend, color=color)
        axis.set(xlabel="clustering strength", ylabel=label, title=label)
    axes[0].legend()
    figure.suptitle(f"K = {k}, N = {n}: mean over seeds (dotted: chance)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(study: Study, output_dir: Path) -> Path:
    """The markdown table and the plot, from the results file."""
    path = json_path(study, output_dir)
    entries = load_entries(path)
    table = path.with_suffix(".md")
    title = f"# Synthetic domains, {study.name} (written by benchmarks/synthetic_domains.py)"
    parts = [title]
    for tokens in sorted({e["tokens"] for e in entries}):
        mine = [e for e in entries if e["tokens"] == tokens]
        parts += [f"## {tokens:,} tokens", results_table(mine)]
    table.write_text("\n\n".join(parts) + "\n")
    if entries:
        k, n = study.headline
        counts = Counter(e["tokens"] for e in entries)
        tokens = counts.most_common(1)[0][0]
        plotted = [e for e in entries if e["tokens"] == tokens]
        plot_strengths(plotted, path.with_suffix(".png"), k, n)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the six-SAE pilot")
    parser.add_argument(
        "--ideas", action="store_true", help="k-means routers against random ones"
    )
    parser.add_argument("--variants", nargs="+", default=None, help="names to run")
    parser.add_argument("--k", type=int, nargs="+", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument(
        "--extra-seeds", type=int, nargs="*", default=None, help="seeds beyond 0"
    )
    parser.add_argument("--strengths", type=float, nargs="+", default=None)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--shard",
        default="0/1",
        help="I/N: run every N-th point from the I-th, to split the grid over processes",
    )
    return parser.parse_args(argv)


def chosen_study(args: argparse.Namespace) -> Study:
    """The grid or the pilot, with the strengths and tokens asked for."""
    study = QUICK if args.quick else IDEAS if args.ideas else GRID
    if args.variants is not None:
        unknown = set(args.variants) - {v.name for v in study.variants}
        if unknown:
            names = ", ".join(v.name for v in study.variants)
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {names}")
        chosen = tuple(v for v in study.variants if v.name in args.variants)
        study = replace(study, variants=chosen)
    if args.k is not None:
        study = replace(study, k_values=tuple(args.k))
    if args.n is not None:
        study = replace(study, n_values=tuple(args.n))
    if args.extra_seeds is not None:
        study = replace(study, extra_seeds=tuple(args.extra_seeds))
    if args.strengths is not None:
        study = replace(study, strengths=tuple(args.strengths))
    if args.tokens is not None:
        study = replace(study, size=replace(study.size, training_samples=args.tokens))
    return study


def main(argv: Sequence[str] | None = None) -> None:
    """Run the study's missing points (unless --plot-only), then write the report."""
    args = parse_args(argv)
    study = chosen_study(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        index, count = (int(part) for part in args.shard.split("/"))
        with torch_threads(args.threads):
            run_study(study, args.output_dir, (index, count))
    print(write_report(study, args.output_dir).read_text())


if __name__ == "__main__":
    main()
