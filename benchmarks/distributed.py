"""Training one Scale SAE on 1 and 2 processes: data and expert parallel, on this CPU.

Each run starts P gloo processes with one thread each (`torch.distributed`, as
torchrun would), builds the same Scale SAE on every process, and times
`DistributedSAETrainer.step` (SAELens's step with gradients averaged over processes)
on a fixed global batch split between them; P = 1 is SAELens's own `SAETrainer`.
Per run it reports global tokens per second (median over the timed steps), and per
process the bytes of parameters, gradients and Adam state it holds and its peak
resident memory.

A second table is worked out on paper, not measured: per GPU memory and all-to-all
traffic of a step under expert parallelism on 8 GPUs for d_sae 1M-16M, and the width
at which one 80 GB GPU no longer holds the SAE with its gradients and Adam state.

    python benchmarks/distributed.py            # d_sae 24576 and 98304, d_in 768
    python benchmarks/distributed.py --quick    # small sizes, seconds
"""

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.distributed import DistributedSAETrainer, share_weights
from saelens_moe.saes.parallel import Parallel

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient, two Adam moments
TIMEOUT_S = 600


@dataclass(frozen=True)
class Size:
    """One measured SAE and batch."""

    d_in: int
    d_sae: int
    n_experts: int
    n_active_experts: int
    k: int
    batch_tokens: int
    """Global batch: each of P processes steps on batch_tokens / P."""


@dataclass(frozen=True)
class Run:
    size: Size
    processes: int
    expert_parallel: bool

    @property
    def mode(self) -> str:
        if self.processes == 1:
            return "one process"
        return "expert parallel" if self.expert_parallel else "data parallel"


FULL = (
    Size(768, 24_576, 64, 2, 32, 4096),
    Size(768, 98_304, 64, 2, 32, 4096),
)
QUICK = (Size(32, 512, 8, 2, 8, 256),)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer_cfg(size: Size) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=10**12,
        train_batch_size_samples=size.batch_tokens,
        lr_end=3e-5,
        device="cpu",
    )


def _measure(rank: int, run: Run, port: int, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    size, world = run.size, run.processes
    parallel = None
    if world > 1:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S)
        )
        parallel = Parallel(rank, world, run.expert_parallel)
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            d_in=size.d_in,
            d_sae=size.d_sae,
            n_experts=size.n_experts,
            n_active_experts=size.n_active_experts,
            k=size.k,
            dead_latent_window=None,
        )
    )
    cfg = _trainer_cfg(size)
    batch = torch.randn(size.batch_tokens // world, size.d_in)
    if parallel is None:
        trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    else:
        share_weights(sae, parallel)
        trainer = DistributedSAETrainer(
            parallel, cfg=cfg, sae=sae, data_provider=iter(())
        )
    seconds = []
    for step in range(steps + 2):  # two warm-up steps
        if parallel is not None:
            dist.barrier()
        start = time.perf_counter()
        trainer.step(batch)
        if parallel is not None:
            dist.barrier()
        if step >= 2:
            seconds.append(time.perf_counter() - start)
    held = sum(p.numel() for p in sae.parameters()) * BYTES_PER_TRAINED_PARAMETER
    report = {
        "step_s": statistics.median(seconds),
        "held_gib": held / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if parallel is not None:
        dist.destroy_process_group()


def measure(run: Run, steps: int, scratch: Path) -> dict[str, Any]:
    """One run in fresh processes: tokens/s and per-process memory."""
    out = scratch / f"{run.size.d_sae}-{run.processes}-{run.expert_parallel}"
    out.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_measure, args=(rank, run, port, steps, out))
        for rank in range(run.processes)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_S)
        if process.exitcode != 0:
            raise RuntimeError(f"{run} failed with exit code {process.exitcode}")
    ranks = [
        json.loads((out / f"rank{rank}.json").read_text())
        for rank in range(run.processes)
    ]
    step_s = max(rank["step_s"] for rank in ranks)
    return {
        **asdict(run.size),
        "processes": run.processes,
        "mode": run.mode,
        "tokens_per_s": run.size.batch_tokens / step_s,
        "held_gib_per_process": max(rank["held_gib"] for rank in ranks),
        "peak_rss_gib_per_process": max(rank["peak_rss_gib"] for rank in ranks),
    }


def expert_parallel_on_paper(
    d_in: int = 768,
    n_gpus: int = 8,
    block_size: int = 4096,
    n_active_experts: int = 2,
    k: int = 64,
    tokens_per_gpu: int = 8192,
) -> list[dict[str, Any]]:
    """Per GPU memory and all-to-all bytes of one expert-parallel step (fp32).

    Every (token, selected expert) pair sends the input (d_in) to the owner and
    gets m pre-activations back, then sends K values (fp32) and K latent indices
    (int64) and gets d_in partial reconstructions back; backward returns the float
    traffic once more. (P - 1) / P of the pairs leave the GPU under even routing.
    """
    rows = []
    for d_sae in (2**20, 2**21, 2**22, 2**23, 2**24):
        n_experts = d_sae // block_size
        expert_params = 2 * d_in * d_sae + d_sae
        replicated = d_in * n_experts + n_experts + d_in + d_in * d_in
        per_gpu = expert_params / n_gpus + replicated
        pairs_leaving = tokens_per_gpu * n_active_experts * (n_gpus - 1) / n_gpus
        floats = 2 * (d_in + block_size + k + d_in)  # forward and backward
        bytes_out = pairs_leaving * (4 * floats + 8 * k)
        rows.append(
            {
                "d_sae": d_sae,
                "n_experts": n_experts,
                "one_gpu_gib": (expert_params + replicated)
                * BYTES_PER_TRAINED_PARAMETER
                / GIB,
                "per_gpu_gib": per_gpu * BYTES_PER_TRAINED_PARAMETER / GIB,
                "all_to_all_gib_per_gpu_step": bytes_out / GIB,
            }
        )
    return rows


def widest_on_one_gpu(d_in: int, gpu_gb: float = 80.0) -> int:
    """Widest d_sae whose weights, gradients and Adam state fit in `gpu_gb` (1e9 B)."""
    return int(gpu_gb * 1e9 / (BYTES_PER_TRAINED_PARAMETER * 2 * d_in))


def markdown(measured: list[dict[str, Any]], paper: list[dict[str, Any]]) -> str:
    lines = [
        "| d_sae | processes | mode | tokens/s | held GiB / process | "
        "peak RSS GiB / process |",
        "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in measured:
        lines.append(
            f"| {row['d_sae']} | {row['processes']} | {row['mode']} | "
            f"{row['tokens_per_s']:.0f} | {row['held_gib_per_process']:.2f} | "
            f"{row['peak_rss_gib_per_process']:.2f} |"
        )
    lines += [
        "",
        "On paper, expert parallel on 8 GPUs (d_in 768, m 4096, e 2, K 64, "
        "8192 tokens per GPU, fp32 weights + gradients + Adam):",
        "",
        "| d_sae | experts | one GPU GiB | per GPU GiB | all-to-all GiB / GPU / step |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in paper:
        lines.append(
            f"| {row['d_sae']:,} | {row['n_experts']} | {row['one_gpu_gib']:.1f} | "
            f"{row['per_gpu_gib']:.1f} | {row['all_to_all_gib_per_gpu_step']:.2f} |"
        )
    widest = {d_in: widest_on_one_gpu(d_in) for d_in in (768, 4096)}
    lines += [
        "",
        "Widest SAE one 80 GB GPU holds with its Adam state (no activations): "
        + ", ".join(f"d_sae {w:,} at d_in {d}" for d, w in widest.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    runs = [
        Run(size, processes, expert_parallel)
        for size in sizes
        for processes, expert_parallel in ((1, False), (2, False), (2, True))
    ]
    scratch = args.output_dir / "distributed_scratch"
    measured = [measure(run, args.steps, scratch) for run in runs]
    for path in sorted(scratch.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    scratch.rmdir()
    paper = expert_parallel_on_paper()
    table = markdown(measured, paper)
    print(table)
    stem = "distributed_quick" if args.quick else "distributed"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.md").write_text(table + "\n")
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "threads_per_process": 1,
        },
        "measured": measured,
        "expert_parallel_on_paper": paper,
        "widest_d_sae_on_one_80gb_gpu": {
            str(d_in): widest_on_one_gpu(d_in) for d_in in (768, 4096)
        },
    }
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
