"""What a training step spends on latents the batch never touched, and lazy Adam's answer.

    python benchmarks/sparse_step.py                   # all three studies below
    python benchmarks/sparse_step.py --study touched   # latents reached per step
    python benchmarks/sparse_step.py --study shares    # where a step's time goes
    python benchmarks/sparse_step.py --study fused     # fused vs SAELens's Adam
    python benchmarks/sparse_step.py --study rows      # lazy Adam's row update
    python benchmarks/sparse_step.py --quick           # small sizes, a few seconds

Sizes as `throughput.py`'s: d_in 768, 4096 tokens a step, K 32, Scale SAEs at
N 64, e 2 (N/e fixed) from d_sae 24576 to 786432.

- touched: the fraction of latents whose expert weights receive a gradient in one
  step (kept by some token, or picked by AuxK), on a fresh SAE fed uniform random
  input and fed Zipf-firing synthetic input (tokens summing 32 of 16384 random
  directions drawn with probability ~ 1/rank); and, as a proxy for a trained SAE
  whose latents fire with Zipf frequencies, the distinct latents among 4096 * 32
  draws with probability ~ 1/rank over d_sae.
- shares: one step of SAELens's trainer (dense Adam) and of lazy Adam, timed by
  phase (forward, backward, clipping, optimizer, zero_grad), with the forward and
  backward split by PyTorch's profiler into matmuls (dense, grouped and embedding
  bag), gradient zeroing / accumulation / layout copies, and the rest.
- fused: SAELens's per-tensor Adam against PyTorch's fused Adam at d_sae 24576,
  where every latent is touched (the same updates to float32 tolerance, checked),
  as the training-step ratio of TopK to Scale in `throughput.py`.

- rows: lazy Adam's update of the touched rows alone (`lazy_adam.lazy_adam_rows` on a
  [d_sae, d_in] weight and its moments, ROWS_SHARE of the rows at random), op by op
  (`fused=None`) and as the compiled kernel (`fused=True`), beside PyTorch's fused
  Adam on as many contiguous rows (the update's own traffic, no gathering).

Everything runs in this process; medians of interleaved repetitions where the
sizes fit side by side. Results: `results/sparse_step.{md,json}`.
"""

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from throughput import (
    FULL,
    QUICK,
    Candidate,
    Sizes,
    build,
    fused_adam_s,
    machine,
    trainer_for,
    zipf_draws,
    zipf_input,
)
from torch.profiler import ProfilerActivity, profile

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.lazy_adam import Coasting, LazyAdam, lazy_adam_rows
from saelens_moe.saes.sparse_gradients import LatentRows
from saelens_moe.trainer import MoESAETrainer

WIDTHS = [24576, 98304, 196608, 393216, 786432]
QUICK_WIDTHS = [1024, 4096]
N_EXPERTS, N_ACTIVE = 64, 2
RESULTS = Path(__file__).parent / "results"
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::_grouped_mm",
    "aten::_embedding_bag",
    "aten::_embedding_bag_forward_only",
    "aten::_embedding_bag_backward",
    "aten::_embedding_bag_per_sample_weights_backward",
    "aten::_embedding_bag_dense_backward",
)
ZEROING_OPS = (
    "aten::fill_",
    "aten::zero_",
    "aten::copy_",
    "aten::index_add_",
    "aten::add_",
    "aten::clone",
    "aten::contiguous",
)
"""Zero-filling, accumulation into gradients and layout copies."""


@dataclass(frozen=True)
class Setting:
    sizes: Sizes
    widths: list[int]
    n_experts: int
    reps: int


def scale_sae(sizes: Sizes, d_sae: int, n_experts: int) -> ScaleTrainingSAE:
    return ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            d_in=sizes.d_in,
            d_sae=d_sae,
            k=sizes.k,
            n_experts=n_experts,
            n_active_experts=N_ACTIVE,
        )
    )


def uniform_input(sizes: Sizes) -> torch.Tensor:
    return torch.randn(sizes.batch, sizes.d_in)


def touched_fraction(sae: ScaleTrainingSAE, x: torch.Tensor) -> float:
    """Latents with gradient rows after one forward and backward (AuxK included)."""
    optimizer = LazyAdam(sae, lr=1e-4)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"load_balancing": sae.cfg.load_balancing_coefficient},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    touched = optimizer.gather().latents.numel() / sae.cfg.d_sae
    optimizer.zero_grad()
    return touched


def touched_study(setting: Setting) -> list[dict[str, Any]]:
    sizes = setting.sizes
    rows = []
    for d_sae in setting.widths:
        torch.manual_seed(0)
        sae = scale_sae(sizes, d_sae, setting.n_experts)
        zipf_latents = zipf_draws(d_sae, sizes.batch * sizes.k).unique().numel()
        rows.append(
            {
                "d_sae": d_sae,
                "uniform_input": touched_fraction(sae, uniform_input(sizes)),
                "zipf_input": touched_fraction(sae, zipf_input(sizes)),
                "zipf_firing_latents": zipf_latents / d_sae,
                "bound_tokens_times_k": min(1.0, sizes.batch * sizes.k / d_sae),
            }
        )
        print(rows[-1], flush=True)
        del sae
        gc.collect()
    return rows


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _step_input(trainer: SAETrainer[Any, Any], x: torch.Tensor) -> TrainStepInput:
    """What the trainer's own step hands the SAE."""
    return TrainStepInput(
        sae_in=x,
        coefficients=trainer.get_coefficients(),
        dead_neuron_mask=trainer.dead_neurons,
        n_training_steps=trainer.n_training_steps,
        is_logging_step=False,
    )


def step_phases(trainer: SAETrainer[Any, Any], x: torch.Tensor) -> dict[str, float]:
    """One step of `trainer`'s own sequence, each phase timed."""
    sae, optimizer = trainer.sae, trainer.optimizer
    step_input = _step_input(trainer, x)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    loss = sae.training_forward_pass(step_input).loss
    phases["forward"] = time.perf_counter() - start
    phases["backward"] = timed(loss.backward)
    if isinstance(optimizer, LazyAdam):
        phases["backward"] += timed(optimizer.gather)
    clip = (
        trainer._clip_gradients
        if isinstance(trainer, MoESAETrainer)
        else partial(torch.nn.utils.clip_grad_norm_, sae.parameters(), 1.0)
    )
    phases["clipping"] = timed(clip)
    phases["optimizer"] = timed(optimizer.step)
    phases["zero_grad"] = timed(optimizer.zero_grad)
    return phases


def forward_backward_ops(
    trainer: SAETrainer[Any, Any], x: torch.Tensor
) -> dict[str, float]:
    """Self CPU seconds of the forward and backward, by kind of op."""
    step_input = _step_input(trainer, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.sae.training_forward_pass(step_input).loss.backward()
        if isinstance(trainer.optimizer, LazyAdam):
            trainer.optimizer.gather()
    trainer.optimizer.zero_grad()
    kinds = {"matmuls": 0.0, "zeroing_accumulation_copies": 0.0, "other": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in MATMUL_OPS:
            kinds["matmuls"] += seconds
        elif event.key in ZEROING_OPS:
            kinds["zeroing_accumulation_copies"] += seconds
        elif event.key.startswith("aten::"):
            kinds["other"] += seconds
    return kinds


def shares_study(setting: Setting, widths: Sequence[int]) -> list[dict[str, Any]]:
    sizes = setting.sizes
    rows = []
    for d_sae in widths:
        for optimizer in ("saelens", "lazy"):
            if 16 * 2 * sizes.d_in * d_sae > 0.8 * psutil.virtual_memory().available:
                print(f"d_sae {d_sae} {optimizer}: does not fit, skipped")
                continue
            torch.manual_seed(0)
            x = uniform_input(sizes)
            trainer = trainer_for(
                scale_sae(sizes, d_sae, setting.n_experts), x, optimizer=optimizer
            )
            trainer.step(x)  # warm-up: Adam's state exists
            phases = [step_phases(trainer, x) for _ in range(setting.reps)]
            median = {
                name: statistics.median(p[name] for p in phases) for name in phases[0]
            }
            row: dict[str, Any] = {"d_sae": d_sae, "optimizer": optimizer}
            row["phases_s"] = median
            row["step_s"] = sum(median.values())
            row["forward_backward_ops_s"] = forward_backward_ops(trainer, x)
            rows.append(row)
            print(row, flush=True)
            del trainer
            gc.collect()
    return rows


def fused_study(setting: Setting) -> dict[str, Any]:
    """SAELens's Adam against fused Adam: the same updates, and the step times of
    TopK and Scale (throughput.py's first N, e) at its width, interleaved."""
    sizes = setting.sizes
    torch.manual_seed(0)
    x = uniform_input(sizes)
    candidates = {
        "topk": Candidate("topk"),
        "scale": Candidate("scale", *sizes.experts[0]),
    }
    saes = {name: build(candidate, sizes) for name, candidate in candidates.items()}
    trainers = {}
    times: dict[tuple[str, str], list[float]] = {}
    for name, sae in saes.items():  # one SAE at a time: TopK's temporaries are large
        pair = {
            (name, optimizer): trainer_for(_copy(sae), x, optimizer=optimizer)
            for optimizer in ("saelens", "fused")
        }
        for rep in range(setting.reps + 1):
            keys = list(pair) if rep % 2 else list(pair)[::-1]
            for key in keys:
                elapsed = timed(partial(pair[key].step, x))
                if rep:
                    times.setdefault(key, []).append(elapsed)
        trainers |= pair
    medians = {
        f"{name} {opt}": statistics.median(t) for (name, opt), t in times.items()
    }
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(
            trainers[("scale", "saelens")].sae.parameters(),
            trainers[("scale", "fused")].sae.parameters(),
            strict=True,
        )
    )
    return {
        "d_sae": sizes.d_sae,
        "step_s": medians,
        "topk_over_scale_saelens_adam": medians["topk saelens"]
        / medians["scale saelens"],
        "topk_over_scale_fused_adam": medians["topk fused"] / medians["scale fused"],
        "max_weight_difference_after_steps": difference,
        "steps": setting.reps + 1,
    }


ROWS_D_SAE, QUICK_ROWS_D_SAE = 2**19, 2**12
ROWS_SHARE = 0.22
"""The share of 2^19 latents a uniform-input step touched in the step curve."""


def rows_study(setting: Setting, d_sae: int) -> dict[str, Any]:
    """Seconds of one row update of one matrix, eager and compiled (interleaved, the
    same draws), and of fused Adam on as many contiguous rows."""
    d_in, n_rows = setting.sizes.d_in, round(ROWS_SHARE * d_sae)
    torch.manual_seed(0)
    state = [
        torch.randn(d_sae, d_in),
        torch.zeros(d_sae, d_in),
        torch.zeros(d_sae, d_in),
    ]
    updated_at = torch.zeros(d_sae)
    coasting, clock_state = Coasting(_row_group(False)["betas"]), {}
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for rep in range(setting.reps + 1):  # the first compiles
        latents = torch.randperm(d_sae)[:n_rows].sort().values
        gradient = LatentRows(latents, torch.randn(n_rows, d_in))
        for name in times if rep % 2 else list(times)[::-1]:
            group = _row_group(fused=name == "compiled")
            rows = RowStep(coasting, clock_state, state, updated_at, group)
            elapsed = timed(partial(rows.step, gradient))
            if rep:
                times[name].append(elapsed)
    del state
    gc.collect()
    return {
        "d_sae": d_sae,
        "d_in": d_in,
        "rows": n_rows,
        "eager_s": statistics.median(times["eager"]),
        "compiled_s": statistics.median(times["compiled"]),
        "fused_adam_contiguous_s": fused_adam_s([(n_rows, d_in)], setting.reps),
    }


class RowStep(NamedTuple):
    """What `lazy_adam_rows` updates, and the clock one optimizer step advances."""

    coasting: Coasting
    clock_state: dict[Any, Any]
    weight_and_moments: list[torch.Tensor]
    updated_at: torch.Tensor
    group: dict[str, Any]

    def step(self, gradient: LatentRows) -> None:
        device = gradient.rows.device
        clock = self.coasting.begin_step(self.clock_state, device)
        lazy_adam_rows(
            gradient, self.weight_and_moments, self.updated_at, self.group, clock
        )
        self.coasting.end_step(self.clock_state, self.group["lr"])


def _row_group(fused: bool) -> dict[str, Any]:
    return {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "fused": fused or None}


def _copy(sae: TrainingSAE[Any]) -> TrainingSAE[Any]:
    clone = type(sae)(sae.cfg)
    clone.load_state_dict(sae.state_dict())
    return clone


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "touched" in results:
        lines += [
            "Fraction of latents reached by one step's gradient "
            f"(4096 tokens, K 32, N {results['n_experts']}, e {N_ACTIVE}):",
            "",
            "| d_sae | uniform input, fresh SAE | Zipf input, fresh SAE | Zipf-firing latents | bound T*K/d_sae |",
            "|---|---|---|---|---|",
        ]
        for row in results["touched"]:
            lines.append(
                f"| {row['d_sae']} | {row['uniform_input']:.1%} | {row['zipf_input']:.1%} "
                f"| {row['zipf_firing_latents']:.1%} | {row['bound_tokens_times_k']:.0%} |"
            )
    if "shares" in results:
        lines += [
            "",
            "Where one step's time goes (seconds; uniform input):",
            "",
            "| d_sae | optimizer | step | forward | backward | clipping | optimizer step | zero_grad "
            "| fwd+bwd matmuls | fwd+bwd zeroing/accumulation/copies | optimizer share |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["shares"]:
            phases, ops = row["phases_s"], row["forward_backward_ops_s"]
            lines.append(
                f"| {row['d_sae']} | {row['optimizer']} | {row['step_s']:.3f} "
                + " ".join(
                    f"| {phases[name]:.3f}"
                    for name in (
                        "forward",
                        "backward",
                        "clipping",
                        "optimizer",
                        "zero_grad",
                    )
                )
                + f" | {ops['matmuls']:.3f} | {ops['zeroing_accumulation_copies']:.3f} "
                f"| {phases['optimizer'] / row['step_s']:.0%} |"
            )
    if "fused" in results:
        fused = results["fused"]
        lines += ["", f"Fused Adam at d_sae {fused['d_sae']} (step seconds):", ""]
        lines += ["| SAE | SAELens's Adam | fused Adam |", "|---|---|---|"]
        for name in ("topk", "scale"):
            steps = fused["step_s"]
            lines.append(
                f"| {name} | {steps[name + ' saelens']:.3f} | {steps[name + ' fused']:.3f} |"
            )
        lines += [
            "",
            f"TopK / Scale step time: {fused['topk_over_scale_saelens_adam']:.2f}x with "
            f"SAELens's Adam, {fused['topk_over_scale_fused_adam']:.2f}x with fused Adam; "
            f"largest weight difference after {fused['steps']} steps: "
            f"{fused['max_weight_difference_after_steps']:.1e}.",
        ]
    if "rows" in results:
        rows = results["rows"]
        lines += [
            "",
            f"Lazy Adam's row update of one [{rows['d_sae']}, {rows['d_in']}] matrix, "
            f"{rows['rows']} rows (seconds):",
            "",
            "| op by op | compiled | fused Adam on as many contiguous rows |",
            "|---|---|---|",
            f"| {rows['eager_s']:.3f} | {rows['compiled_s']:.3f} "
            f"| {rows['fused_adam_contiguous_s']:.3f} |",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--study", choices=["touched", "shares", "fused", "rows", "all"], default="all"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--shares-widths", type=int, nargs="+", help="widths of the shares study"
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    setting = Setting(
        QUICK if args.quick else FULL,
        QUICK_WIDTHS if args.quick else WIDTHS,
        4 if args.quick else N_EXPERTS,
        args.reps,
    )
    stem = "sparse_step_quick" if args.quick else "sparse_step"
    json_path = args.output_dir / f"{stem}.json"
    results: dict[str, Any] = (
        json.loads(json_path.read_text()) if json_path.exists() else {}
    )
    results |= {"n_experts": setting.n_experts, "machine": machine()}
    if args.study in ("touched", "all"):
        results["touched"] = touched_study(setting)
    if args.study in ("shares", "all"):
        widths = args.shares_widths or setting.widths[:-1]
        results["shares"] = shares_study(setting, widths)
    if args.study in ("fused", "all"):
        results["fused"] = fused_study(setting)
    if args.study in ("rows", "all"):
        results["rows"] = rows_study(
            setting, QUICK_ROWS_D_SAE if args.quick else ROWS_D_SAE
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.output_dir / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
