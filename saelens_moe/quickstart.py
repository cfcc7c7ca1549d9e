"""Offline quickstart: train TopK, Switch and Scale SAEs on synthetic data and compare.

    python -m saelens_moe.quickstart [--output-dir DIR] [--tiny] [--seed N]

Everything runs locally on CPU through SAELens's `SyntheticSAERunner` (no model
or dataset download, no wandb). It prints a markdown table and writes into the
output folder:

- results.md, results.json, pareto.png: the comparison;
- saes/<variant>/: each trained SAE in SAELens format (`SAE.load_from_disk`);
- plots/<variant>/: redundancy histogram, and for MoE SAEs expert load and omega;
- plots/<variant>/browser.html: the feature browser (`saelens_moe.browse`) over
  synthetic activation vectors: each latent's density, activation histogram and
  top samples, and for MoE SAEs each expert's load, latents and omega.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sae_lens.saes.sae import TrainingSAE
from sae_lens.synthetic import SyntheticModel

from saelens_moe.browse import BrowseConfig, browse
from saelens_moe.ground_truth import (
    SIZES,
    AfterTraining,
    BenchmarkResult,
    Variant,
    markdown_table,
    quickstart_variants,
    run_benchmark,
    variant_slug,
    write_outputs,
)
from saelens_moe.metrics import (
    expert_layout,
    expert_load,
    max_cosines,
    omega_per_expert,
)
from saelens_moe.plots import plot_expert_load, plot_omega, plot_redundancy_histogram

DEFAULT_OUTPUT_DIR = Path("quickstart_output")
BROWSER_SAMPLES = 8192
BROWSER_NOTE = (
    "Quickstart: synthetic activation vectors from sae_lens.synthetic, with no "
    "language model, so examples are sample indices and there are no token "
    "contexts or logits."
)


class QuickstartOutput(NamedTuple):
    """What the quickstart produced."""

    benchmark: BenchmarkResult
    """Scores of every variant."""
    files: dict[str, Path]
    """Table, JSON and Pareto plot paths."""
    sae_dirs: dict[str, Path]
    """Variant name -> folder holding the SAE in SAELens format."""
    plot_dirs: dict[str, Path]
    """Variant name -> folder holding its PNGs and its feature browser (browser.html)."""


def _plotter(plots_root: Path, plot_dirs: dict[str, Path]) -> AfterTraining:
    def plot(variant: Variant, sae: TrainingSAE[Any], model: SyntheticModel) -> None:
        folder = plots_root / variant_slug(variant)
        layout = expert_layout(sae)
        plot_redundancy_histogram(
            max_cosines(sae.W_dec, layout.n_experts),
            folder / "redundancy.png",
            title=f"{variant.name}: max decoder cosine per latent",
        )
        if layout.has_router and layout.n_experts > 1:
            load = expert_load(sae, model.sample(8192), n_batches=4)
            plot_expert_load(load, folder / "expert_load.png")
        omega = omega_per_expert(sae)
        if omega is not None:
            plot_omega(omega, folder / "omega.png", title=f"{variant.name}: omega")
        browse(
            sae,
            folder / "browser.html",
            activations=model.sample(BROWSER_SAMPLES),
            config=BrowseConfig(
                n_tokens=BROWSER_SAMPLES,
                title=f"quickstart · {variant.name}",
                note=BROWSER_NOTE,
            ),
        )
        plot_dirs[variant.name] = folder

    return plot


def run_quickstart(
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    size_name: str = "quick",
    seed: int = 0,
    variants: Sequence[Variant] | None = None,
) -> QuickstartOutput:
    """Train, score, plot and save the quickstart variants into `output_dir`."""
    chosen = list(variants) if variants is not None else quickstart_variants()
    plot_dirs: dict[str, Path] = {}
    benchmark = run_benchmark(
        chosen,
        SIZES[size_name],
        seed=seed,
        save_dir=output_dir / "saes",
        after_training=_plotter(output_dir / "plots", plot_dirs),
        progress=True,
    )
    files = write_outputs(benchmark, output_dir)
    sae_dirs = {v.name: output_dir / "saes" / variant_slug(v) for v in chosen}
    return QuickstartOutput(benchmark, files, sae_dirs, plot_dirs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m saelens_moe.quickstart",
        description="Train TopK, Switch and Scale SAEs on synthetic data (offline, CPU).",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help="folder for the table, plots and trained SAEs (default: %(default)s)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a seconds-long run for smoke tests instead of the few-minute default",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> QuickstartOutput:
    """Run the quickstart from the command line and print the table."""
    args = parse_args(argv)
    output = run_quickstart(
        args.output_dir, "tiny" if args.tiny else "quick", args.seed
    )
    print(markdown_table(output.benchmark.results))
    print(f"\nTrue L0 of the synthetic data: {output.benchmark.true_l0:.2f}")
    print(f"Results, plots and SAEs written to {args.output_dir.resolve()}")
    return output


if __name__ == "__main__":
    main()
