"""Speed and memory of Scale/Switch SAEs against SAELens TopK at the same width.

Everything runs in one process with interleaved repetitions; tables report
medians. Per SAE: inference encode tokens/s (SAELens's dense `encode`, and
`encode_sparse` for the MoE SAEs), full training-step tokens/s through SAELens's
`SAETrainer.step` (forward, backward, clipping, Adam, the trainer's bookkeeping),
the transient memory of a warm training step (peak resident memory during the
step above what the parameters, gradients-free optimizer state and caches held
before it, sampled in a fresh process), and the encoder's achieved
GFLOP/s on its useful FLOPs next to a plain fp32 matmul timed in the same run.
A second table follows a Scale SAE's forward+backward (no optimizer) as the
number of experts doubles with e*m fixed, each curve in a fresh process: once
with PyTorch's default CPU allocator and once with `THP_MEM_ALLOC_ENABLE=1`
(large tensors on transparent huge pages, so fresh gradient tensors cost far
fewer page faults).

On a GPU (`--device cuda`, optionally `--dtype bfloat16`) it runs the same
side-by-side once per width of `--widths` (d_sae 24576, 131072 and 524288 by
default, with m = 256 latents per expert and e = 3, so e*m = 768 at every width:
768 = 3 * 256 is the only split with whole expert counts at these powers of two),
records the peak GPU memory of a training step instead of resident memory, and
skips the CPU-only allocator curves and profiles. `--autocast` trains and encodes
under SAELens's bfloat16 autocast (parameters stay in `--dtype`). Every row
records the path its expert matmuls took (`expert_matmul_path`): "grouped" (one
grouped matmul, no host sync), "grouped_host_sync" (PyTorch's fallback on CUDA:
group ends copied to the host, one mm per expert) or "every_expert".

    python benchmarks/throughput.py            # GPT-2 scale: d_in 768, d_sae 24576
    python benchmarks/throughput.py --quick    # small sizes, a few seconds
    python benchmarks/throughput.py --device cuda --dtype bfloat16
    python benchmarks/throughput.py --device cuda --autocast   # float32 + autocast
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch.profiler import ProfilerActivity, profile

from saelens_moe import (
    ScaleSAE,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from saelens_moe.lazy_adam import LazyAdam
from saelens_moe.saes.fast.grouped import (
    expert_matmul_path_of,
    selected_expert_matmuls,
)
from saelens_moe.trainer import MoESAETrainer

GIB = 1024**3
SCALING_E = 2
"""Experts per token in the scaling curve."""
ALLOCATORS: dict[str, dict[str, str]] = {
    "default": {},
    "huge_pages": {"THP_MEM_ALLOC_ENABLE": "1"},
}


@dataclass
class Sizes:
    d_in: int
    d_sae: int
    batch: int
    k: int
    experts: list[tuple[int, int]]
    """(n_experts, n_active_experts) pairs for Scale SAE; Switch runs at each N."""
    scaling_d_sae: list[int]
    scaling_block: int
    """Latents per expert in the scaling curve (e*m fixed at SCALING_E * this)."""


FULL = Sizes(
    768, 24576, 4096, 32, [(64, 2), (64, 8), (16, 2)], [12288, 24576, 49152, 98304], 384
)
QUICK = Sizes(64, 1024, 256, 8, [(16, 2), (4, 2)], [512, 1024, 2048], 64)
GPU_WIDTHS = [24576, 131072, 524288]
GPU_BLOCK, GPU_E = 256, 3
"""Latents per expert and experts per token of the width sweep: e*m = 768."""


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype every SAE and batch of the run lives."""

    device: str = "cpu"
    dtype: str = "float32"
    autocast: bool = False
    """Train and encode under bfloat16 autocast, as SAELens's `autocast=True`."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in."""
        return torch.bfloat16 if self.autocast else self.torch_dtype

    def autocast_context(self) -> Any:
        if not self.autocast:
            return nullcontext()
        device_type = torch.device(self.device).type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


def width_sweep(base: Sizes, widths: list[int]) -> list[Sizes]:
    """One set of sizes per width, each with (N, e) at m = GPU_BLOCK, e = GPU_E."""
    return [
        Sizes(
            base.d_in, width, base.batch, base.k, [(width // GPU_BLOCK, GPU_E)], [], 0
        )
        for width in widths
    ]


@dataclass
class Candidate:
    name: str
    n_experts: int | None = None
    n_active_experts: int | None = None
    encoder_flops_per_token: int = 0
    encode_s: list[float] = field(default_factory=list)
    encode_sparse_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    step_transient_gib: float | None = None
    matmul_path: str | None = None
    """The expert matmuls' path (`expert_matmul_path`); None for TopK."""
    error: str | None = None


def candidates_for(sizes: Sizes) -> list[Candidate]:
    topk = [
        Candidate(name) for name in ("topk", "topk-sparse", "topk-sparse-no-rescale")
    ]
    scale = [Candidate("scale", n, e) for n, e in sizes.experts]
    scale.insert(1, Candidate("scale-lazy", *sizes.experts[0]))
    switch_widths = sorted({n for n, _ in sizes.experts}, reverse=True)
    switch = [Candidate("switch", n, 1) for n in switch_widths]
    every = topk + scale + switch
    for candidate in every:
        candidate.encoder_flops_per_token = encoder_flops(sizes, candidate)
    return every


def optimizer_of(candidate: Candidate) -> str:
    """`trainer_for`'s optimizer: lazy Adam for "scale-lazy", else SAELens's Adam."""
    return "lazy" if candidate.name == "scale-lazy" else "saelens"


def encoder_flops(sizes: Sizes, candidate: Candidate) -> int:
    """Useful encoder FLOPs per token (2 per multiply-add): router + selected experts."""
    if candidate.n_experts is None or candidate.n_active_experts is None:
        return 2 * sizes.d_in * sizes.d_sae
    block = sizes.d_sae // candidate.n_experts
    return 2 * sizes.d_in * (candidate.n_experts + candidate.n_active_experts * block)


def build(
    candidate: Candidate, sizes: Sizes, placement: Placement = Placement()
) -> TrainingSAE[Any]:
    common: dict[str, Any] = {
        "d_in": sizes.d_in,
        "d_sae": sizes.d_sae,
        "k": sizes.k,
        "device": placement.device,
        "dtype": placement.dtype,
    }
    if candidate.name.startswith("topk"):
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(
                **common,
                use_sparse_activations=candidate.name != "topk",
                rescale_acts_by_decoder_norm=candidate.name != "topk-sparse-no-rescale",
            )
        )
    n_experts, n_active = candidate.n_experts, candidate.n_active_experts
    assert n_experts is not None and n_active is not None, candidate.name
    if candidate.name == "switch":
        return SwitchTrainingSAE(SwitchTrainingSAEConfig(**common, n_experts=n_experts))
    # "scale" and "scale-lazy": the same SAE; the latter trained with lazy Adam
    return ScaleTrainingSAE(
        ScaleTrainingSAEConfig(**common, n_experts=n_experts, n_active_experts=n_active)
    )


def exported(sae: TrainingSAE[Any], placement: Placement = Placement()) -> SAE[Any]:
    """The inference SAE that SAELens would load from this training SAE's export."""
    with tempfile.TemporaryDirectory() as folder:
        sae.save_inference_model(folder)
        return SAE.load_from_disk(folder, device=placement.device)


def matmul_path(sae: TrainingSAE[Any], placement: Placement) -> str | None:
    """The path a Scale / Switch SAE's expert matmuls take in this placement."""
    if not isinstance(sae, ScaleTrainingSAE):
        return None
    block_size = sae.cfg.d_sae // sae.cfg.n_experts
    return expert_matmul_path_of(sae.W_enc, block_size, placement.compute_dtype)


def trainer_for(
    sae: TrainingSAE[Any],
    batch: torch.Tensor,
    autocast: bool = False,
    optimizer: str = "saelens",
) -> SAETrainer[Any, Any]:
    """SAELens's trainer ("saelens": its per-tensor Adam), or ours with fused Adam
    ("fused") or lazy Adam ("lazy"), fed `batch` forever."""

    def same_batch() -> Iterator[torch.Tensor]:
        while True:
            yield batch

    cfg = SAETrainerConfig(
        total_training_samples=10**12,
        train_batch_size_samples=batch.shape[0],
        lr_end=3e-5,
        device=str(batch.device),
        autocast=autocast,
    )
    if optimizer == "saelens":
        return SAETrainer(cfg=cfg, sae=sae, data_provider=same_batch())
    return MoESAETrainer(
        lazy_adam=optimizer == "lazy",
        fused_adam=optimizer in ("fused", "lazy"),
        cfg=cfg,
        sae=sae,
        data_provider=same_batch(),
    )


def timed(fn: Callable[[], object], placement: Placement = Placement()) -> float:
    placement.synchronize()
    start = time.perf_counter()
    fn()
    placement.synchronize()
    return time.perf_counter() - start


def gpu_step_transient_gib(trainer: SAETrainer[Any, Any], x: torch.Tensor) -> float:
    """Peak GPU memory of a warm training step above what was allocated before it."""
    torch.cuda.synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    trainer.step(x)
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - before) / GIB


def transient_gib(fn: Callable[[], object], interval_s: float = 0.0005) -> float:
    """Peak resident memory while fn runs, above the resident memory before it.

    Run in a process started with `MALLOC_MMAP_THRESHOLD_` small (see
    `step_transient_in_subprocess`) so that every large tensor is its own mapping
    and resident memory follows live tensors. Sampled every `interval_s`.
    """
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak, process.memory_info().rss) - before) / GIB


def step_transient_in_subprocess(candidate: Candidate, quick: bool) -> float:
    """A warm training step's transient memory, measured in a fresh process."""
    command = [sys.executable, __file__, "--transient-of", candidate.name]
    command += [str(candidate.n_experts or 0), str(candidate.n_active_experts or 0)]
    command += ["--quick"] if quick else []
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def print_transient_of(sizes: Sizes, name: str, n_experts: int, n_active: int) -> None:
    """Entry point of the memory subprocess: two warm steps, then one measured."""
    candidate = Candidate(name, n_experts or None, n_active or None)
    torch.manual_seed(0)
    x = torch.randn(sizes.batch, sizes.d_in)
    trainer = trainer_for(build(candidate, sizes), x, optimizer=optimizer_of(candidate))
    trainer.step(x)
    trainer.step(x)
    print(transient_gib(partial(trainer.step, x)))


def run_once(
    trainer: SAETrainer[Any, Any],
    inference: SAE[Any],
    x: torch.Tensor,
    placement: Placement,
) -> tuple[float, float | None, float]:
    with torch.no_grad(), placement.autocast_context():
        encode = timed(lambda: inference.encode(x), placement)
        sparse = (
            timed(lambda: inference.encode_sparse(x), placement)
            if isinstance(inference, ScaleSAE)
            else None
        )
    return encode, sparse, timed(lambda: trainer.step(x), placement)


def measure(
    sizes: Sizes, reps: int, with_memory: bool, placement: Placement = Placement()
) -> tuple[list[Candidate], list[float]]:
    """Interleaved repetitions over every candidate; the first one is a warm-up."""
    torch.manual_seed(0)
    tensor = partial(torch.randn, device=placement.device, dtype=placement.torch_dtype)
    x, weight = tensor(sizes.batch, sizes.d_in), tensor(sizes.d_in, sizes.d_sae)
    candidates = candidates_for(sizes)
    runs = []
    for candidate in candidates:
        sae = build(candidate, sizes, placement)
        candidate.matmul_path = matmul_path(sae, placement)
        trainer = trainer_for(sae, x, placement.autocast, optimizer_of(candidate))
        runs.append((candidate, trainer, exported(sae, placement)))
    matmul_s = []
    for rep in range(reps + 1):
        matmul = timed(lambda: x @ weight, placement)
        for candidate, trainer, inference in runs:
            if candidate.error is not None:
                continue
            try:
                encode, sparse, step = run_once(trainer, inference, x, placement)
            except RuntimeError as error:
                candidate.error = str(error).splitlines()[0][:100]
                continue
            if rep:
                candidate.encode_s.append(encode)
                candidate.step_s.append(step)
                if sparse is not None:
                    candidate.encode_sparse_s.append(sparse)
        if rep:
            matmul_s.append(matmul)
    if placement.device.startswith("cuda"):
        for candidate, trainer, _ in runs:
            if candidate.error is None:
                candidate.step_transient_gib = gpu_step_transient_gib(trainer, x)
    elif with_memory and placement == Placement():
        for candidate in candidates:
            if candidate.error is None:
                quick = sizes is QUICK
                candidate.step_transient_gib = step_transient_in_subprocess(
                    candidate, quick
                )
    return candidates, matmul_s


def scaling_curve(sizes: Sizes, reps: int) -> list[dict[str, float]]:
    """A Scale SAE's forward + backward (no optimizer step) as N doubles, e*m fixed.

    Widths take turns within each repetition, so a slow spell of the machine
    falls on every width alike; the first repetition is a warm-up.
    """
    torch.manual_seed(0)
    x = torch.randn(sizes.batch, sizes.d_in)
    steps = [forward_backward_of(sizes, d_sae, x) for d_sae in sizes.scaling_d_sae]
    times: list[list[float]] = [[] for _ in steps]
    for rep in range(reps + 1):
        for step, width_times in zip(steps, times, strict=True):
            elapsed = timed(step)
            if rep:
                width_times.append(elapsed)
    points: list[dict[str, float]] = []
    for d_sae, width_times in zip(sizes.scaling_d_sae, times, strict=True):
        point = {
            "d_sae": d_sae,
            "n_experts": d_sae // sizes.scaling_block,
            "forward_backward_s": statistics.median(width_times),
        }
        if points:
            point["ratio_to_half_width"] = (
                point["forward_backward_s"] / points[-1]["forward_backward_s"]
            )
        points.append(point)
    return points


def forward_backward_of(
    sizes: Sizes, d_sae: int, x: torch.Tensor
) -> Callable[[], None]:
    """One training forward and backward of a fresh Scale SAE (e = SCALING_E) at this width."""
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            d_in=sizes.d_in,
            d_sae=d_sae,
            k=sizes.k,
            n_experts=d_sae // sizes.scaling_block,
            n_active_experts=SCALING_E,
        )
    )
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": sae.cfg.load_balancing_coefficient},
        dead_neuron_mask=torch.zeros(d_sae, dtype=torch.bool),
        n_training_steps=0,
        is_logging_step=False,
    )

    def forward_backward() -> None:
        sae.zero_grad(set_to_none=True)
        sae.training_forward_pass(step_input).loss.backward()

    return forward_backward


def scaling_curve_in_subprocess(
    quick: bool, reps: int, allocator_env: dict[str, str]
) -> list[dict[str, float]]:
    """`scaling_curve` in a fresh process whose allocator settings are exactly these."""
    command = [sys.executable, __file__, "--curve-only", "--reps", str(reps)]
    command += ["--quick"] if quick else []
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not any(name in env for env in ALLOCATORS.values())
    }
    result = subprocess.run(
        command,
        env=inherited | allocator_env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


STEP_CURVE_WIDTHS = [2**16, 2**17, 2**18, 2**19]
STEP_CURVE_BLOCK = 512
"""Latents per expert in the step curve (with e = SCALING_E: e*m = 1024)."""
STEP_CURVE_ROWS = ("scale", "scale-lazy", "scale-lazy-zipf", "scale-fused", "topk")
"""SAELens's dense step, lazy Adam (on uniform and on Zipf-firing input), our fused
Adam, and SAELens TopK."""
ZIPF_FEATURES = 16384


def step_curve(
    sizes: Sizes, widths: list[int], reps: int
) -> list[dict[str, float | None]]:
    """Whole training steps as d_sae doubles with m and e fixed, beside the floor.

    One SAE at a time (the widest ones fill this machine's memory), so repetitions
    do not interleave across rows; the first one is a warm-up. A row whose
    weights, gradients, Adam state and dense activations would not fit in 80% of
    the free memory is skipped (None). The floor: the routed encoder matmul
    (which reads W_enc once), one read of W_dec, and the router matmul. The touched
    floor adds what any Adam must do for the latents a lazy step touched: PyTorch's
    fused Adam over that many W_enc and W_dec rows, held contiguous (no gathering).
    """
    torch.manual_seed(0)
    x = torch.randn(sizes.batch, sizes.d_in)
    points: list[dict[str, float | None]] = []
    for d_sae in widths:
        point: dict[str, float | None] = {"d_sae": d_sae}
        point["n_experts"] = d_sae // STEP_CURVE_BLOCK
        for name in STEP_CURVE_ROWS:
            seconds, share = _median_step(sizes, name, d_sae, x, reps)
            point[f"{name}_step_s"] = seconds
            if share is not None:
                point[f"{name}_touched_share"] = share
            gc.collect()
        floor = point["floor_s"] = _floor_s(sizes, d_sae, x, reps)
        for name in ("scale-lazy", "scale-lazy-zipf"):
            share = point.get(f"{name}_touched_share")
            point[f"{name}_touched_floor_s"] = (
                None
                if share is None
                else floor + _touched_update_s(sizes, round(share * d_sae), reps)
            )
        points.append(point)
    return points


def zipf_input(sizes: Sizes, n_features: int = ZIPF_FEATURES) -> torch.Tensor:
    """Tokens summing k random unit directions drawn with probability ~ 1/rank."""
    directions = torch.nn.functional.normalize(
        torch.randn(n_features, sizes.d_in), dim=-1
    )
    drawn = zipf_draws(n_features, sizes.batch * sizes.k).view(sizes.batch, sizes.k)
    magnitudes = torch.rand(sizes.batch, sizes.k) + 0.5
    return torch.einsum("tk,tkd->td", magnitudes, directions[drawn])


def zipf_draws(n_items: int, n_draws: int) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, n_items + 1, dtype=torch.float64)
    return torch.multinomial(weights, n_draws, replacement=True)


def _curve_sae(sizes: Sizes, name: str, d_sae: int) -> TrainingSAE[Any]:
    fields: dict[str, Any] = {"d_in": sizes.d_in, "d_sae": d_sae, "k": sizes.k}
    if name == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**fields))
    n_experts = d_sae // STEP_CURVE_BLOCK
    return ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            **fields, n_experts=n_experts, n_active_experts=SCALING_E
        )
    )


def _step_bytes(sizes: Sizes, name: str, d_sae: int) -> int:
    """Weights, gradients, Adam state (16 B a weight) and, for TopK, three dense
    [batch, d_sae] float32 activations."""
    weights = 2 * sizes.d_in * d_sae
    dense = 3 * 4 * sizes.batch * d_sae if name == "topk" else 0
    return 16 * weights + dense


def _median_step(
    sizes: Sizes, name: str, d_sae: int, x: torch.Tensor, reps: int
) -> tuple[float | None, float | None]:
    """Median step seconds, and for lazy Adam the share of latents its last step
    updated; (None, None) where the row does not fit in memory."""
    if _step_bytes(sizes, name, d_sae) > 0.8 * psutil.virtual_memory().available:
        return None, None
    optimizer = {"scale-lazy": "lazy", "scale-lazy-zipf": "lazy"}.get(name, "saelens")
    optimizer = "fused" if name == "scale-fused" else optimizer
    if name.endswith("-zipf"):
        x = zipf_input(sizes)
    trainer = trainer_for(_curve_sae(sizes, name, d_sae), x, optimizer=optimizer)
    times = [timed(partial(trainer.step, x)) for _ in range(reps + 1)]
    lazy = trainer.optimizer
    share = lazy.last_touched_share if isinstance(lazy, LazyAdam) else None
    return statistics.median(times[1:]), share


def _touched_update_s(sizes: Sizes, n_rows: int, reps: int) -> float:
    """Fused Adam over `n_rows` contiguous rows of W_enc and of W_dec (and b_enc)."""
    shapes = [(n_rows, sizes.d_in), (n_rows, sizes.d_in), (n_rows,)]
    return fused_adam_s(shapes, reps)


def fused_adam_s(shapes: list[tuple[int, ...]], reps: int) -> float:
    """Median seconds of one step of PyTorch's fused Adam over tensors of `shapes`."""
    weights = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    optimizer = torch.optim.Adam(weights, lr=1e-4, fused=True)
    times = [timed(optimizer.step) for _ in range(reps + 1)]
    return statistics.median(times[1:])


def _floor_s(sizes: Sizes, d_sae: int, x: torch.Tensor, reps: int) -> float:
    sae = _curve_sae(sizes, "scale", d_sae)
    assert isinstance(sae, ScaleTrainingSAE)
    n_experts = sae.cfg.n_experts
    experts = torch.rand(x.shape[0], n_experts).topk(SCALING_E, dim=-1).indices

    def floor() -> None:
        with torch.no_grad():
            torch.mm(x, sae.W_router)
            selected_expert_matmuls(x, experts, sae.W_enc, n_experts)
            sae.W_dec.sum()

    times = [timed(floor) for _ in range(reps + 1)]
    return statistics.median(times[1:])


def step_curve_markdown(points: list[dict[str, float | None]]) -> str:
    titles = [
        "d_sae",
        "N",
        "SAELens step s",
        "lazy step s",
        "lazy step s (Zipf input)",
        "fused step s",
        "TopK step s",
        "floor s",
        "touched floor s (uniform / Zipf)",
        "lazy vs SAELens step",
        "lazy / floor",
        "lazy (Zipf) / floor",
        "lazy / touched floor (uniform / Zipf)",
    ]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for point in points:
        dense, lazy = point["scale_step_s"], point["scale-lazy_step_s"]
        floor = point["floor_s"]
        cells = [f"{point['d_sae']:.0f}", f"{point['n_experts']:.0f}"]
        cells += [
            "-" if point[f"{name}_step_s"] is None else f"{point[f'{name}_step_s']:.3f}"
            for name in STEP_CURVE_ROWS
        ]
        zipf = point["scale-lazy-zipf_step_s"]
        touched = point.get("scale-lazy_touched_floor_s")
        touched_zipf = point.get("scale-lazy-zipf_touched_floor_s")
        cells.append("-" if floor is None else f"{floor:.3f}")
        cells.append(f"{_seconds(touched)} / {_seconds(touched_zipf)}")
        cells.append("-" if dense is None or lazy is None else f"{dense / lazy:.2f}x")
        cells.append("-" if lazy is None or floor is None else f"{lazy / floor:.2f}x")
        cells.append("-" if zipf is None or floor is None else f"{zipf / floor:.2f}x")
        cells.append(f"{_ratio(lazy, touched)} / {_ratio(zipf, touched_zipf)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}x"


def summarise(
    sizes: Sizes, candidates: list[Candidate], matmul_s: list[float]
) -> list[dict[str, Any]]:
    # the best plain-matmul rate seen: the attainable rate the encoder is held to
    matmul_gflops = 2 * sizes.batch * sizes.d_in * sizes.d_sae / min(matmul_s) / 1e9
    topk = next(c for c in candidates if c.name == "topk")
    rows = []
    for candidate in candidates:
        row: dict[str, Any] = {
            "sae": candidate.name,
            "N": candidate.n_experts,
            "e": candidate.n_active_experts,
            "matmul_path": candidate.matmul_path,
            "error": candidate.error,
        }
        if candidate.error is None:
            encode = statistics.median(candidate.encode_s)
            step = statistics.median(candidate.step_s)
            # the encoder's own rate: without the dense output where there is a choice
            routed_encode = (
                statistics.median(candidate.encode_sparse_s)
                if candidate.encode_sparse_s
                else encode
            )
            row |= {
                "encode_tok_s": sizes.batch / encode,
                "encode_sparse_tok_s": sizes.batch / routed_encode
                if candidate.encode_sparse_s
                else None,
                "step_tok_s": sizes.batch / step,
                "step_speedup_vs_topk": statistics.median(topk.step_s) / step,
                "encode_speedup_vs_topk": statistics.median(topk.encode_s) / encode,
                "encode_sparse_speedup_vs_topk": statistics.median(topk.encode_s)
                / routed_encode
                if candidate.encode_sparse_s
                else None,
                "step_transient_gib": candidate.step_transient_gib,
                "encoder_gflop_s": candidate.encoder_flops_per_token
                * sizes.batch
                / routed_encode
                / 1e9,
                "matmul_gflop_s": matmul_gflops,
            }
            row["encoder_fraction_of_matmul"] = row["encoder_gflop_s"] / matmul_gflops
        rows.append(row)
    return rows


COLUMNS = [
    ("sae", "SAE", "{}"),
    ("N", "N", "{}"),
    ("e", "e", "{}"),
    ("matmul_path", "expert matmuls", "{}"),
    ("step_tok_s", "train step tok/s", "{:,.0f}"),
    ("step_speedup_vs_topk", "step vs TopK", "{:.1f}x"),
    ("encode_tok_s", "encode tok/s", "{:,.0f}"),
    ("encode_speedup_vs_topk", "encode vs TopK", "{:.1f}x"),
    ("encode_sparse_tok_s", "encode_sparse tok/s", "{:,.0f}"),
    ("encode_sparse_speedup_vs_topk", "encode_sparse vs TopK", "{:.1f}x"),
    ("step_transient_gib", "step transient GiB", "{:.2f}"),
    ("encoder_gflop_s", "encoder GFLOP/s", "{:.1f}"),
    ("encoder_fraction_of_matmul", "of matmul rate", "{:.0%}"),
]


def markdown(
    rows: list[dict[str, Any]], curves: dict[str, list[dict[str, float]]]
) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        if row["error"] is not None:
            cells = [
                str(row["sae"]),
                str(row["N"]),
                str(row["e"]),
                str(row["matmul_path"] or "-"),
                f"fails: {row['error']}",
            ]
            cells += [""] * (len(COLUMNS) - len(cells))
        else:
            cells = [
                "-" if row[key] is None else fmt.format(row[key])
                for key, _, fmt in COLUMNS
            ]
        lines.append("| " + " | ".join(cells) + " |")
    matmul = next(row["matmul_gflop_s"] for row in rows if row["error"] is None)
    lines += [
        "",
        f"Plain matmul [batch, d_in] @ [d_in, d_sae] in the run's dtype, best of the run: "
        f"{matmul:.1f} GFLOP/s (the 'of matmul rate' reference).",
    ]
    if not curves:
        return "\n".join(lines)
    header = "| d_sae | N |"
    for allocator in curves:
        header += f" forward+backward s ({allocator}) | vs half width |"
    lines += ["", header, "|---|---|" + "---|---|" * len(curves)]
    for points in zip(*curves.values(), strict=True):
        cells = [f"{points[0]['d_sae']:.0f}", f"{points[0]['n_experts']:.0f}"]
        for point in points:
            ratio = point.get("ratio_to_half_width")
            cells.append(f"{point['forward_backward_s']:.3f}")
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for allocator, curve in curves.items():
        axis.plot(
            [p["d_sae"] for p in curve],
            [p["forward_backward_s"] * 1e3 for p in curve],
            marker="o",
            label=f"{allocator} allocator",
        )
    first = curves["default"][0]
    axis.plot(
        [p["d_sae"] for p in curves["default"]],
        [
            first["forward_backward_s"] * 1e3 * 1.2**i
            for i in range(len(curves["default"]))
        ],
        linestyle="--",
        color="grey",
        label="1.2x per doubling",
    )
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_xscale("log", base=2)
    axis.set_xlabel("d_sae (N doubles, e*m fixed)")
    axis.set_ylabel("forward + backward (ms)")
    axis.set_title("Scale SAE cost as the dictionary grows")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine(placement: Placement = Placement()) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = (
        torch.cuda.get_device_name(placement.device)
        if placement.device.startswith("cuda")
        else None
    )
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": placement.device,
        "gpu": gpu,
        "dtype": placement.dtype,
        "autocast": placement.autocast,
        "load_average_at_end": load,
    }


def profiles(sizes: Sizes, rows: int = 15) -> dict[str, str]:
    """Where a warm Scale SAE (the first (N, e) pair) spends a training step and an encode."""
    torch.manual_seed(0)
    x = torch.randn(sizes.batch, sizes.d_in)
    sae = build(Candidate("scale", *sizes.experts[0]), sizes)
    trainer = trainer_for(sae, x)
    inference = exported(sae)
    assert isinstance(inference, ScaleSAE)
    tables = {}
    for name, work, context in [
        ("training step", partial(trainer.step, x), nullcontext),
        (
            "encode_sparse (inference, no_grad)",
            partial(inference.encode_sparse, x),
            torch.no_grad,
        ),
    ]:
        with context():
            work()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                work()
        tables[name] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=rows
        )
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for a smoke run"
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="timed repetitions per candidate"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory measurement"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", default="float32", help="parameter and input dtype, e.g. bfloat16"
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="train and encode under bfloat16 autocast (SAELens's autocast=True)",
    )
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        help="d_sae values to sweep (default on a GPU: 24576 131072 524288)",
    )
    parser.add_argument(
        "--step-curve",
        action="store_true",
        help="whole training steps at d_sae 2^16 to 2^19 (m 512, e 2): SAELens's "
        "Adam, lazy Adam, fused Adam, TopK and the floor",
    )
    parser.add_argument("--transient-of", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--curve-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.transient_of:
        name, n_experts, n_active = args.transient_of
        print_transient_of(sizes, name, int(n_experts), int(n_active))
        return
    if args.curve_only:
        print(json.dumps(scaling_curve(sizes, args.reps)))
        return
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.step_curve:
        write_step_curve(sizes, args.widths, args.reps, args.output_dir, args.quick)
        return
    placement = Placement(args.device, args.dtype, args.autocast)
    widths = args.widths or (GPU_WIDTHS if args.device.startswith("cuda") else None)
    if widths:
        sweep(width_sweep(sizes, widths), args.reps, placement, args.output_dir)
        return
    load_before = os.getloadavg()
    candidates, matmul_s = measure(sizes, args.reps, with_memory=not args.no_memory)
    curve_reps = 2 * args.reps + 1  # page-fault noise on a VM: medians need more
    curves = {
        allocator: scaling_curve_in_subprocess(args.quick, curve_reps, env)
        for allocator, env in ALLOCATORS.items()
    }
    rows = summarise(sizes, candidates, matmul_s)
    table = markdown(rows, curves)
    stem = "throughput_quick" if args.quick else "throughput"
    for name, profile_table in profiles(sizes).items():
        table += f"\n\nProfile of one Scale SAE {name}:\n\n```\n{profile_table}\n```"
    print(table)
    (args.output_dir / f"{stem}.md").write_text(table + "\n")
    result = {
        "sizes": asdict(sizes),
        "repetitions": {"candidates": args.reps, "scaling_curve": curve_reps},
        "machine": machine() | {"load_average_at_start": load_before},
        "rows": rows,
        "scaling_curve": curves["default"],
        "scaling_curve_huge_pages": curves["huge_pages"],
    }
    (args.output_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot_curves(curves, args.output_dir / f"{stem}_scaling.png")


def write_step_curve(
    sizes: Sizes, widths: list[int] | None, reps: int, output_dir: Path, quick: bool
) -> None:
    """`step_curve` as a table and JSON (`throughput_step_curve[_quick]`)."""
    if widths is None:
        widths = [w // 64 for w in STEP_CURVE_WIDTHS] if quick else STEP_CURVE_WIDTHS
    points = step_curve(sizes, widths, reps)
    table = step_curve_markdown(points)
    print(table)
    stem = "throughput_step_curve" + ("_quick" if quick else "")
    (output_dir / f"{stem}.md").write_text(table + "\n")
    report: dict[str, Any] = {"sizes": asdict(sizes), "repetitions": reps}
    report["machine"] = machine()
    report["points"] = points
    (output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))


def sweep(
    every_sizes: list[Sizes], reps: int, placement: Placement, output_dir: Path
) -> None:
    """The side-by-side at each width in turn; one table, one JSON."""
    tables, results = [], []
    for sizes in every_sizes:
        candidates, matmul_s = measure(sizes, reps, False, placement)
        rows = summarise(sizes, candidates, matmul_s)
        tables.append(f"d_sae {sizes.d_sae}:\n\n" + markdown(rows, {}))
        results.append({"sizes": asdict(sizes), "rows": rows})
        if placement.device.startswith("cuda"):
            torch.cuda.empty_cache()
    table = "\n\n".join(tables)
    print(table)
    stem = f"throughput_{torch.device(placement.device).type}_{placement.dtype}"
    stem += "_autocast" if placement.autocast else ""
    (output_dir / f"{stem}.md").write_text(table + "\n")
    report = {
        "repetitions": reps,
        "machine": machine(placement),
        "widths": results,
    }
    (output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
