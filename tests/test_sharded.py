"""Sharded checkpoints, streaming export and sharded loading (saelens_moe.sharded),
checked in one process: the shards are slices of one SAE, written as each process
of an expert-parallel run writes its own."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from saelens_moe import ScaleSAE, ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.saes.parallel import Parallel, expert_slice
from saelens_moe.saes.scale_sae import draw_init_seed
from saelens_moe.safetensors_stream import BlockWriter, SliceReader
from saelens_moe.sharded import (
    COMPLETE_MARKER,
    ShardError,
    check_shard,
    export_checkpoint,
    load_own_experts,
    mark_complete,
    resolve_checkpoint,
    shard_folder,
)

FIELDS: dict[str, Any] = {"d_in": 16, "d_sae": 256, "n_experts": 8, "k": 6}
WORLD = 2


class LargestTensor(TorchDispatchMode):
    """Records the most bytes any op or factory returns (sparse: stored values)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, ""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and stored(tensor) > self.largest:
                self.largest, self.op = stored(tensor), str(func)
        return out


def stored(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: all its elements, or the values of a sparse one (a
    tensor on the meta device holds none)."""
    if tensor.is_meta:
        return 0
    if tensor.layout == torch.strided:
        values = tensor
    elif tensor.layout == torch.sparse_coo:
        values = tensor._values()
    else:
        values = tensor.values()
    return values.numel() * values.element_size()


def trained_like_sae(**overrides: Any) -> ScaleTrainingSAE:
    """A training SAE with omega, W_lowpass, biases and decoder norms away from init."""
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**(FIELDS | overrides)))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return sae


def write_shards(sae: ScaleTrainingSAE, checkpoint: Path, world: int = WORLD) -> None:
    """What `world` expert-parallel processes holding `sae` write, and the marker."""
    cfg = sae.cfg
    for rank in range(world):
        parallel = Parallel(rank, world, expert_parallel=True)
        latents = expert_slice(parallel, cfg.n_experts, cfg.d_sae // cfg.n_experts)
        experts = expert_slice(parallel, cfg.n_experts, 1)
        state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
        state["W_enc"] = state["W_enc"][:, latents].contiguous()
        state["W_dec"], state["b_enc"] = (
            state["W_dec"][latents],
            state["b_enc"][latents],
        )
        if "omega" in state:
            state["omega"] = state["omega"][experts]
        folder = shard_folder(checkpoint, rank, world)
        folder.mkdir(parents=True)
        save_file(state, folder / "sae_weights.safetensors")
    (checkpoint / "cfg.json").write_text(json.dumps(sae.cfg.to_dict()))
    mark_complete(checkpoint, world, cfg.n_experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_block_writer_and_slice_reader_agree_with_safetensors(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    tensors = {"a": torch.randn(5, 12).to(dtype), "b": torch.randn(7).to(dtype)}
    with BlockWriter(
        tmp_path / "x.safetensors",
        {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
    ) as writer:
        writer.columns("a", 4, tensors["a"][:, 4:])  # out of order, by blocks
        writer.columns("a", 0, tensors["a"][:, :4])
        writer.rows("b", 3, tensors["b"][3:])
        writer.rows("b", 0, tensors["b"][:3])
    loaded = load_file(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    with SliceReader(tmp_path / "x.safetensors") as reader:
        torch.testing.assert_close(reader.columns("a", 3, 9), tensors["a"][:, 3:9])
        torch.testing.assert_close(reader.rows("b", 2, 5), tensors["b"][2:5])


@pytest.mark.parametrize(
    "overrides",
    [{}, {"learn_lowpass": False}, {"feature_scaling": False}, {"dtype": "float64"}],
    ids=["scale", "fixed_lowpass", "no_feature_scaling", "float64"],
)
def test_export_of_shards_equals_save_inference_model(
    overrides: dict[str, Any], tmp_path: Path
) -> None:
    sae = trained_like_sae(**overrides)
    write_shards(sae, tmp_path / "checkpoint")
    export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported")
    sae.save_inference_model(tmp_path / "whole")
    exported = load_file(tmp_path / "exported" / "sae_weights.safetensors")
    whole = load_file(tmp_path / "whole" / "sae_weights.safetensors")
    assert exported.keys() == whole.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(exported[name], tensor, msg=name)
    exported_cfg = json.loads((tmp_path / "exported" / "cfg.json").read_text())
    assert exported_cfg == json.loads((tmp_path / "whole" / "cfg.json").read_text())
    loaded = SAE.load_from_disk(tmp_path / "exported")
    assert isinstance(loaded, ScaleSAE)
    x = torch.randn(20, FIELDS["d_in"]).to(sae.dtype)
    torch.testing.assert_close(loaded(x), sae(x).detach())


def test_export_holds_one_expert_block_at_a_time(tmp_path: Path) -> None:
    fields = {"d_sae": 4096, "n_experts": 16}
    sae = trained_like_sae(**fields)
    write_shards(sae, tmp_path / "checkpoint")
    block = FIELDS["d_in"] * 4096 // 16 * 4  # bytes of one expert's W_enc
    with LargestTensor() as recorder:
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported")
    assert 0 < recorder.largest <= block, recorder.op


def test_loading_reads_only_the_own_experts(tmp_path: Path) -> None:
    sae = trained_like_sae(d_sae=4096, n_experts=16)
    sae.save_inference_model(tmp_path / "whole")
    share = FIELDS["d_in"] * 4096 // 4 * 4  # bytes of one process's W_enc
    for rank in range(4):
        parallel = Parallel(rank, 4, expert_parallel=True)
        with LargestTensor() as recorder:
            own = load_own_experts(tmp_path / "whole", parallel)
        assert recorder.largest <= share, recorder.op
        assert own.W_enc.shape == (FIELDS["d_in"], 1024) and own.parallel == parallel
        whole = load_file(tmp_path / "whole" / "sae_weights.safetensors")
        latents = slice(rank * 1024, (rank + 1) * 1024)
        torch.testing.assert_close(own.W_enc.data, whole["W_enc"][:, latents])
        torch.testing.assert_close(own.W_dec.data, whole["W_dec"][latents])
        torch.testing.assert_close(own.W_router.data, whole["W_router"])


def test_each_expert_starts_the_same_whatever_the_number_of_processes() -> None:
    cfg = ScaleTrainingSAEConfig(**FIELDS)
    torch.manual_seed(3)
    whole = ScaleTrainingSAE(cfg)
    for world in (2, 4):
        for rank in range(world):
            torch.manual_seed(3)
            seed = draw_init_seed()
            meta = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS, device="meta"))
            meta.cfg.device, meta.device = "cpu", torch.device("cpu")
            meta.parallel = Parallel(rank, world, expert_parallel=True)
            meta.init_own_weights(seed)
            latents = expert_slice(meta.parallel, 8, 32)
            torch.testing.assert_close(meta.W_enc, whole.W_enc[:, latents])
            torch.testing.assert_close(meta.W_dec, whole.W_dec[latents])
            torch.testing.assert_close(meta.W_router, whole.W_router)
            assert meta.omega.shape == (8 // world,)
    assert torch.allclose(whole.W_dec.norm(dim=-1), torch.tensor(1.0))


def test_an_incomplete_checkpoint_is_refused_naming_the_last_complete_one(
    tmp_path: Path,
) -> None:
    sae = trained_like_sae()
    root = tmp_path / "checkpoints" / "run"
    write_shards(sae, root / "1024")
    write_shards(sae, root / "2048")
    (root / "2048" / COMPLETE_MARKER).unlink()  # a process died while writing it
    with pytest.raises(ShardError, match=r"2048 is incomplete.*resume from .*1024"):
        resolve_checkpoint(root / "2048")
    assert resolve_checkpoint(tmp_path / "checkpoints") == root / "1024"
    with pytest.raises(ShardError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def _own_shard_sae(rank: int) -> ScaleTrainingSAE:
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS, device="meta"))
    sae.cfg.device, sae.device = "cpu", torch.device("cpu")
    sae.parallel = Parallel(rank, WORLD, expert_parallel=True)
    sae.init_own_weights(0)
    return sae


def test_a_missing_or_mismatched_shard_is_named_with_rank_and_shape(
    tmp_path: Path,
) -> None:
    write_shards(trained_like_sae(), tmp_path / "ckpt")
    parallel = Parallel(1, WORLD, expert_parallel=True)
    own = _own_shard_sae(1)
    assert check_shard(tmp_path / "ckpt", own, parallel).is_file()
    wrong = ScaleTrainingSAE(ScaleTrainingSAEConfig(**(FIELDS | {"d_sae": 512})))
    wrong.parallel = parallel
    expected = r"rank 1: .* holds W_dec of shape \(128, 16\), expected \(512, 16\)"
    with pytest.raises(ShardError, match=expected):
        check_shard(tmp_path / "ckpt", wrong, parallel)
    shard = shard_folder(tmp_path / "ckpt", 1, WORLD) / "sae_weights.safetensors"
    shard.unlink()
    with pytest.raises(ShardError, match=rf"rank 1: shard file {shard} is missing"):
        check_shard(tmp_path / "ckpt", own, parallel)
    with pytest.raises(ShardError, match="written by 2 processes and this job has 4"):
        check_shard(tmp_path / "ckpt", own, Parallel(1, 4, expert_parallel=True))
