"""Expert-parallel SAEs on disk, without any process holding the whole dictionary.

A sharded checkpoint is SAELens's checkpoint folder plus one folder per process:

    <checkpoint>/cfg.json, sparsity.safetensors, runner_cfg.json, ...  (rank 0)
    <checkpoint>/expert_shards/rank-00000-of-00002/sae_weights.safetensors
                                                  /trainer_state.pt, activation_scaler.json
    <checkpoint>/checkpoint_complete.json   (written last, after every rank finished)

Each shard holds its process's experts (`W_enc` columns, `W_dec` rows, `b_enc`,
`omega`) and the replicated weights; `trainer_state.pt` is SAELens's, with that
process's Adam moments. A checkpoint without `checkpoint_complete.json` was
interrupted while being written and is never resumed from.

`export_checkpoint` turns a sharded checkpoint into an ordinary SAELens folder
(`cfg.json` + `sae_weights.safetensors`, what `save_inference_model` writes) one
expert block at a time; `load_own_experts` reads back only a process's slice of
such a folder.

    python -m saelens_moe.sharded CHECKPOINT OUTPUT   # export a checkpoint
"""

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
from sae_lens.saes.sae import TrainingSAEConfig
from safetensors.torch import save_file
from torch import nn

from saelens_moe.saes.moe import FeatureScaling, fold_feature_scaling
from saelens_moe.saes.parallel import EXPERT_PARAMETERS, Parallel, expert_slice
from saelens_moe.saes.scale_sae import (
    AnyScaleSAE,
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
)
from saelens_moe.safetensors_stream import BlockWriter, SliceReader, read_header

SHARDS_FOLDER = "expert_shards"
COMPLETE_MARKER = "checkpoint_complete.json"


class ShardError(ValueError):
    """A sharded checkpoint that cannot be resumed or exported; says which file."""


def shard_folder(checkpoint: Path, rank: int, world_size: int) -> Path:
    """The folder of process `rank`'s shard in a checkpoint of `world_size` processes."""
    return checkpoint / SHARDS_FOLDER / f"rank-{rank:05d}-of-{world_size:05d}"


def save_shard(sae: AnyScaleSAE, folder: Path) -> Path:
    """Write this process's weights (its experts and the replicated weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SAE_WEIGHTS_FILENAME
    state = {name: tensor.contiguous() for name, tensor in sae.state_dict().items()}
    save_file(state, path)
    return path


def mark_complete(checkpoint: Path, world_size: int, n_experts: int) -> None:
    """Record that every shard of `checkpoint` is written (call after a barrier)."""
    marker = {
        "world_size": world_size,
        "n_experts": n_experts,
        "shards": [
            str(shard_folder(checkpoint, rank, world_size).relative_to(checkpoint))
            for rank in range(world_size)
        ],
    }
    partial = checkpoint / f".{COMPLETE_MARKER}.partial"
    partial.write_text(json.dumps(marker, indent=2))
    partial.replace(checkpoint / COMPLETE_MARKER)


def is_complete(checkpoint: Path) -> bool:
    """Whether every shard of the checkpoint was written."""
    return (checkpoint / COMPLETE_MARKER).is_file()


def is_sharded(checkpoint: Path) -> bool:
    """Whether the folder is a sharded (expert-parallel) checkpoint, complete or not."""
    return (checkpoint / SHARDS_FOLDER).is_dir() or is_complete(checkpoint)


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints below `root`, oldest first (by training samples)."""
    found = [marker.parent for marker in root.rglob(COMPLETE_MARKER)]
    return sorted(found, key=_samples_of)


def _samples_of(checkpoint: Path) -> tuple[int, float]:
    name = checkpoint.name.removeprefix("final_")
    return (int(name) if name.isdigit() else -1, checkpoint.stat().st_mtime)


def resolve_checkpoint(path: Path) -> Path:
    """The complete checkpoint to resume from: `path` itself, or the latest below it.

    `path` may be one checkpoint or a folder holding several (SAELens's
    `checkpoint_path`); an incomplete checkpoint is refused, naming the latest
    complete one to use instead.
    """
    if is_complete(path):
        return path
    if not path.exists():
        raise ShardError(f"resume_from_checkpoint {path} does not exist")
    if is_sharded(path):
        earlier = _complete_checkpoints(path.parent.parent) or _complete_checkpoints(
            path.parent
        )
        hint = f"resume from {earlier[-1]}" if earlier else "no complete one exists"
        raise ShardError(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER}: a process "
            f"stopped while writing it); {hint}"
        )
    complete = _complete_checkpoints(path)
    if not complete:
        raise ShardError(
            f"{path} holds no complete expert-parallel checkpoint "
            f"(folders with {COMPLETE_MARKER})"
        )
    return complete[-1]


def check_shard(checkpoint: Path, sae: AnyScaleSAE, parallel: Parallel) -> Path:
    """This process's shard file, after checking it matches `sae`'s weights.

    Raises ShardError naming the file, the rank and the expected shape; reads only
    the file's header.
    """
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    if marker["world_size"] != parallel.world_size:
        raise ShardError(
            f"checkpoint {checkpoint} was written by {marker['world_size']} processes "
            f"and this job has {parallel.world_size}: resume with the same number, or "
            "export it (python -m saelens_moe.sharded) and start from the export"
        )
    path = shard_folder(checkpoint, parallel.rank, parallel.world_size)
    path = path / SAE_WEIGHTS_FILENAME
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    if not path.is_file():
        raise ShardError(
            f"rank {parallel.rank}: shard file {path} is missing (expected W_enc of "
            f"shape {expected['W_enc']})"
        )
    found = {name: entry.shape for name, entry in read_header(path).items()}
    for name, shape in expected.items():
        if found.get(name) != shape:
            raise ShardError(
                f"rank {parallel.rank}: shard file {path} holds {name} of shape "
                f"{found.get(name)}, expected {shape}"
            )
    return path


@torch.no_grad()
def load_shard(sae: AnyScaleSAE, path: Path) -> None:
    """Copy a checked shard file's weights into this process's SAE.

    Each tensor is read a few rows at a time (about one expert block), so the
    only full-size tensors are the parameters themselves.
    """
    cfg = sae.cfg
    block = cfg.d_sae // cfg.n_experts * cfg.d_in
    with SliceReader(path) as reader:
        for name, parameter in sae.state_dict().items():
            entry = reader.entries[name]
            n_rows = entry.shape[0]
            step = max(1, block // max(1, parameter[0].numel()))
            for start in range(0, n_rows, step):
                stop = min(start + step, n_rows)
                parameter[start:stop].copy_(reader.rows(name, start, stop))
    if isinstance(sae, ScaleTrainingSAE):
        sae.router_init_pending = False


# ------------------------------------------------------------------------- export


def export_checkpoint(checkpoint: Path, output: Path) -> Path:
    """Write a sharded checkpoint as an ordinary SAELens folder; returns `output`.

    Memory holds one expert block (its W_enc columns, W_dec rows and b_enc) and the
    replicated weights, never the dictionary: each block is read from its shard,
    Feature Scaling and the decoder norms are folded in (as `save_inference_model`
    does) and it is written at its place in `sae_weights.safetensors`. The weights
    file appears under its name only when complete.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    training_cfg = _training_config(checkpoint)
    world_size = json.loads((checkpoint / COMPLETE_MARKER).read_text())["world_size"]
    output.mkdir(parents=True, exist_ok=True)
    partial = output / f".{SAE_WEIGHTS_FILENAME}.partial"
    first = shard_folder(checkpoint, 0, world_size) / SAE_WEIGHTS_FILENAME
    with SliceReader(first) as replicated:
        dtype = replicated.entries["W_enc"].dtype
        with BlockWriter(partial, _inference_layout(training_cfg, dtype)) as writer:
            for name in ("b_dec", "W_router", "b_router"):
                writer.whole(name, replicated.whole(name))
            lowpass = (
                replicated.whole("W_lowpass")
                if "W_lowpass" in replicated.entries
                else None
            )
            for rank in range(world_size):
                _export_shard(
                    checkpoint, rank, world_size, training_cfg, lowpass, writer
                )
    partial.replace(output / SAE_WEIGHTS_FILENAME)
    cfg = training_cfg.get_inference_sae_cfg_dict()
    (output / SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    return output


def _training_config(checkpoint: Path) -> Any:
    cfg_dict = json.loads((checkpoint / SAE_CFG_FILENAME).read_text())
    return TrainingSAEConfig.from_dict(cfg_dict)


def _inference_layout(
    cfg: Any, dtype: torch.dtype
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    d_in, d_sae, n_experts = cfg.d_in, cfg.d_sae, cfg.n_experts
    return {
        "W_enc": (dtype, (d_in, d_sae)),
        "b_enc": (dtype, (d_sae,)),
        "W_dec": (dtype, (d_sae, d_in)),
        "b_dec": (dtype, (d_in,)),
        "W_router": (dtype, (d_in, n_experts)),
        "b_router": (dtype, (n_experts,)),
    }


@torch.no_grad()
def _export_shard(
    checkpoint: Path,
    rank: int,
    world_size: int,
    cfg: Any,
    lowpass: torch.Tensor | None,
    writer: BlockWriter,
) -> None:
    block_size = cfg.d_sae // cfg.n_experts
    experts = expert_slice(Parallel(rank, world_size, True), cfg.n_experts, 1)
    path = shard_folder(checkpoint, rank, world_size) / SAE_WEIGHTS_FILENAME
    if not path.is_file():
        raise ShardError(f"rank {rank}: shard file {path} is missing")
    with SliceReader(path) as reader:
        for local, expert in enumerate(range(experts.start, experts.stop)):
            within = slice(local * block_size, (local + 1) * block_size)
            W_enc = reader.columns("W_enc", within.start, within.stop)  # [d_in, m]
            W_dec = reader.rows("W_dec", within.start, within.stop)  # [m, d_in]
            b_enc = reader.rows("b_enc", within.start, within.stop)  # [m]
            if "omega" in reader.entries:
                omega = reader.rows("omega", local, local + 1)
                W_enc = fold_feature_scaling(W_enc, FeatureScaling(omega, lowpass), 1)
            if cfg.rescale_acts_by_decoder_norm:
                norms = W_dec.norm(dim=-1)
                W_enc, b_enc, W_dec = (
                    W_enc * norms,
                    b_enc * norms,
                    W_dec / norms[:, None],
                )
            start = expert * block_size
            writer.columns("W_enc", start, W_enc)
            writer.rows("W_dec", start, W_dec)
            writer.rows("b_enc", start, b_enc)


# ------------------------------------------------------------------------ loading


@torch.no_grad()
def load_own_experts(
    path: str | Path, parallel: Parallel, device: str = "cpu"
) -> ScaleSAE:
    """An ordinary SAELens folder's SAE with only this process's experts.

    Reads only this process's `W_enc` columns, `W_dec` rows and `b_enc` (and the
    replicated weights), one expert block at a time; the SAE's `encode_sparse` and
    `forward` then work with every process taking part, as in training.
    """
    path = Path(path)
    cfg_dict = json.loads((path / SAE_CFG_FILENAME).read_text())
    cfg_dict = handle_config_defaulting(cfg_dict)
    architecture = cfg_dict["architecture"]
    sae_class = SAE.get_sae_class_for_architecture(architecture)
    if not issubclass(sae_class, ScaleSAE):
        raise ShardError(
            f"{path} holds a {architecture!r} SAE; only Scale and Switch SAEs are "
            "split by expert"
        )
    cfg = sae_class.get_sae_config_class_for_architecture(architecture).from_dict(
        cfg_dict | {"device": "meta"}
    )
    assert isinstance(cfg, ScaleSAEConfig)
    sae = sae_class(cfg)
    sae.cfg.device, sae.device = device, torch.device(device)
    sae.parallel = parallel
    _assign_own_weights(sae, path / SAE_WEIGHTS_FILENAME, parallel)
    leftover = [name for name, t in sae.state_dict().items() if t.is_meta]
    if leftover:
        raise ShardError(f"{path / SAE_WEIGHTS_FILENAME} lacks {leftover}")
    return sae


@torch.no_grad()
def start_from_folder(sae: AnyScaleSAE, path: str | Path, parallel: Parallel) -> None:
    """Replace a new expert shard's weights by this process's slice of a saved SAE
    (`from_pretrained_path` under expert parallelism); weights the folder lacks
    (omega, W_lowpass of an exported SAE) keep their initial values."""
    path = Path(path)
    saved = json.loads((path / SAE_CFG_FILENAME).read_text())
    for field in ("d_in", "d_sae", "n_experts"):
        if saved.get(field) != getattr(sae.cfg, field):
            raise ShardError(
                f"from_pretrained_path {path} has {field}={saved.get(field)}, the "
                f"training config {field}={getattr(sae.cfg, field)}"
            )
    _assign_own_weights(sae, path / SAE_WEIGHTS_FILENAME, parallel)


def _assign_own_weights(sae: AnyScaleSAE, weights: Path, parallel: Parallel) -> None:
    n_experts = sae.cfg.n_experts
    own = expert_slice(parallel, n_experts, sae.cfg.d_sae // n_experts)
    with SliceReader(weights) as reader:
        for name in reader.entries:
            tensor = _read_own(reader, name, own, n_experts, parallel)
            setattr(sae, name, nn.Parameter(tensor.to(sae.device, sae.dtype)))
    if isinstance(sae, ScaleTrainingSAE):
        sae.router_init_pending = False


def _read_own(
    reader: SliceReader, name: str, own: slice, n_experts: int, parallel: Parallel
) -> torch.Tensor:
    """This process's part of one tensor, read one expert block at a time."""
    if name not in EXPERT_PARAMETERS:
        return reader.whole(name)
    if name == "omega":
        experts = expert_slice(parallel, n_experts, 1)
        return reader.rows(name, experts.start, experts.stop)
    entry = reader.entries[name]
    block_size = entry.shape[1 if name == "W_enc" else 0] // n_experts
    if name == "W_enc":
        out = torch.empty(entry.shape[0], own.stop - own.start, dtype=entry.dtype)
        for start in range(own.start, own.stop, block_size):
            at = start - own.start
            out[:, at : at + block_size] = reader.columns(
                name, start, start + block_size
            )
        return out
    out = torch.empty(own.stop - own.start, *entry.shape[1:], dtype=entry.dtype)
    for start in range(own.start, own.stop, block_size):
        at = start - own.start
        out[at : at + block_size] = reader.rows(name, start, start + block_size)
    return out


def remove_shards(folder: Path) -> None:
    """Delete a folder's shards (after they were exported)."""
    shutil.rmtree(folder / SHARDS_FOLDER, ignore_errors=True)
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: export a sharded checkpoint as an ordinary SAELens folder."""
    parser = argparse.ArgumentParser(
        prog="python -m saelens_moe.sharded",
        description="Export an expert-parallel checkpoint (or the latest complete "
        "one below a folder) as an ordinary SAELens folder, one expert at a time.",
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    print(f"Exported to {export_checkpoint(args.checkpoint, args.output)}")


if __name__ == "__main__":
    main()
