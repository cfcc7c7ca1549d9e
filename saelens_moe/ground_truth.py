"""Train SAEs on `sae_lens.synthetic` ground truth and score them against it.

Every variant trains through SAELens's `SyntheticSAERunner` on the same synthetic
model (a feature hierarchy, low-rank correlations, Zipf-distributed firing) with the
same d_sae, the same k (L0) and the same token stream (fixed seeds), then is
scored against the known features: explained variance, MCC, uniqueness, decoder
redundancy, dead latents, expert-load entropy, expert purity against the
hierarchy's trees, encoder multiply-adds per token and training wall time.

This is what `python -m saelens_moe.quickstart` runs; `benchmarks/synthetic.py`
adds the benchmark's variant sets, its larger size and the defaults study.
"""

import json
import os
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens.config import LoggingConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.synthetic import (
    HierarchyConfig,
    LowRankCorrelationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
    ZipfianFiringProbabilityConfig,
    eval_sae_on_synthetic_data,
    synthetic_sae_runner,
)
from tqdm.auto import tqdm
from typing_extensions import override

# importing saelens_moe.* runs saelens_moe/__init__.py, which registers "scale" and "switch"
from saelens_moe.metrics import (
    compute_sae_metrics,
    expert_specialisation,
    feature_trees,
)
from saelens_moe.plots import ParetoPoint, plot_pareto
from saelens_moe.trainer import MoESAETrainer


@dataclass(frozen=True)
class BenchmarkSize:
    """Sizes of the synthetic model, the SAEs and the training run."""

    name: str
    """Size label ("tiny", "quick", "full")."""
    num_features: int
    """Ground-truth features in the synthetic model."""
    hidden_dim: int
    """Width of the synthetic activations (the SAEs' d_in)."""
    d_sae: int
    """Latents of every SAE (equal width)."""
    n_experts: int
    """Experts N of the MoE SAEs."""
    k: int
    """Latents kept per token by every SAE (equal L0)."""
    training_samples: int
    """Tokens each SAE trains on (equal tokens)."""
    batch_size: int
    """Training batch size in tokens."""
    eval_samples: int
    """Tokens scored at the end."""
    tree_roots: int
    """Hierarchy trees in the synthetic model."""
    branching_factor: int
    """Children per hierarchy node."""
    lr: float = 1e-3
    """Adam learning rate, shared by every variant."""


SIZES: dict[str, BenchmarkSize] = {
    "tiny": BenchmarkSize("tiny", 64, 16, 64, 4, 4, 65_536, 256, 4_096, 4, 3, lr=3e-3),
    "quick": BenchmarkSize("quick", 256, 48, 256, 8, 6, 1_500_000, 1024, 50_000, 12, 4),
}


@dataclass(frozen=True)
class Variant:
    """One SAE configuration of the benchmark."""

    name: str
    """Row label."""
    architecture: str
    """SAELens architecture key: "topk", "batchtopk", "switch" or "scale"."""
    options: dict[str, Any] = field(default_factory=dict[str, Any])
    """Training-config fields beyond d_in, d_sae and k (n_experts is added for MoE)."""
    runner_options: dict[str, Any] = field(default_factory=dict[str, Any])
    """`SyntheticSAERunnerConfig` fields (lr schedule, dead_feature_window, ...)."""
    lazy_adam: bool = False
    """Train with `saelens_moe.trainer.MoESAETrainer`'s lazy Adam instead of
    SAELens's trainer and Adam."""


def quickstart_variants() -> list[Variant]:
    """TopK for reference, Switch and Scale e=2."""
    return [
        Variant("topk", "topk"),
        Variant("switch", "switch"),
        Variant("scale e=2", "scale", {"n_active_experts": 2}),
    ]


def synthetic_model_config(size: BenchmarkSize, seed: int) -> SyntheticModelConfig:
    """Hierarchy, correlations and Zipf firing, all seeded."""
    return SyntheticModelConfig(
        num_features=size.num_features,
        hidden_dim=size.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.6, max_prob=0.4, min_prob=0.005
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=size.tree_roots,
            branching_factor=size.branching_factor,
            max_depth=2,
            mutually_exclusive_portion=0.5,
            compensate_probabilities=True,
        ),
        correlation=LowRankCorrelationConfig(rank=8, correlation_scale=0.1, seed=seed),
        std_firing_magnitudes=0.2,
        seed=seed,
    )


def sae_config(variant: Variant, size: BenchmarkSize) -> TrainingSAEConfig:
    """The variant's SAELens training config at this size."""
    fields: dict[str, Any] = {"d_in": size.hidden_dim, "d_sae": size.d_sae, "k": size.k}
    if variant.architecture in ("scale", "switch"):
        fields["n_experts"] = size.n_experts
    fields |= variant.options
    config_class = get_sae_training_class(variant.architecture)[1]
    return config_class(**fields)


@dataclass(frozen=True)
class VariantResult:
    """Scores of one trained variant."""

    name: str
    """Variant label."""
    architecture: str
    """SAELens architecture key."""
    n_experts: int
    """Experts N (1 for dense)."""
    n_active_experts: int
    """Experts per token e (1 for dense)."""
    explained_variance: float
    """Fraction of variance explained on fresh synthetic tokens."""
    mcc: float
    """Mean correlation coefficient of decoder rows with the true features."""
    uniqueness: float
    """Fraction of latents whose best true feature no other latent has."""
    l0: float
    """Mean active latents per token at evaluation."""
    dead_latents: int
    """Latents that never fired on the evaluation tokens."""
    redundancy_08: float
    """Fraction of latents with a decoder cosine > 0.8 to another latent."""
    redundancy_09: float
    """Fraction of latents with a decoder cosine > 0.9 to another latent."""
    mean_max_cosine: float
    """Mean over latents of the max decoder cosine."""
    expert_load_entropy: float | None
    """Normalised entropy of expert selection (None for dense SAEs)."""
    purity: float | None
    """Share of matched latents in their expert's majority tree (MoE, N > 1)."""
    chance_purity: float | None
    """Purity with trees shuffled across experts: the no-specialisation baseline."""
    encoder_flops_per_token: int
    """Encoder multiply-adds per token."""
    train_seconds: float
    """Wall time of training only."""
    metrics: dict[str, Any]
    """Everything `compute_sae_metrics` and `expert_specialisation` returned."""


class _ReplayedActivations(torch.nn.Module):
    """Stands in for a `FeatureDictionary`: hands out a recorded token stream in order."""

    def __init__(self, stream: torch.Tensor, feature_vectors: torch.Tensor) -> None:
        super().__init__()
        self.stream = stream  # [tokens, d_in]
        self.feature_vectors = feature_vectors  # read for its device only
        self.position = 0

    @override
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        if self.position + batch > self.stream.shape[0]:
            raise RuntimeError("the recorded training stream is exhausted")
        out = self.stream[self.position : self.position + batch]
        self.position += batch
        return out


class _NoFeatures(torch.nn.Module):
    """Stands in for the activation generator while a recording is replayed."""

    @override
    def forward(self, batch_size: int) -> torch.Tensor:
        return torch.empty(batch_size, 0)


def record_stream(
    model: SyntheticModel, size: BenchmarkSize, seed: int
) -> torch.Tensor:
    """The training tokens every variant sees, generated once. [training_samples, d_in]

    Generating hierarchical, correlated activations costs more than a training step
    at the realistic size; replaying one recording also gives every variant exactly
    the same tokens.
    """
    torch.manual_seed(seed)
    n_batches = -(-size.training_samples // size.batch_size)  # the trainer's count
    return torch.cat([model.sample(size.batch_size) for _ in range(n_batches)])


class _Replay:
    """What `SyntheticSAERunner` reads of a `SyntheticModel`, replaying a recording."""

    def __init__(self, model: SyntheticModel, stream: torch.Tensor) -> None:
        self.cfg = model.cfg
        self.feature_dict = _ReplayedActivations(
            stream, model.feature_dict.feature_vectors
        )
        self.activation_generator = _NoFeatures()


def train_variant(
    variant: Variant,
    size: BenchmarkSize,
    model: SyntheticModel,
    seed: int,
    output_path: Path | None,
    stream: torch.Tensor | None = None,
    prepare: Callable[[TrainingSAE[Any]], None] | None = None,
) -> tuple[TrainingSAE[Any], float]:
    """Train one variant through `SyntheticSAERunner`; the SAE and training seconds.

    With `stream` (`record_stream`), the runner trains on that recording; `prepare`
    sees the freshly initialised SAE before the first step (to re-initialise or
    observe it).
    """
    torch.manual_seed(seed)
    if stream is not None:
        model = cast(SyntheticModel, _Replay(model, stream))
    runner_options: dict[str, Any] = {"lr": size.lr, **variant.runner_options}
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=model.cfg,
        sae=sae_config(variant, size),
        training_samples=size.training_samples,
        batch_size=size.batch_size,
        eval_samples=0,
        run_final_eval=False,
        checkpoint_path=None,
        output_path=None if output_path is None else str(output_path),
        logger=LoggingConfig(log_to_wandb=False),
        **runner_options,
    )
    runner = SyntheticSAERunner(runner_cfg, override_synthetic_model=model)
    if prepare is not None:
        prepare(runner.sae)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with _trainer_of(variant):
        result = runner.run()
    return result.sae, time.perf_counter() - start


@contextmanager
def _trainer_of(variant: Variant) -> Generator[None]:
    """`SyntheticSAERunner.run` builds SAELens's `SAETrainer` by name, with no way to
    pass another: for a lazy-Adam variant, that name means `MoESAETrainer` with
    lazy Adam as `--lazy_adam` trains (its compiled row update) while the run lasts."""
    if not variant.lazy_adam:
        yield
        return
    module = synthetic_sae_runner
    saelens_trainer = module.SAETrainer
    module.SAETrainer = partial(MoESAETrainer, lazy_adam=True)  # pyright: ignore[reportAttributeAccessIssue]
    try:
        yield
    finally:
        module.SAETrainer = saelens_trainer


def evaluate_variant(
    variant: Variant,
    sae: TrainingSAE[Any],
    model: SyntheticModel,
    size: BenchmarkSize,
    train_seconds: float,
    seed: int,
) -> VariantResult:
    """Score a trained SAE against the synthetic model's ground truth."""
    torch.manual_seed(seed + 1)
    truth = eval_sae_on_synthetic_data(
        sae,
        model.feature_dict,
        model.activation_generator,
        num_samples=size.eval_samples,
        batch_size=size.batch_size,
    )
    torch.manual_seed(seed + 2)
    metrics = compute_sae_metrics(
        sae, model.sample(min(size.eval_samples, 20_000)), n_batches=10
    )
    layout = metrics.layout
    specialisation = None
    if layout.n_experts > 1 and model.hierarchy is not None:
        specialisation = expert_specialisation(
            sae.W_dec,
            layout.n_experts,
            model.feature_dict.feature_vectors,
            feature_trees(model.hierarchy.roots, size.num_features),
        )
    overall = metrics.redundancy.overall
    details = metrics.to_dict() | (
        {} if specialisation is None else specialisation.to_dict()
    )
    return VariantResult(
        name=variant.name,
        architecture=variant.architecture,
        n_experts=layout.n_experts,
        n_active_experts=layout.n_active_experts,
        explained_variance=truth.explained_variance,
        mcc=truth.mcc,
        uniqueness=truth.uniqueness,
        l0=truth.sae_l0,
        dead_latents=truth.dead_latents,
        redundancy_08=overall.fraction_above[0.8],
        redundancy_09=overall.fraction_above[0.9],
        mean_max_cosine=overall.mean_max_cosine,
        expert_load_entropy=(
            None
            if metrics.expert_load is None
            else metrics.expert_load.selected_entropy
        ),
        purity=None if specialisation is None else specialisation.overall_purity,
        chance_purity=None if specialisation is None else specialisation.chance_purity,
        encoder_flops_per_token=metrics.encoder_flops_per_token,
        train_seconds=train_seconds,
        metrics=details,
    )


@dataclass(frozen=True)
class BenchmarkResult:
    """All variants of one benchmark run and how it was run."""

    size: BenchmarkSize
    """Sizes used."""
    seed: int
    """Seed of the synthetic model, SAE initialisation and data stream."""
    results: list[VariantResult]
    """One entry per variant, in order."""
    load_average: tuple[float, float]
    """1-minute load average at start and at end (timings are only comparable at low load)."""
    true_l0: float
    """Mean number of active ground-truth features per token."""
    n_threads: int
    """torch intra-op threads used."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "size": asdict(self.size),
            "seed": self.seed,
            "load_average": list(self.load_average),
            "true_l0": self.true_l0,
            "cpu_count": os.cpu_count(),
            "torch_threads": self.n_threads,
            "results": [asdict(result) for result in self.results],
        }


@contextmanager
def torch_threads(n_threads: int | None) -> Generator[None]:
    """Run with `n_threads` intra-op threads (None: leave as is), then restore.

    Small SAEs train fastest single-threaded, and on a shared machine extra threads
    spin against other processes (measured: 1.4 s vs 48 s for the tiny size at
    load 5 on 2 cores).
    """
    previous = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


AfterTraining = Callable[[Variant, TrainingSAE[Any], SyntheticModel], None]


def run_benchmark(
    variants: Sequence[Variant],
    size: BenchmarkSize,
    seed: int = 0,
    save_dir: Path | None = None,
    after_training: AfterTraining | None = None,
    progress: bool = False,
    n_threads: int | None = 1,
    replay: bool = False,
) -> BenchmarkResult:
    """Train and score every variant on one synthetic model.

    With `save_dir`, each trained SAE is written in SAELens format to
    `save_dir/<variant_slug(variant)>`. `after_training` sees each trained
    (training-class) SAE before the next variant starts. `progress` adds a
    progress bar over variants to SAELens's own training bars. `n_threads` sets
    torch's intra-op threads for the run (see `torch_threads`). `replay` generates
    the training tokens once and replays them to every variant (`record_stream`).
    """
    with torch_threads(n_threads):
        return _run_benchmark(
            variants, size, seed, save_dir, after_training, progress, replay
        )


def _run_benchmark(
    variants: Sequence[Variant],
    size: BenchmarkSize,
    seed: int,
    save_dir: Path | None,
    after_training: AfterTraining | None,
    progress: bool,
    replay: bool,
) -> BenchmarkResult:
    model = SyntheticModel(synthetic_model_config(size, seed))
    stream = record_stream(model, size, seed) if replay else None
    torch.manual_seed(seed + 3)
    true_l0 = (model.activation_generator.sample(4096) > 0).float().sum(-1).mean()
    load_start = os.getloadavg()[0]
    results: list[VariantResult] = []
    for variant in tqdm(variants, desc="variants", disable=not progress):
        out = None if save_dir is None else save_dir / variant_slug(variant)
        sae, seconds = train_variant(variant, size, model, seed, out, stream)
        results.append(evaluate_variant(variant, sae, model, size, seconds, seed))
        if after_training is not None:
            after_training(variant, sae, model)
    return BenchmarkResult(
        size,
        seed,
        results,
        (load_start, os.getloadavg()[0]),
        true_l0.item(),
        torch.get_num_threads(),
    )


def variant_slug(variant: Variant) -> str:
    """File-system name of a variant."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in variant.name)


def _fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


TABLE_HEADER = (
    "| variant | EV | MCC | uniqueness | L0 | redundancy>0.8 | redundancy>0.9 "
    "| dead | load entropy | purity (chance) | encoder MACs/token | train s |"
)


def markdown_table(results: Sequence[VariantResult]) -> str:
    """The results as a GitHub markdown table."""
    lines = [TABLE_HEADER, "|" + " --- |" * TABLE_HEADER.count(" | ") + " --- |"]
    for r in results:
        purity = (
            "-" if r.purity is None else f"{r.purity:.3f} ({_fmt(r.chance_purity)})"
        )
        lines.append(
            f"| {r.name} | {_fmt(r.explained_variance)} | {_fmt(r.mcc)} "
            f"| {_fmt(r.uniqueness)} | {_fmt(r.l0, 1)} | {_fmt(r.redundancy_08)} "
            f"| {_fmt(r.redundancy_09)} | {r.dead_latents} "
            f"| {_fmt(r.expert_load_entropy)} | {purity} "
            f"| {r.encoder_flops_per_token} | {_fmt(r.train_seconds, 1)} |"
        )
    return "\n".join(lines)


def pareto_points(results: Sequence[VariantResult]) -> list[ParetoPoint]:
    """Explained variance against encoder cost for each variant."""
    return [
        ParetoPoint(r.name, r.encoder_flops_per_token, r.explained_variance)
        for r in results
    ]


def write_outputs(benchmark: BenchmarkResult, output_dir: Path) -> dict[str, Path]:
    """Write results.md, results.json and pareto.png into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = output_dir / "results.md"
    table.write_text(markdown_table(benchmark.results) + "\n")
    results_json = output_dir / "results.json"
    results_json.write_text(json.dumps(benchmark.to_dict(), indent=2))
    pareto = plot_pareto(
        pareto_points(benchmark.results),
        output_dir / "pareto.png",
        title=f"Synthetic benchmark ({benchmark.size.name}): EV vs encoder cost",
    )
    return {"table": table, "json": results_json, "pareto": pareto}
