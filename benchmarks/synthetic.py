"""Ground-truth benchmark: TopK, BatchTopK, Switch, Scale and ablations on synthetic data.

    python benchmarks/synthetic.py --size quick                 # the comparison
    python benchmarks/synthetic.py --size quick --study defaults  # defaults study
    python benchmarks/synthetic.py --size quick --seeds 0 1 2     # several seeds

All variants share d_sae, k (L0), training tokens and seeds (see
`saelens_moe.ground_truth`, which also runs the quickstart). For each seed it writes results.md,
results.json and pareto.png under `<output-dir>/<study>/seed_<n>/`, and a
mean +- std table over seeds to `<output-dir>/<study>/summary.md`.
"""

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from saelens_moe.ground_truth import (
    SIZES,
    BenchmarkResult,
    BenchmarkSize,
    Variant,
    markdown_table,
    run_benchmark,
    write_outputs,
)

BENCHMARK_SIZES = SIZES | {
    "realistic": BenchmarkSize(
        "realistic", 1536, 96, 1536, 8, 8, 1_000_000, 1024, 50_000, 64, 4, lr=1e-3
    ),
    "full": BenchmarkSize(
        "full", 4096, 256, 4096, 32, 32, 20_000_000, 4096, 500_000, 64, 5, lr=3e-4
    ),
}
"""The package's sizes plus `realistic` (1536 features, d_in 96, d_sae 1536, N 8; the
K sweep of `synthetic_realistic.py`) and `full` (4096 features, d_in 256, N 32; for
a GPU)."""


def standard_variants() -> list[Variant]:
    """TopK, BatchTopK, Switch, Scale e in {2, 4} and the two Scale ablations."""
    return [
        Variant("topk", "topk"),
        Variant("batchtopk", "batchtopk"),
        Variant("switch", "switch"),
        Variant("scale e=2", "scale", {"n_active_experts": 2}),
        Variant("scale e=4", "scale", {"n_active_experts": 4}),
        Variant(
            "scale e=2 no FS",
            "scale",
            {"n_active_experts": 2, "feature_scaling": False},
        ),
        Variant(
            "scale N=1 FS",
            "scale",
            {"n_experts": 1, "n_active_experts": 1, "feature_scaling": True},
        ),
    ]


def defaults_variants() -> list[Variant]:
    """Scale e=2 varied one setting at a time around the package defaults."""
    base = {"n_active_experts": 2}
    variants = [Variant("scale e=2 (defaults)", "scale", base)]
    for coefficient in (0.0, 0.01, 0.3):
        variants.append(
            Variant(
                f"lb={coefficient:g}",
                "scale",
                {**base, "load_balancing_coefficient": coefficient},
            )
        )
    variants.append(Variant("auxk off", "scale", {**base, "aux_loss_coefficient": 0.0}))
    for weighting in ("renormalized", "probs", "uniform"):
        variants.append(
            Variant(
                f"weighting={weighting}",
                "scale",
                {**base, "expert_weighting": weighting},
            )
        )
    variants.append(Variant("switch auxk off", "switch", {"aux_loss_coefficient": 0.0}))
    variants.append(
        Variant("switch lb=0.01", "switch", {"load_balancing_coefficient": 0.01})
    )
    return variants


STUDIES = {"standard": standard_variants, "defaults": defaults_variants}
SUMMARY_FIELDS = (
    "explained_variance",
    "mcc",
    "uniqueness",
    "redundancy_08",
    "redundancy_09",
    "dead_latents",
    "expert_load_entropy",
    "purity",
    "train_seconds",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", choices=sorted(BENCHMARK_SIZES), default="quick")
    parser.add_argument(
        "--study", choices=[*STUDIES, "all"], default="standard", help="variant set"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--output-dir", type=Path, default=Path("benchmarks/results"), help="root"
    )
    parser.add_argument(
        "--load-balancing-coefficient",
        type=float,
        default=None,
        help="override load_balancing_coefficient of every Switch / Scale variant",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest here)"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="only the variants with these names (default: all of the study)",
    )
    return parser.parse_args(argv)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary_table(runs: Sequence[BenchmarkResult]) -> str:
    """Mean ± std over seeds of the main scores, one row per variant."""
    names = [r.name for r in runs[0].results]
    header = "| variant | " + " | ".join(SUMMARY_FIELDS) + " |"
    lines = [header, "|" + " --- |" * (len(SUMMARY_FIELDS) + 1)]
    for index, name in enumerate(names):
        cells: list[str] = []
        for field in SUMMARY_FIELDS:
            values = [getattr(run.results[index], field) for run in runs]
            cells.append(_mean_std([float(v) for v in values if v is not None]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_load_balancing(variants: list[Variant], coefficient: float) -> list[Variant]:
    """The variants with `coefficient` as load_balancing_coefficient of MoE ones."""
    return [
        replace(v, options={**v.options, "load_balancing_coefficient": coefficient})
        if v.architecture in ("scale", "switch")
        else v
        for v in variants
    ]


def run_study(
    variants: Sequence[Variant],
    size_name: str,
    seeds: Sequence[int],
    root: Path,
    n_threads: int = 1,
) -> list[BenchmarkResult]:
    """Run one variant set for every seed and write per-seed and summary outputs."""
    runs: list[BenchmarkResult] = []
    for seed in seeds:
        benchmark = run_benchmark(
            variants,
            BENCHMARK_SIZES[size_name],
            seed=seed,
            progress=True,
            n_threads=n_threads,
        )
        write_outputs(benchmark, root / f"seed_{seed}")
        print(f"\nseed {seed} (load average {benchmark.load_average}):")
        print(markdown_table(benchmark.results))
        runs.append(benchmark)
    summary = summary_table(runs)
    (root / "summary.md").write_text(summary + "\n")
    (root / "summary.json").write_text(
        json.dumps([run.to_dict() for run in runs], indent=2)
    )
    print(f"\nmean ± std over seeds {list(seeds)}:\n{summary}")
    return runs


def main(argv: Sequence[str] | None = None) -> dict[str, list[BenchmarkResult]]:
    """Run the chosen studies; returns each study's per-seed results."""
    args = parse_args(argv)
    studies = list(STUDIES) if args.study == "all" else [args.study]
    out: dict[str, list[BenchmarkResult]] = {}
    for study in studies:
        variants = STUDIES[study]()
        if args.variants:
            variants = [v for v in variants if v.name in args.variants]
        root = args.output_dir / args.size / study
        if args.load_balancing_coefficient is not None:
            variants = with_load_balancing(variants, args.load_balancing_coefficient)
            root = root.with_name(f"{study}_lb{args.load_balancing_coefficient:g}")
        out[study] = run_study(variants, args.size, args.seeds, root, args.threads)
    return out


if __name__ == "__main__":
    main()
