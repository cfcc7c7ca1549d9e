"""Training on two gloo processes equals training in one (saelens_moe.distributed).

Each test starts two CPU processes (one thread each) that join a gloo group whose
collectives time out after COLLECTIVE_TIMEOUT_S, so a broken test fails instead of
hanging. Workers write what they computed to files the test compares.
"""

import copy
import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Array2D, Dataset, Features, IterableDataset
from sae_lens import SAE, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from safetensors.torch import load_file, save_file

import saelens_moe.distributed as distributed
import saelens_moe.saes.parallel as parallel_module
from saelens_moe import ScaleSAE, ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.distributed import (
    DistributedSAETrainer,
    DistributedSAETrainingRunner,
    RankFailedError,
    _rows_of_rank,
    check_parallel_config,
    join_process_group,
    new_expert_shard,
    share_weights,
)
from saelens_moe.errors import NonFiniteLossError
from saelens_moe.saes.moe import SparseCode
from saelens_moe.saes.parallel import (
    EXPERT_PARAMETERS,
    ExpertExchange,
    Parallel,
    expert_slice,
)
from saelens_moe.sharded import (
    SHARDS_FOLDER,
    export_checkpoint,
    is_complete,
    load_own_experts,
    shard_folder,
)
from saelens_moe.tiny import TINY_D_MODEL, build_tiny_gpt2, build_token_dataset
from saelens_moe.train import run, split_args
from saelens_moe.trainer import MoESAETrainer
from tests.reliability_runs import (
    BATCH_TOKENS,
    CONTEXT,
    HOOK,
    PROMPTS,
    activation_batches,
    make_trainer,
    runner_config,
)
from tests.test_sharded import LargestTensor

WORLD = 2
COLLECTIVE_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[1]
Worker = Callable[[Parallel, Path], None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bootstrap(
    rank: int,
    port: int,
    worker: Worker,
    out: Path,
    ep: bool,
    world: int,
    timeout: float,
) -> None:
    torch.set_num_threads(1)
    os.environ |= {  # as torchrun sets them
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
    }
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
    )
    try:
        worker(Parallel(rank, world, expert_parallel=ep), out)
    except BaseException as error:
        (out / f"rank{rank}.err").write_text(
            f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        )
        raise
    finally:
        dist.destroy_process_group()


def launch(
    worker: Worker,
    out: Path,
    expert_parallel: bool = False,
    world: int = WORLD,
    timeout: float = COLLECTIVE_TIMEOUT_S,
) -> list[int]:
    """Run `worker` on `world` gloo processes; their exit codes (killed if they hang)."""
    out.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(
            target=_bootstrap,
            args=(rank, port, worker, out, expert_parallel, world, timeout),
        )
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"{len(hung)} worker(s) still running after {JOIN_TIMEOUT_S} s"
    return [process.exitcode or 0 for process in processes]


def error_of(out: Path, rank: int) -> str:
    path = out / f"rank{rank}.err"
    return path.read_text() if path.exists() else ""


# ------------------------------------------------------------------ data parallel

SAE_FIELDS: dict[str, Any] = {
    "d_in": 16,
    "d_sae": 64,
    "n_experts": 8,
    "n_active_experts": 2,
    "k": 6,
    "dead_latent_window": None,
}
DP_STEPS = 4
DP_FIELDS = {"d_sae": 128, "k": 2}  # sparse enough that latents die and AuxK runs
DEAD_LATENT_COUNTERS = {  # case: (SAE fields, SAELens runner fields)
    "saelens_window": ({"dead_latent_window": None}, {"dead_feature_window": 1}),
    "sae_window": ({"dead_latent_window": 1}, {}),
}


def _training_sae(**overrides: Any) -> ScaleTrainingSAE:
    torch.manual_seed(0)
    return ScaleTrainingSAE(ScaleTrainingSAEConfig(**(SAE_FIELDS | overrides)))


def _dp_batches() -> list[torch.Tensor]:
    return activation_batches(DP_STEPS, d_in=SAE_FIELDS["d_in"])


def _dp_worker(parallel: Parallel, out: Path) -> None:
    results = {}
    for case, (sae_fields, runner_fields) in DEAD_LATENT_COUNTERS.items():
        sae = _training_sae(**DP_FIELDS, **sae_fields)
        share_weights(sae, parallel)
        halves = [batch.chunk(WORLD)[parallel.rank] for batch in _dp_batches()]
        cfg = runner_config(out, n_steps=DP_STEPS, **runner_fields)
        trainer = DistributedSAETrainer(
            parallel,
            cfg=cfg.to_sae_trainer_config(),
            sae=sae,
            data_provider=iter(halves),
        )
        for half in halves:
            trainer.step(half)
            trainer.n_training_steps += 1
        results[case] = {
            "weights": sae.state_dict(),
            "dead": trainer.n_forward_passes_since_fired,
            "samples": trainer.n_training_samples,
        }
    torch.save(results, out / f"rank{parallel.rank}.pt")


@pytest.fixture(scope="module")
def data_parallel_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dp")
    assert launch(_dp_worker, out) == [0, 0], error_of(out, 0)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(DEAD_LATENT_COUNTERS))
def test_data_parallel_steps_on_half_batches_equal_one_process_on_whole_batches(
    case: str, data_parallel_results: list[dict[str, Any]], tmp_path: Path
) -> None:
    sae_fields, runner_fields = DEAD_LATENT_COUNTERS[case]
    sae = _training_sae(**DP_FIELDS, **sae_fields)
    batches = _dp_batches()
    trainer = make_trainer(
        tmp_path, sae, iter(batches), n_steps=DP_STEPS, **runner_fields
    )
    aux_losses = []
    for batch in batches:
        output = trainer.step(batch)
        aux_losses.append(output.losses["auxiliary_reconstruction_loss"].item())
        trainer.n_training_steps += 1
    ranks = [result[case] for result in data_parallel_results]
    for name, expected in sae.state_dict().items():
        for rank in ranks:
            torch.testing.assert_close(rank["weights"][name], expected, msg=name)
    assert ranks[0]["samples"] == trainer.n_training_samples == DP_STEPS * BATCH_TOKENS
    # AuxK ran on latents found dead over both processes' tokens
    assert max(aux_losses) > 0
    torch.testing.assert_close(ranks[1]["dead"], trainer.n_forward_passes_since_fired)


LAZY_FIELDS = DP_FIELDS | {"dead_latent_window": 1}  # AuxK rows too


def _lazy_worker(parallel: Parallel, out: Path) -> None:
    torch.manual_seed(0)  # as _training_sae
    cfg = ScaleTrainingSAEConfig(**(SAE_FIELDS | LAZY_FIELDS))
    if parallel.expert_parallel:
        sae = new_expert_shard(cfg, parallel)
    else:
        sae = _training_sae(**LAZY_FIELDS)
        share_weights(sae, parallel)
    halves = [batch.chunk(WORLD)[parallel.rank] for batch in _dp_batches()]
    trainer = DistributedSAETrainer(
        parallel,
        lazy_adam=True,
        cfg=runner_config(out, n_steps=DP_STEPS).to_sae_trainer_config(),
        sae=sae,
        data_provider=iter(halves),
    )
    for half in halves:
        trainer.step(half)
        trainer.n_training_steps += 1
    weights = {name: p.detach().contiguous() for name, p in sae.named_parameters()}
    torch.save(weights, out / f"rank{parallel.rank}.pt")


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_lazy_adam_on_two_processes_trains_the_one_process_sae(
    expert_parallel: bool, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    codes = launch(_lazy_worker, out, expert_parallel=expert_parallel)
    assert codes == [0, 0], error_of(out, 0)
    sae = _training_sae(**LAZY_FIELDS)
    batches = _dp_batches()
    trainer = MoESAETrainer(
        lazy_adam=True,
        cfg=runner_config(tmp_path, n_steps=DP_STEPS).to_sae_trainer_config(),
        sae=sae,
        data_provider=iter(batches),
    )
    for batch in batches:
        trainer.step(batch)
        trainer.n_training_steps += 1
    cfg = sae.cfg
    for rank in range(WORLD):
        weights = torch.load(out / f"rank{rank}.pt")
        own = expert_slice(Parallel(rank, WORLD, True), cfg.n_experts, 1)
        for name, expected in sae.named_parameters():
            if expert_parallel and name in EXPERT_PARAMETERS:
                per_block = 1 if name == "omega" else cfg.d_sae // cfg.n_experts
                latents = slice(own.start * per_block, own.stop * per_block)
                part = expected[:, latents] if name == "W_enc" else expected[latents]
            else:
                part = expected
            torch.testing.assert_close(weights[name], part.detach(), msg=name)


# ---------------------------------------------------------------- expert parallel

EP_CASES: dict[str, dict[str, Any]] = {
    "scale_fs_float64": {"dtype": "float64"},
    "switch_float64": {
        "dtype": "float64",
        "n_active_experts": 1,
        "expert_weighting": "probs",
        "feature_scaling": False,
    },
    "scale_fs_float32": {"dtype": "float32"},
}
EP_TOKENS = 96


def _ep_inputs(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(EP_TOKENS, SAE_FIELDS["d_in"], generator=generator)
    dead = torch.rand(SAE_FIELDS["d_sae"], generator=generator) < 0.5
    return tokens.to(getattr(torch, dtype)), dead


def _forward_backward(
    sae: ScaleTrainingSAE, tokens: torch.Tensor, dead: torch.Tensor
) -> dict[str, Any]:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=tokens,
            coefficients={"load_balancing": 3.0},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    return {
        "sae_out": output.sae_out.detach(),
        "losses": {name: loss.detach() for name, loss in output.losses.items()},
        "grads": {name: p.grad for name, p in sae.named_parameters()},
    }


def _ep_worker(parallel: Parallel, out: Path) -> None:
    results = {}
    for case, fields in EP_CASES.items():
        torch.manual_seed(0)  # as _training_sae
        sae = new_expert_shard(
            ScaleTrainingSAEConfig(**(SAE_FIELDS | fields)), parallel
        )
        tokens, dead = _ep_inputs(fields["dtype"])
        results[case] = _forward_backward(sae, tokens.chunk(WORLD)[parallel.rank], dead)
        results[case]["sizes"] = {n: p.numel() for n, p in sae.named_parameters()}
    torch.save(results, out / f"rank{parallel.rank}.pt")


@pytest.fixture(scope="module")
def expert_parallel_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ep")
    assert launch(_ep_worker, out, expert_parallel=True) == [0, 0], error_of(out, 0)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(EP_CASES))
def test_expert_parallel_forward_losses_and_gradients_equal_the_whole_sae(
    case: str, expert_parallel_results: list[dict[str, Any]]
) -> None:
    fields = EP_CASES[case]
    sae = _training_sae(**fields)
    tokens, dead = _ep_inputs(fields["dtype"])
    # the whole batch's mean losses are the mean of the two halves'
    expected = _forward_backward(sae, tokens, dead)
    ranks = [result[case] for result in expert_parallel_results]
    torch.testing.assert_close(
        torch.cat([rank["sae_out"] for rank in ranks]), expected["sae_out"]
    )
    for name, loss in expected["losses"].items():
        halves = torch.stack([rank["losses"][name] for rank in ranks])
        torch.testing.assert_close(halves.mean(), loss, msg=name)
    assert expected["losses"]["auxiliary_reconstruction_loss"] > 0
    cfg = sae.cfg
    for name, grad in expected["grads"].items():
        if name in EXPERT_PARAMETERS:  # each rank: its experts' share, both halves
            per_block = 1 if name == "omega" else cfg.d_sae // cfg.n_experts
            parts = []
            for rank in range(WORLD):
                own = expert_slice(Parallel(rank, WORLD, True), cfg.n_experts, 1)
                latents = slice(own.start * per_block, own.stop * per_block)
                part = grad[:, latents] if name == "W_enc" else grad[latents]
                parts.append(part)
                assert ranks[rank]["sizes"][name] == part.numel()  # memory falls 1/P
            got = [rank["grads"][name] / WORLD for rank in ranks]
            for part, shard in zip(parts, got, strict=True):
                torch.testing.assert_close(shard, part, msg=name)
        else:  # replicated: the two halves' gradients add up
            summed = sum(rank["grads"][name] for rank in ranks) / WORLD
            torch.testing.assert_close(summed, grad, msg=name)


# ------------------------------------------- sharded loading, encode_sparse, evals

LOAD_FIELDS: dict[str, Any] = {
    "d_in": TINY_D_MODEL,
    "d_sae": 256,
    "n_experts": 8,
    "k": 6,
}
EVAL_CONFIG = EvalConfig(
    batch_size_prompts=4,
    n_eval_reconstruction_batches=2,
    n_eval_sparsity_variance_batches=2,
    compute_ce_loss=True,
    compute_l2_norms=True,
    compute_sparsity_metrics=True,
    compute_variance_metrics=True,
)


def _saved_sae(folder: Path) -> ScaleTrainingSAE:
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**LOAD_FIELDS))
    with torch.no_grad():
        sae.b_enc.add_(0.1 * torch.randn_like(sae.b_enc))
        sae.omega.add_(0.2 * torch.randn_like(sae.omega))
    metadata = sae.cfg.metadata
    metadata.hook_name, metadata.context_size, metadata.prepend_bos = (
        HOOK,
        CONTEXT,
        True,
    )
    sae.save_inference_model(folder)
    return sae


def _evals(sae: SAE[Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_tiny_gpt2()
    store = ActivationsStore.from_sae(
        model,
        sae,
        build_token_dataset(n_rows=64, context_size=CONTEXT),
        streaming=False,
        store_batch_size_prompts=4,
        n_batches_in_buffer=4,
        train_batch_size_tokens=64,
    )
    metrics, _ = run_evals(
        sae, store, model, ActivationScaler(), EVAL_CONFIG, exclude_special_tokens=False
    )
    return {
        f"{group}/{name}": value
        for group, values in metrics.items()
        for name, value in values.items()
    }


def _load_worker(parallel: Parallel, out: Path) -> None:
    sae = load_own_experts(out / "whole", parallel)
    tokens = torch.randn(40, TINY_D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code = sae.encode_sparse(tokens)
        result = {
            "values": code.values,
            "latents": code.latents,
            "forward": sae(tokens),
            "metrics": _evals(sae),
        }
    result["W_enc"] = tuple(sae.W_enc.shape)
    torch.save(result, out / f"rank{parallel.rank}.pt")


def test_each_rank_loads_its_experts_and_encodes_and_evaluates_as_one_process(
    tmp_path: Path,
) -> None:
    _saved_sae(tmp_path / "whole")
    assert launch(_load_worker, tmp_path, expert_parallel=True) == [0, 0], error_of(
        tmp_path, 0
    )
    whole = SAE.load_from_disk(tmp_path / "whole")
    assert isinstance(whole, ScaleSAE)
    tokens = torch.randn(40, TINY_D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        values, latents = whole.encode_sparse(tokens)
        forward = whole(tokens)
    expected_metrics = _evals(whole)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["W_enc"] == (TINY_D_MODEL, LOAD_FIELDS["d_sae"] // WORLD)
        torch.testing.assert_close(got["values"], values)
        assert torch.equal(got["latents"], latents)
        torch.testing.assert_close(got["forward"], forward)
        numeric = {n: v for n, v in expected_metrics.items() if isinstance(v, float)}
        assert {
            "reconstruction_quality/explained_variance",
            "model_performance_preservation/ce_loss_score",
            "sparsity/l0",
        } <= numeric.keys()
        for name, value in numeric.items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                name
            )


def _from_pretrained_worker(parallel: Parallel, out: Path) -> None:
    cfg = runner_config(
        out,
        sae={k: v for k, v in LOAD_FIELDS.items() if k != "d_in"},
        from_pretrained_path=str(out / "whole"),
    )
    runner = DistributedSAETrainingRunner(
        cfg,
        parallel,
        override_dataset=build_token_dataset(n_rows=64, context_size=CONTEXT),
        override_model=build_tiny_gpt2(),
    )
    sae = runner.sae
    assert isinstance(sae, ScaleTrainingSAE)
    saved = {"weights": dict(sae.state_dict()), "pending": sae.router_init_pending}
    torch.save(saved, out / f"rank{parallel.rank}.pt")


def test_expert_parallel_training_starts_from_a_saved_sae_reading_own_slices(
    tmp_path: Path,
) -> None:
    _saved_sae(tmp_path / "whole")
    codes = launch(_from_pretrained_worker, tmp_path, expert_parallel=True)
    assert codes == [0, 0], error_of(tmp_path, 0)
    whole = load_file(tmp_path / "whole" / "sae_weights.safetensors")
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert not saved["pending"]  # training keeps the saved router
        state = saved["weights"]
        latents = slice(rank * 128, (rank + 1) * 128)
        torch.testing.assert_close(state["W_enc"], whole["W_enc"][:, latents])
        torch.testing.assert_close(state["b_enc"], whole["b_enc"][latents])
        torch.testing.assert_close(state["W_router"], whole["W_router"])
        assert torch.equal(state["omega"], torch.zeros(4))  # not in an export


# ------------------------------------- sharded checkpoints: resume, kill, export

RUN_SAE: dict[str, Any] = {"d_sae": 128, "n_experts": 8, "k": 6}
RUN_STEPS = 6


def _run_tiny(cfg: Any, parallel: Parallel) -> None:
    DistributedSAETrainingRunner(
        cfg,
        parallel,
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=build_tiny_gpt2(),
    ).run()


def _sharded_run(
    parallel: Parallel, out: Path, resume: Path | None = None, die_at: int = 0
) -> None:
    """Expert-parallel training through SAELens's runner: 6 steps, 2 checkpoints."""
    if die_at and parallel.rank == 1:
        _die_while_writing_shard(die_at)
    torch.manual_seed(0)
    cfg = runner_config(
        out,
        sae=RUN_SAE,
        n_checkpoints=2,
        train_batch_size_tokens=WORLD * BATCH_TOKENS,
        training_tokens=RUN_STEPS * WORLD * BATCH_TOKENS,
        resume_from_checkpoint=None if resume is None else str(resume),
    )
    _run_tiny(cfg, parallel)


def _die_while_writing_shard(at_call: int) -> None:
    """On the at_call-th shard this rank writes, write half a file and die."""
    calls = [0]
    original = distributed.save_shard

    def save_then_die(sae: Any, folder: Path) -> Path:
        calls[0] += 1
        if calls[0] < at_call:
            return original(sae, folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sae_weights.safetensors").write_bytes(b"\\0" * 100)
        os._exit(3)

    distributed.save_shard = save_then_die  # pyright: ignore[reportAttributeAccessIssue]


def _uninterrupted(parallel: Parallel, out: Path) -> None:
    _sharded_run(parallel, out)


def _killed(parallel: Parallel, out: Path) -> None:
    _sharded_run(parallel, out, die_at=2)


def _resumed(parallel: Parallel, out: Path) -> None:
    _sharded_run(parallel, out, resume=out.parent / "killed" / "checkpoints")


def test_a_run_killed_while_checkpointing_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path,
) -> None:
    assert launch(_uninterrupted, tmp_path / "whole_run", expert_parallel=True) == [
        0,
        0,
    ], error_of(tmp_path / "whole_run", 0)
    codes = launch(_killed, tmp_path / "killed", expert_parallel=True, timeout=10)
    assert codes[1] == 3 and codes[0] != 0
    checkpoints = sorted(
        (tmp_path / "killed" / "checkpoints").glob("*/*"), key=lambda p: int(p.name)
    )
    assert len(checkpoints) == 2
    assert is_complete(checkpoints[0]) and not is_complete(checkpoints[1])
    assert launch(_resumed, tmp_path / "resumed", expert_parallel=True) == [0, 0], (
        error_of(tmp_path / "resumed", 0)
    )
    assert not (tmp_path / "killed" / "output").exists()
    # the uninterrupted run and the resumed one end with the same SAE
    assert (
        max(
            _relative_difference(
                tmp_path / "resumed" / "output", tmp_path / "whole_run" / "output"
            ).values()
        )
        < 1e-6
    )
    for name in ("cfg.json", "sparsity.safetensors", "runner_cfg.json"):
        assert (tmp_path / "resumed" / "output" / name).is_file()
    assert not (tmp_path / "resumed" / "output" / SHARDS_FOLDER).exists()
    # each uninterrupted checkpoint is sharded: no file holds the whole W_enc
    [first, *_] = sorted((tmp_path / "whole_run" / "checkpoints").glob("*/*"))
    assert not (first / "sae_weights.safetensors").exists()
    shard = load_file(shard_folder(first, 1, WORLD) / "sae_weights.safetensors")
    assert shard["W_enc"].shape == (TINY_D_MODEL, RUN_SAE["d_sae"] // WORLD)
    exported = export_checkpoint(first, tmp_path / "exported")
    assert isinstance(SAE.load_from_disk(exported), ScaleSAE)


def _mismatched_resume(parallel: Parallel, out: Path) -> None:
    checkpoint = sorted((out.parent / "whole_run" / "checkpoints").glob("*/*"))[0]
    shard = shard_folder(checkpoint, 1, WORLD) / "sae_weights.safetensors"
    if parallel.rank == 1:
        state = load_file(shard)
        state["W_dec"] = state["W_dec"][:-1].contiguous()
        save_file(state, shard)
    dist.barrier()
    _sharded_run(parallel, out, resume=checkpoint)


def test_a_mismatched_shard_stops_every_rank_naming_file_rank_and_shape(
    tmp_path: Path,
) -> None:
    assert launch(_uninterrupted, tmp_path / "whole_run", expert_parallel=True) == [
        0,
        0,
    ]
    codes = launch(_mismatched_resume, tmp_path / "bad", expert_parallel=True)
    assert codes[0] != 0 and codes[1] != 0
    for rank in range(WORLD):
        message = error_of(tmp_path / "bad", rank)
        assert "ShardError: rank 1: shard file" in message
        assert "holds W_dec of shape (63, 32), expected (64, 32)" in message


def _training_with_evals(parallel: Parallel, out: Path) -> None:
    """Expert-parallel training with SAELens's evals on (wandb offline on rank 0)."""
    os.environ["WANDB_MODE"] = "offline"
    for variable in (
        "WANDB_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_DATA_DIR",
        "WANDB_CONFIG_DIR",
    ):
        os.environ[variable] = str(out / "wandb")
    (out / "wandb").mkdir(exist_ok=True)
    recorded: list[dict[str, Any]] = []
    averaging = distributed._mean_over_processes

    def recording(metrics: dict[str, Any], *args: Any) -> dict[str, Any]:
        averaged = averaging(metrics, *args)
        recorded.append(copy.deepcopy(averaged))  # before SAELens adds histograms
        return averaged

    distributed._mean_over_processes = recording  # pyright: ignore[reportAttributeAccessIssue]
    torch.manual_seed(0)
    cfg = runner_config(
        out,
        sae=RUN_SAE,
        train_batch_size_tokens=WORLD * BATCH_TOKENS,
        training_tokens=4 * WORLD * BATCH_TOKENS,
        n_eval_batches=2,
        eval_batch_size_prompts=4,
        logger=LoggingConfig(
            log_to_wandb=True, wandb_log_frequency=1, eval_every_n_wandb_logs=2
        ),
    )
    _run_tiny(cfg, parallel)
    torch.save(recorded, out / f"rank{parallel.rank}.pt")


def test_saelens_evals_run_on_every_rank_during_expert_parallel_training(
    tmp_path: Path,
) -> None:
    codes = launch(_training_with_evals, tmp_path, expert_parallel=True)
    assert codes == [0, 0], error_of(tmp_path, 0) + error_of(tmp_path, 1)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # steps 2 and 4
    for first, second in zip(*ranks, strict=True):
        assert first == second  # every rank holds the mean over both
        performance = first["model_performance_preservation"]
        assert {"ce_loss_score", "ce_loss_with_sae"} <= performance.keys()
        explained = first["reconstruction_quality"]["explained_variance"]
        assert isinstance(explained, float) and -1 < explained < 1  # 2-4 steps in
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # rank 0 logged them


def _global_batches_config(out: Path, **fields: Any) -> Any:
    """4 steps of a global batch of WORLD LLM batches, no checkpoints."""
    return runner_config(
        out,
        train_batch_size_tokens=WORLD * BATCH_TOKENS,
        training_tokens=4 * WORLD * BATCH_TOKENS,
        checkpoint_path=None,
        **fields,
    )


def _normalised_fields(normalize: str) -> dict[str, Any]:
    return {
        "sae": RUN_SAE | {"normalize_activations": normalize},
        "n_batches_for_norm_estimate": 2,
    }


def _cached_fields(out: Path) -> dict[str, Any]:
    return {
        "sae": RUN_SAE,
        "use_cached_activations": True,
        "cached_activations_path": str(out.parent / "cache"),
    }


def _whitened_run(parallel: Parallel, out: Path) -> None:
    torch.manual_seed(0)
    fields = _normalised_fields("covariance_whitening")
    _run_tiny(_global_batches_config(out, **fields), parallel)


def _scaled_run(parallel: Parallel, out: Path) -> None:
    torch.manual_seed(0)
    fields = _normalised_fields("expected_average_only_in")
    _run_tiny(_global_batches_config(out, **fields), parallel)


def _cached_run(parallel: Parallel, out: Path) -> None:
    torch.manual_seed(0)
    _run_tiny(_global_batches_config(out, **_cached_fields(out)), parallel)


def _assert_two_processes_train_the_one_process_sae(
    tmp_path: Path, worker: Worker, expert_parallel: bool, **fields: Any
) -> None:
    """`worker` on two processes saves the SAE one process trains with `fields`."""
    torch.manual_seed(0)
    single = _global_batches_config(
        tmp_path / "single",
        n_batches_in_buffer=WORLD * PROMPTS,  # holds one global batch
        **fields,
    )
    LanguageModelSAETrainingRunner(
        single,
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=build_tiny_gpt2(),
    ).run()
    codes = launch(worker, tmp_path / "two", expert_parallel=expert_parallel)
    assert codes == [0, 0], error_of(tmp_path / "two", 0)
    differences = _relative_difference(
        tmp_path / "two" / "output", tmp_path / "single" / "output"
    )
    assert max(differences.values()) < 1e-4, differences


NORMALISED_RUNS: dict[str, Worker] = {
    "covariance_whitening": _whitened_run,
    "expected_average_only_in": _scaled_run,
}


@pytest.mark.parametrize("normalize", list(NORMALISED_RUNS))
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["dp", "ep"])
def test_normalised_activations_on_two_processes_train_the_one_process_sae(
    normalize: str, expert_parallel: bool, tmp_path: Path
) -> None:
    _assert_two_processes_train_the_one_process_sae(
        tmp_path,
        NORMALISED_RUNS[normalize],
        expert_parallel,
        **_normalised_fields(normalize),
    )
    cfg = json.loads((tmp_path / "two" / "output" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"  # folded into the weights


def _write_activation_cache(path: Path) -> None:
    """The tiny model's hook activations for 256 rows, as SAELens's cache stores them."""
    model = build_tiny_gpt2()
    tokens = torch.tensor(
        build_token_dataset(n_rows=256, context_size=CONTEXT)["tokens"]
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    shape = (CONTEXT, TINY_D_MODEL)
    features = Features({HOOK: Array2D(shape=shape, dtype="float32")})
    Dataset.from_dict({HOOK: cache[HOOK].numpy()}, features=features).save_to_disk(
        str(path)
    )


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["dp", "ep"])
def test_cached_activations_on_two_processes_train_the_one_process_sae(
    expert_parallel: bool, tmp_path: Path
) -> None:
    _write_activation_cache(tmp_path / "cache")
    _assert_two_processes_train_the_one_process_sae(
        tmp_path,
        _cached_run,
        expert_parallel,
        **_cached_fields(tmp_path / "single"),
    )


# ------------------------------- no process ever builds a whole-dictionary tensor

BIG_SAE: dict[str, Any] = {"d_sae": 32768, "n_experts": 128, "k": 8}


def _recorded_lifecycle(parallel: Parallel, out: Path) -> None:
    """init -> 3 steps -> checkpoint -> resume -> 2 steps -> export, recorded."""
    base: dict[str, Any] = {
        "sae": BIG_SAE,
        "train_batch_size_tokens": 256,
        "checkpoint_path": str(out / "checkpoints"),
    }
    with LargestTensor() as first:
        torch.manual_seed(0)
        cfg = runner_config(
            out / "first",
            save_final_checkpoint=True,
            training_tokens=3 * 256,
            output_path=None,
            **base,
        )
        _run_tiny(cfg, parallel)
    [checkpoint] = (out / "checkpoints").glob("*/final_*")
    with LargestTensor() as resumed:
        cfg = runner_config(
            out / "second",
            resume_from_checkpoint=str(checkpoint),
            training_tokens=5 * 256,
            output_path=str(out / "second" / "output"),
            **base,
        )
        _run_tiny(cfg, parallel)
    torch.save(
        {"first": (first.largest, first.op), "resumed": (resumed.largest, resumed.op)},
        out / f"rank{parallel.rank}.pt",
    )


@pytest.mark.parametrize("world", [2, 4])
def test_no_rank_ever_builds_more_than_its_share_of_the_dictionary(
    world: int, tmp_path: Path
) -> None:
    codes = launch(_recorded_lifecycle, tmp_path, expert_parallel=True, world=world)
    assert codes == [0] * world, error_of(tmp_path, 0)
    share = TINY_D_MODEL * BIG_SAE["d_sae"] // world * 4  # bytes of one rank's W_enc
    for rank in range(world):
        recorded = torch.load(tmp_path / f"rank{rank}.pt")
        for phase, (largest, op) in recorded.items():
            assert 0 < largest <= share, (rank, phase, op, largest, share)
    loaded = SAE.load_from_disk(tmp_path / "second" / "output")
    assert isinstance(loaded, ScaleSAE)
    assert loaded.W_enc.shape == (TINY_D_MODEL, BIG_SAE["d_sae"])


# ----------------------------------------- the GPU stand-in: meta-device tensors


def test_gradient_clipping_and_averaging_run_with_meta_gradients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, a CPU scalar stacked with GPU norms fails; meta fails the same way."""
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, **_: tensor)
    for expert_parallel in (False, True):
        sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**SAE_FIELDS, device="meta"))
        sae.parallel = Parallel(0, 1, expert_parallel)
        for parameter in sae.parameters():
            parameter.grad = torch.empty_like(parameter)
        cfg = runner_config(tmp_path).to_sae_trainer_config()
        trainer = DistributedSAETrainer(
            Parallel(0, 1, expert_parallel), cfg=cfg, sae=sae, data_provider=iter([])
        )
        trainer._average_gradients()
        trainer._clip_gradients()
        assert all(p.grad is not None and p.grad.is_meta for p in sae.parameters())


def test_the_expert_exchange_keeps_every_tensor_on_the_weights_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exchange's routes and decode on meta tensors, collectives as one process."""
    monkeypatch.setattr(
        dist, "all_to_all_single", lambda out, rows, *_, **__: out.copy_(rows)
    )
    monkeypatch.setattr(Parallel, "process_group", lambda self: None)
    monkeypatch.setattr(
        parallel_module.functional_collectives,
        "all_to_all_single",
        lambda rows, *_: rows.clone(),
    )
    n_tokens, n_active, block, d_in = 5, 2, 4, 3
    pairs = n_tokens * n_active
    order = torch.arange(pairs, device="meta")
    exchange = ExpertExchange(
        order, order, [pairs], [pairs], order % 2, Parallel(0, 1, True)
    )
    sae_in = torch.empty(n_tokens, d_in, device="meta")
    pre = exchange.pre_activations(
        sae_in, n_active, lambda inputs, local: inputs.new_empty(len(local), 1, block)
    )
    assert pre.shape == (n_tokens, n_active, block) and pre.is_meta
    code = SparseCode(
        torch.empty(n_tokens, 3, device="meta"),
        torch.zeros(n_tokens, 3, dtype=torch.long, device="meta"),
    )
    experts = torch.zeros(n_tokens, n_active, dtype=torch.long, device="meta")
    decoded = exchange.decode(
        code, experts, block, lambda own: own.values.new_empty(len(own.values), d_in)
    )
    assert decoded.shape == (n_tokens, d_in) and decoded.is_meta


# -------------------------------------------------------------------------- faults


class _OnRank:
    """A model hook that, on one rank's n-th LLM batch, poisons or raises."""

    def __init__(self, n_calls: int, raise_error: bool) -> None:
        self.n_calls, self.raise_error, self.calls = n_calls, raise_error, 0

    def __call__(self, activation: torch.Tensor, hook: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls != self.n_calls:
            return activation
        if self.raise_error:
            raise ValueError("a bad batch")
        activation = activation.clone()
        activation[0, -1, 0] = float("nan")
        return activation


def _run_until_fault(parallel: Parallel, out: Path, raise_error: bool) -> None:
    model = build_tiny_gpt2()
    if parallel.rank == 1:  # one LLM batch per step: call 6 is step 5
        model.add_hook(HOOK, _OnRank(n_calls=6, raise_error=raise_error))
    cfg = runner_config(  # each rank: one LLM batch per step
        out,
        n_checkpoints=1,
        train_batch_size_tokens=WORLD * BATCH_TOKENS,
        training_tokens=8 * WORLD * BATCH_TOKENS,
    )
    runner = DistributedSAETrainingRunner(
        cfg,
        parallel,
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=model,
    )
    runner.run()


def _fault_nan(parallel: Parallel, out: Path) -> None:
    _run_until_fault(parallel, out, raise_error=False)


def _fault_raise(parallel: Parallel, out: Path) -> None:
    _run_until_fault(parallel, out, raise_error=True)


@pytest.mark.parametrize("fault", [_fault_nan, _fault_raise], ids=["nan", "raise"])
def test_a_failing_rank_ends_the_job_naming_rank_and_step(
    fault: Worker, tmp_path: Path
) -> None:
    codes = launch(fault, tmp_path)
    assert codes[0] != 0 and codes[1] != 0
    failing = error_of(tmp_path, 1)
    if fault is _fault_nan:  # both stop together, naming rank 1
        assert NonFiniteLossError.__name__ in failing and "rank 1" in failing
        assert "rank 1's loss is not finite" in error_of(tmp_path, 0)
    else:
        assert "rank 1 stopped at training step 5" in failing
        assert "ValueError: a bad batch" in failing
        assert RankFailedError.__name__ in error_of(tmp_path, 0)
    # the checkpoint rank 0 wrote at step 4 is an ordinary SAE
    [checkpoint] = sorted(p.parent for p in tmp_path.rglob("trainer_state.pt"))
    assert isinstance(SAE.load_from_disk(str(checkpoint)), ScaleSAE)
    assert not (tmp_path / "output").exists()


# ------------------------------------------------------------- the command line


def _command_line_worker(parallel: Parallel, out: Path) -> None:
    output = run(
        [
            "--architecture", "scale",
            "--d_in", str(TINY_D_MODEL), "--d_sae", "64", "--n_experts", "4",
            "--n_active_experts", "2", "-k", "4",
            "--hook_name", HOOK, "--context_size", "16",
            "--training_tokens", "1024", "--train_batch_size_tokens", "256",
            "--store_batch_size_prompts", "8", "--n_batches_in_buffer", "16",
            "--nolog_to_wandb", "--output_path", str(out / "output"),
            "--expert_parallel", "--collective_timeout_s", "30",
        ],
        override_model=build_tiny_gpt2(),
        override_dataset=build_token_dataset(),
    )  # fmt: skip
    (out / f"rank{parallel.rank}.txt").write_text(str(output))


def test_the_command_line_trains_expert_parallel_under_torchrun(
    tmp_path: Path,
) -> None:
    assert launch(_command_line_worker, tmp_path) == [0, 0], error_of(tmp_path, 0)
    assert (tmp_path / "rank0.txt").read_text() == str(tmp_path / "output")
    assert (tmp_path / "rank1.txt").read_text() == "None"  # only rank 0 saves
    loaded = SAE.load_from_disk(str(tmp_path / "output"))
    assert isinstance(loaded, ScaleSAE) and loaded.W_enc.shape == (TINY_D_MODEL, 64)


# ---------------------------------------------------------------------- the example


def _run_example(out: Path, *flags: str, processes: int = 1) -> Path:
    script = str(ROOT / "examples" / "train_distributed.py")
    args = ["--smoke", "--device", "cpu", "--output_path", str(out), *flags]
    launcher = [sys.executable, script]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            script,
        ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([*launcher, *args], check=True, env=env, cwd=out.parent, timeout=600)
    return out


def _relative_difference(a: Path, b: Path) -> dict[str, float]:
    first = load_file(a / "sae_weights.safetensors")
    second = load_file(b / "sae_weights.safetensors")
    assert first.keys() == second.keys()
    return {
        name: float((first[name] - second[name]).norm() / second[name].norm())
        for name in first
    }


def test_smoke_runs_on_two_processes_save_the_one_process_sae(tmp_path: Path) -> None:
    single = _run_example(tmp_path / "single")
    for flags in ([], ["--expert_parallel"]):
        both = _run_example(tmp_path / f"two{len(flags)}", *flags, processes=2)
        differences = _relative_difference(both, single)
        assert max(differences.values()) < 1e-4, (flags, differences)
        assert isinstance(SAE.load_from_disk(str(both)), ScaleSAE)


# ------------------------------------------------------- single-process checks


def test_each_rank_reads_every_second_row_of_map_and_streamed_datasets() -> None:
    rows = Dataset.from_dict({"tokens": [[i] for i in range(10)]})
    streamed = IterableDataset.from_generator(
        lambda: ({"tokens": [i]} for i in range(10))
    )
    for rank in range(WORLD):
        parallel = Parallel(rank, WORLD, expert_parallel=False)
        expected = [[i] for i in range(rank, 10, WORLD)]
        assert _rows_of_rank(rows, parallel)["tokens"] == expected
        assert [row["tokens"] for row in _rows_of_rank(streamed, parallel)] == expected


@pytest.mark.parametrize(
    ("overrides", "sae", "expert_parallel", "message"),
    [
        ({"train_batch_size_tokens": 127}, {}, False, "train_batch_size_tokens"),
        ({}, {"n_experts": 3, "d_sae": 63}, True, "n_experts must be divisible"),
    ],
)
def test_settings_several_processes_cannot_train_are_refused_by_name(
    tmp_path: Path,
    overrides: dict[str, Any],
    sae: dict[str, Any],
    expert_parallel: bool,
    message: str,
) -> None:
    cfg = runner_config(tmp_path, sae=sae, **overrides)
    with pytest.raises(ValueError, match=message):
        check_parallel_config(cfg, Parallel(0, WORLD, expert_parallel))


def test_a_sharded_checkpoint_is_refused_without_expert_parallel(
    tmp_path: Path,
) -> None:
    (tmp_path / "ckpt" / SHARDS_FOLDER).mkdir(parents=True)
    cfg = runner_config(tmp_path, resume_from_checkpoint=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="was written with expert_parallel"):
        check_parallel_config(cfg, Parallel(0, WORLD, expert_parallel=False))
    check_parallel_config(cfg, Parallel(0, WORLD, expert_parallel=True))


def test_the_training_command_takes_the_distributed_flags() -> None:
    extra, rest = split_args(
        ["--expert_parallel", "--collective_timeout_s", "30", "--k", "8"]
    )
    assert (extra.expert_parallel, extra.collective_timeout_s) == (True, 30.0)
    assert rest == ["--k", "8"]
    assert join_process_group(expert_parallel=True) is None  # not under torchrun
