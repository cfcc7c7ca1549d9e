"""Training one Scale SAE on 1 and 2 processes: data and expert parallel, on this CPU.

Each run starts P gloo processes with one thread each (`torch.distributed`, as
torchrun would), builds the same Scale SAE on every process, and times
`DistributedSAETrainer.step` (SAELens's step with gradients averaged over processes)
on a fixed global batch split between them; P = 1 is SAELens's own `SAETrainer`.
Per run it reports global tokens per second (median over the timed steps), and per
process the bytes of parameters, gradients and Adam state it holds and its peak
resident memory.

`--lifecycle` measures what expert parallelism is for: peak resident memory per
process over a whole run (build the SAE, train, write a checkpoint, export it to
an ordinary SAELens folder) for P = 1, 2, 4 at d_sae 98304 and 393216, beside the
prediction: the process's baseline (Python, torch, the data) + weights, gradients
and Adam moments held (the experts / P and the replicated weights) + Adam's
per-tensor workspace + the step's batch buffers.

A further table is worked out on paper, not measured: per GPU memory and all-to-all
traffic of a step under expert parallelism on 8 GPUs for d_sae 1M-16M, and the width
at which one 80 GB GPU no longer holds the SAE with its gradients and Adam state.

    python benchmarks/distributed.py            # d_sae 24576 and 98304, d_in 768
    python benchmarks/distributed.py --quick    # small sizes, seconds
    python benchmarks/distributed.py --lifecycle [--quick]
"""

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
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
from saelens_moe.distributed import (
    DistributedSAETrainer,
    new_expert_shard,
    share_weights,
)
from saelens_moe.saes.parallel import Parallel
from saelens_moe.sharded import (
    export_checkpoint,
    mark_complete,
    save_shard,
    shard_folder,
)

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
LIFECYCLE = (
    Size(768, 98_304, 64, 2, 32, 4096),
    Size(768, 393_216, 256, 2, 32, 4096),
)
LIFECYCLE_QUICK = (Size(32, 4096, 16, 2, 8, 256), Size(32, 16_384, 64, 2, 8, 256))
"""Widths differ, the expert block (d_in x m) does not: export memory must not grow."""


def lifecycle(run: Run, steps: int, scratch: Path) -> dict[str, Any]:
    """Peak RSS per process over build, training, checkpoint and export."""
    ranks = _spawn(_lifecycle, run, steps, scratch)
    worst = max(ranks, key=lambda rank: max(rank["peaks_gib"].values()))
    predicted = (
        worst["baseline_gib"]
        + worst["state_gib"]
        + worst["adam_workspace_gib"]
        + worst["batch_buffers_gib"]
    )
    peak = max(worst["peaks_gib"].values())
    return {
        **asdict(run.size),
        "processes": run.processes,
        "mode": run.mode,
        "peaks_gib_per_phase": worst["peaks_gib"],
        "peak_rss_gib_per_process": peak,
        "baseline_gib": worst["baseline_gib"],
        "state_gib_per_process": worst["state_gib"],
        "adam_workspace_gib": worst["adam_workspace_gib"],
        "batch_buffers_gib": worst["batch_buffers_gib"],
        "predicted_gib_per_process": predicted,
        "peak_over_predicted": peak / predicted,
    }


def _write_shards(size: Size, processes: int, checkpoint: Path) -> None:
    """The checkpoint `processes` expert-parallel processes would write at start,
    written here one process's shard at a time."""
    for rank in range(processes):
        sae = ScaleTrainingSAE(dataclasses.replace(_sae_config(size), device="meta"))
        sae.cfg.device, sae.device = "cpu", torch.device("cpu")
        sae.parallel = Parallel(rank, processes, expert_parallel=True)
        sae.init_own_weights(seed=0)
        save_shard(sae, shard_folder(checkpoint, rank, processes))
        del sae
    (checkpoint / "cfg.json").write_text(json.dumps(_sae_config(size).to_dict()))
    mark_complete(checkpoint, processes, size.n_experts)


def _export_alone(checkpoint: Path, report: Path) -> None:
    """Export a checkpoint in this fresh process; its peak RSS."""
    torch.set_num_threads(1)
    baseline = _rss_gib()
    export_checkpoint(checkpoint, checkpoint.parent / "exported")
    report.write_text(
        json.dumps({"baseline_gib": baseline, "peak_gib": _peak_rss_gib()})
    )


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc's default mmap threshold adapts upwards as blocks are freed, so freed
blocks stay on the heap; a fixed threshold returns each block to the system."""


def export_memory(size: Size, processes: int, scratch: Path) -> dict[str, Any]:
    """Peak RSS of exporting a `processes`-shard checkpoint of `size` in a fresh
    interpreter, with glibc's default allocator settings and a fixed mmap threshold."""
    checkpoint = scratch / f"export-{size.d_sae}" / "checkpoint"
    checkpoint.mkdir(parents=True)
    _write_shards(size, processes, checkpoint)
    peaks = {}
    for allocator, env in (
        ("default", {}),
        ("fixed_mmap_threshold", FIXED_MMAP_THRESHOLD),
    ):
        report = scratch / f"export-{size.d_sae}-{allocator}.json"
        arguments = ["--export-alone", str(checkpoint), str(report)]
        subprocess.run(
            [sys.executable, __file__, *arguments],
            check=True,
            env=os.environ | env,
            timeout=TIMEOUT_S,
        )
        peaks[allocator] = json.loads(report.read_text())["peak_gib"] * 1024
    block = size.d_in * size.d_sae // size.n_experts * 4
    return {
        **asdict(size),
        "shards": processes,
        "dictionary_gib": 2 * size.d_in * size.d_sae * 4 / GIB,
        "block_mib": block / 2**20,
        "export_peak_rss_mib": peaks,
    }


def lifecycle_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| d_sae | processes | peak RSS GiB / process (init, train, checkpoint, "
        "export) | predicted GiB | peak / predicted |",
        "| ---: | ---: | --- | ---: | ---: |",
    ]
    for row in rows:
        phases = ", ".join(f"{v:.2f}" for v in row["peaks_gib_per_phase"].values())
        lines.append(
            f"| {row['d_sae']} | {row['processes']} | "
            f"{row['peak_rss_gib_per_process']:.2f} ({phases}) | "
            f"{row['predicted_gib_per_process']:.2f} | "
            f"{row['peak_over_predicted']:.2f} |"
        )
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer_cfg(size: Size, checkpoint_path: Path) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=10**12,
        train_batch_size_samples=size.batch_tokens,
        lr_end=3e-5,
        device="cpu",
        checkpoint_path=str(checkpoint_path),
    )


def _sae_config(size: Size) -> ScaleTrainingSAEConfig:
    return ScaleTrainingSAEConfig(
        d_in=size.d_in,
        d_sae=size.d_sae,
        n_experts=size.n_experts,
        n_active_experts=size.n_active_experts,
        k=size.k,
        dead_latent_window=None,
    )


def _trainer(size: Size, parallel: Parallel | None, out: Path) -> SAETrainer[Any, Any]:
    """SAELens's trainer (one process) or ours, on a new SAE; expert parallel
    processes build only their experts."""
    torch.manual_seed(0)
    cfg = _trainer_cfg(size, out / "checkpoints")
    if parallel is None:
        sae = ScaleTrainingSAE(_sae_config(size))
        return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    if parallel.expert_parallel:
        sae = new_expert_shard(_sae_config(size), parallel)
    else:
        sae = ScaleTrainingSAE(_sae_config(size))
        share_weights(sae, parallel)
    return DistributedSAETrainer(parallel, cfg=cfg, sae=sae, data_provider=iter(()))


def _rss_gib() -> float:
    """This process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


def _peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not
    inherited from the process that started this one)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _join(rank: int, run: Run, port: int) -> Parallel | None:
    if run.processes == 1:
        return None
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=run.processes,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    return Parallel(rank, run.processes, run.expert_parallel)


def _lifecycle(rank: int, run: Run, port: int, steps: int, out: Path) -> None:
    """Build, train `steps` steps, checkpoint, export; peak RSS of each phase."""
    torch.set_num_threads(1)
    size = run.size
    baseline = _rss_gib()
    parallel = _join(rank, run, port)
    trainer = _trainer(size, parallel, out)
    peaks = {"init": _peak_rss_gib()}
    batch = torch.randn(size.batch_tokens // run.processes, size.d_in)
    for _ in range(steps):
        trainer.step(batch)
    peaks["training"] = _peak_rss_gib()
    trainer.save_checkpoint("checkpoint")
    peaks["checkpoint"] = _peak_rss_gib()
    if parallel is not None:
        dist.barrier()
        if rank == 0:
            assert trainer.cfg.checkpoint_path is not None
            checkpoint = Path(trainer.cfg.checkpoint_path) / "checkpoint"
            export_checkpoint(checkpoint, out / "exported")
        dist.barrier()
    peaks["export"] = _peak_rss_gib()
    held = sum(p.numel() for p in trainer.sae.parameters())
    report = {
        "baseline_gib": baseline,
        "peaks_gib": peaks,
        "state_gib": held * BYTES_PER_TRAINED_PARAMETER / GIB,
        "adam_workspace_gib": _adam_workspace_gib(trainer.sae),
        "batch_buffers_gib": _batch_buffers_gib(size, run.processes),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if parallel is not None:
        dist.destroy_process_group()


def _batch_buffers_gib(size: Size, processes: int) -> float:
    """Float32 buffers of a step that scale with the batch, roughly: eight tensors
    of the pairs' pre-activations [pairs, m] (forward, backward and the norm,
    weighting and Top-K copies a profile of one step shows)."""
    pairs = size.batch_tokens * size.n_active_experts / processes
    block_size = size.d_sae // size.n_experts
    return 8 * pairs * block_size * 4 / GIB


def _adam_workspace_gib(sae: torch.nn.Module) -> float:
    """Adam's update of one tensor (PyTorch's per-tensor CPU path) makes two
    temporaries of its size (sqrt of the second moment, then the division); the
    largest tensor is this process's share of W_enc or W_dec."""
    return 2 * max(p.numel() * p.element_size() for p in sae.parameters()) / GIB


def _measure(rank: int, run: Run, port: int, steps: int, out: Path) -> None:
    torch.set_num_threads(1)
    size, world = run.size, run.processes
    parallel = _join(rank, run, port)
    trainer = _trainer(size, parallel, out)
    batch = torch.randn(size.batch_tokens // world, size.d_in)
    sae = trainer.sae
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
        "peak_rss_gib": _peak_rss_gib(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if parallel is not None:
        dist.destroy_process_group()


def _spawn(target: Any, run: Run, steps: int, scratch: Path) -> list[dict[str, Any]]:
    """`target` on run.processes fresh processes; each rank's report."""
    out = scratch / f"{run.size.d_sae}-{run.processes}-{run.expert_parallel}"
    out.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=target, args=(rank, run, port, steps, out))
        for rank in range(run.processes)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(TIMEOUT_S)
        if process.exitcode != 0:
            raise RuntimeError(f"{run} failed with exit code {process.exitcode}")
    return [
        json.loads((out / f"rank{rank}.json").read_text())
        for rank in range(run.processes)
    ]


def measure(run: Run, steps: int, scratch: Path) -> dict[str, Any]:
    """One run in fresh processes: tokens/s and per-process memory."""
    ranks = _spawn(_measure, run, steps, scratch)
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
        pairs = tokens_per_gpu * n_active_experts
        pairs_leaving = pairs * (n_gpus - 1) / n_gpus
        # CUDA's default (foreach) Adam: one temporary per parameter held;
        # the step: eight [pairs, m] float32 buffers (as measured on CPU)
        workspace = 4 * expert_params / n_gpus + 8 * pairs * block_size * 4
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
                "peak_per_gpu_gib": (per_gpu * BYTES_PER_TRAINED_PARAMETER + workspace)
                / GIB,
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
        "| d_sae | experts | one GPU GiB | per GPU GiB | peak per GPU GiB | "
        "all-to-all GiB / GPU / step |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in paper:
        lines.append(
            f"| {row['d_sae']:,} | {row['n_experts']} | {row['one_gpu_gib']:.1f} | "
            f"{row['per_gpu_gib']:.1f} | {row['peak_per_gpu_gib']:.1f} | "
            f"{row['all_to_all_gib_per_gpu_step']:.2f} |"
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
    parser.add_argument(
        "--lifecycle",
        action="store_true",
        help="peak memory per process over build, training, checkpoint and export "
        "for 1, 2 and 4 processes",
    )
    parser.add_argument(
        "--export-alone", nargs=2, type=Path, help=argparse.SUPPRESS
    )  # CHECKPOINT REPORT: one export measured in this fresh interpreter
    args = parser.parse_args()
    if args.export_alone:
        _export_alone(*args.export_alone)
        return
    scratch = args.output_dir / "distributed_scratch"
    if args.lifecycle:
        _write_lifecycle(args, scratch)
        return
    sizes = QUICK if args.quick else FULL
    runs = [
        Run(size, processes, expert_parallel)
        for size in sizes
        for processes, expert_parallel in ((1, False), (2, False), (2, True))
    ]
    measured = [measure(run, args.steps, scratch) for run in runs]
    _remove(scratch)
    paper = expert_parallel_on_paper()
    table = markdown(measured, paper)
    print(table)
    stem = "distributed_quick" if args.quick else "distributed"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.md").write_text(table + "\n")
    report = {
        "machine": _machine(),
        "measured": measured,
        "expert_parallel_on_paper": paper,
        "widest_d_sae_on_one_80gb_gpu": {
            str(d_in): widest_on_one_gpu(d_in) for d_in in (768, 4096)
        },
    }
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))


def _write_lifecycle(args: argparse.Namespace, scratch: Path) -> None:
    sizes = LIFECYCLE_QUICK if args.quick else LIFECYCLE
    rows = []
    for size in sizes:
        for processes in (1, 2, 4):
            run = Run(size, processes, expert_parallel=processes > 1)
            rows.append(lifecycle(run, args.steps, scratch))
            _remove(scratch)
    exports = [export_memory(size, 4, scratch) for size in sizes]
    _remove(scratch)
    table = lifecycle_markdown(rows) + "\n\n" + export_markdown(exports)
    print(table)
    stem = "distributed_lifecycle" + ("_quick" if args.quick else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.md").write_text(table + "\n")
    report = {"machine": _machine(), "lifecycle": rows, "export_alone": exports}
    (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))


def export_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Exporting a 4-shard checkpoint alone (a fresh interpreter):",
        "",
        "| d_sae | dictionary GiB | one expert block MiB | export peak RSS MiB "
        "(glibc default) | (fixed mmap threshold) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        peaks = row["export_peak_rss_mib"]
        lines.append(
            f"| {row['d_sae']} | {row['dictionary_gib']:.2f} | "
            f"{row['block_mib']:.2f} | {peaks['default']:.1f} | "
            f"{peaks['fixed_mmap_threshold']:.1f} |"
        )
    first, last = rows[0]["export_peak_rss_mib"], rows[-1]["export_peak_rss_mib"]
    lines += [
        "",
        f"From the narrowest to the widest dictionary the export's peak grows by "
        f"{last['default'] - first['default']:.1f} MiB (glibc default) and "
        f"{last['fixed_mmap_threshold'] - first['fixed_mmap_threshold']:.1f} MiB "
        f"(fixed mmap threshold); one expert block is {rows[0]['block_mib']:.2f} MiB.",
    ]
    return "\n".join(lines)


def _remove(scratch: Path) -> None:
    for path in sorted(scratch.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    scratch.rmdir()


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads_per_process": 1,
    }


if __name__ == "__main__":
    main()
