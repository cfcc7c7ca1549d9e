"""Train one Scale or Switch SAE on several processes with `torch.distributed`.

    torchrun --nproc_per_node 8 -m saelens_moe.train --architecture scale ...
    torchrun --nproc_per_node 8 -m saelens_moe.train ... --expert_parallel

SAELens's runner, ActivationsStore and trainer do the work; this module changes
only what several processes must agree on:

- data: `train_batch_size_tokens` is the global batch; each process reads every
  P-th row of the dataset and takes 1/P of each batch, so no two processes see the
  same tokens (with a pre-tokenized dataset and `activations_mixing_fraction=0` the
  global batches are exactly those of one process);
- gradients: averaged over processes before clipping (clipped by the global norm)
  and the optimizer step, so every process holds the same weights;
- statistics: dead latents, firing rates, routing counts (and so the load-balancing
  loss), the finite-loss check and the token count cover all processes;
- output: only rank 0 logs to wandb and pushes to the Hub; every process takes
  part in SAELens's evals (metrics averaged over processes).

Under expert parallelism no process ever holds the whole dictionary: each builds
only its experts (from a seed, so the weights do not depend on the number of
processes), writes its own shard of each checkpoint (`saelens_moe.sharded`) and
resumes from it, and the final SAE is exported to an ordinary SAELens folder one
expert block at a time.
"""

import copy
import dataclasses
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)
from sae_lens.saes.sae import (
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepOutput,
)
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file
from torch import nn
from transformer_lens.hook_points import HookedRootModule
from typing_extensions import override

from saelens_moe.errors import NonFiniteLossError
from saelens_moe.lazy_adam import LazyAdam, TouchedGradients, align_rows
from saelens_moe.saes.parallel import EXPERT_PARAMETERS, Parallel
from saelens_moe.saes.scale_sae import ScaleTrainingSAE
from saelens_moe.saes.sparse_gradients import EXPERT_ROW_PARAMETERS, LatentRows
from saelens_moe.sharded import (
    ShardError,
    check_shard,
    export_checkpoint,
    is_sharded,
    load_shard,
    mark_complete,
    remove_shards,
    resolve_checkpoint,
    save_shard,
    shard_folder,
    start_from_folder,
)
from saelens_moe.trainer import (
    MoESAETrainer,
    MoESAETrainingRunner,
    scale_to_norm,
    touched_rows,
    trainer_arguments,
)

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective waits for the other processes before the job fails."""
ARCHITECTURES = ("scale", "switch")
STEPS_SINCE_FIRED_FILENAME = "steps_since_fired.safetensors"


class RankFailedError(RuntimeError):
    """One process of a multi-process run failed; names its rank and step."""

    def __init__(self, rank: int, step: int, cause: BaseException) -> None:
        super().__init__(
            f"rank {rank} stopped at training step {step}: "
            f"{type(cause).__name__}: {cause}"
        )
        self.rank = rank
        self.step = step


def launched_world_size() -> int:
    """Processes torchrun started for this job (1 when run without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(
    expert_parallel: bool, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Parallel | None:
    """Join the torchrun job this process belongs to; None in a single process.

    NCCL on GPUs (each process on GPU `LOCAL_RANK`), gloo on CPUs. Every collective
    fails after `timeout_s` seconds instead of waiting for a dead process forever.
    """
    if launched_world_size() == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Parallel(dist.get_rank(), dist.get_world_size(), expert_parallel)


def check_parallel_config(
    cfg: LanguageModelSAERunnerConfig[Any], parallel: Parallel
) -> None:
    """Refuse, before anything runs, the settings several processes cannot train."""
    architecture = cfg.sae.architecture()
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {ARCHITECTURES} to train on several "
            f"processes, got {architecture!r}"
        )
    world = parallel.world_size
    if cfg.train_batch_size_tokens % world:
        raise ValueError(
            f"train_batch_size_tokens (the global batch) must be divisible by the "
            f"number of processes {world}, got {cfg.train_batch_size_tokens}"
        )
    if parallel.expert_parallel and cfg.sae.n_experts % world:
        raise ValueError(
            f"n_experts must be divisible by the number of processes {world} for "
            f"expert_parallel, got {cfg.sae.n_experts}"
        )
    resume = cfg.resume_from_checkpoint
    if resume is not None and not parallel.expert_parallel and is_sharded(Path(resume)):
        raise ValueError(
            f"resume_from_checkpoint {resume} was written with expert_parallel: "
            "resume with --expert_parallel, or export it (python -m "
            "saelens_moe.sharded) and start from the export"
        )


def read_own_share(store: ActivationsStore, parallel: Parallel) -> None:
    """Make the store read every P-th row from row `rank`, 1/P of each batch (rows
    of the dataset, and of the cached activations when training from a cache)."""
    store.train_batch_size_tokens //= parallel.world_size
    if store.cached_activation_dataset is not None:
        cached = _rows_of_rank(store.cached_activation_dataset, parallel)
        store.cached_activation_dataset = cached
    if store.dataset is not None:
        store.dataset = _rows_of_rank(store.dataset, parallel)
        store.iterable_sequences = store._iterate_tokenized_sequences()


def _rows_of_rank(dataset: Any, parallel: Parallel) -> Any:
    rank, world = parallel.rank, parallel.world_size
    if isinstance(dataset, Dataset):
        return dataset.shard(num_shards=world, index=rank, contiguous=False)
    if isinstance(dataset, IterableDataset):
        return split_dataset_by_node(dataset, rank=rank, world_size=world)
    raise TypeError(
        f"the dataset must be a datasets.Dataset or IterableDataset to be split "
        f"over processes, got {type(dataset).__name__}"
    )


@torch.no_grad()
def share_weights(sae: TrainingSAE[Any], parallel: Parallel) -> None:
    """Data parallel: start every process from rank 0's weights."""
    for parameter in sae.parameters():
        dist.broadcast(parameter.data, src=0, group=parallel.group)
    if isinstance(sae, ScaleTrainingSAE):
        sae.parallel = parallel


@torch.no_grad()
def new_expert_shard(
    cfg: TrainingSAEConfig, parallel: Parallel, device: str | None = None
) -> ScaleTrainingSAE:
    """Expert parallel: a new SAE holding only this process's experts.

    Built on the meta device (no memory), then only this process's experts are
    initialised, from rank 0's seed: the weights equal the same experts of
    `ScaleTrainingSAE(cfg)` built after the same `torch.manual_seed`.
    """
    device = device or cfg.device
    sae = _on_meta(cfg)
    seed = torch.tensor([sae.init_seed], dtype=torch.long, device=device)
    dist.broadcast(seed, src=0, group=parallel.group)  # NCCL: a tensor on the GPU
    sae.cfg.device, sae.device = device, torch.device(device)
    sae.parallel = parallel
    sae.init_own_weights(int(seed.item()))
    return sae


def _on_meta(cfg: TrainingSAEConfig) -> ScaleTrainingSAE:
    meta_cfg = dataclasses.replace(cfg, device="meta")
    sae = TrainingSAE.from_dict(meta_cfg.to_dict())
    if not isinstance(sae, ScaleTrainingSAE):
        raise TypeError(f"expert_parallel needs a Scale or Switch SAE, got {type(sae)}")
    return sae


def expert_parameters(sae: nn.Module, parallel: Parallel) -> set[str]:
    """Names of the parameters each process holds only a share of."""
    if not parallel.expert_parallel:
        return set()
    return {name for name, _ in sae.named_parameters() if name in EXPERT_PARAMETERS}


class DistributedSAETrainer(MoESAETrainer):
    """SAELens's trainer with gradients, statistics and saving shared by processes."""

    def __init__(self, parallel: Parallel, **trainer_args: Any) -> None:
        super().__init__(**trainer_args)
        self.parallel = parallel

    @override
    def fit(self) -> TrainingSAE[Any]:
        try:
            self._estimate_normalisation_over_processes()
            return super().fit()
        except NonFiniteLossError:
            raise  # already names the rank whose loss it was
        except Exception as error:
            raise RankFailedError(
                self.parallel.rank, self.n_training_steps, error
            ) from error

    @override
    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        batch = batch.to(self.sae.device)
        self.n_training_samples += batch.shape[0] * self.parallel.world_size
        return self._train_step(sae=self.sae, sae_in=self.activation_scaler(batch))

    @override
    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """Data parallel: rank 0 writes SAELens's checkpoint. Expert parallel: each
        process writes its shard, and the checkpoint is marked complete last."""
        self.continue_as_resumed()  # in every process, so the replicas stay equal
        if not self.parallel.expert_parallel:
            if self.parallel.rank == 0:
                super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
            return
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None:  # SAELens would only upload it to wandb: too large to
            return  # upload whole, so no checkpoint is made
        checkpoint = Path(base) / checkpoint_name
        self.save_shard(checkpoint)
        if self.parallel.rank == 0:
            (checkpoint / SAE_CFG_FILENAME).write_text(
                json.dumps(self.sae.cfg.to_dict())
            )
            save_file(
                {"sparsity": self.log_feature_sparsity}, checkpoint / SPARSITY_FILENAME
            )
            if self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=checkpoint)
        dist.barrier(group=self.parallel.group)
        if self.parallel.rank == 0:
            mark_complete(checkpoint, self.parallel.world_size, self.sae.cfg.n_experts)

    def save_shard(self, checkpoint: Path) -> Path:
        """Write this process's weights, Adam moments and trainer state."""
        folder = shard_folder(checkpoint, self.parallel.rank, self.parallel.world_size)
        assert isinstance(self.sae, ScaleTrainingSAE)
        save_shard(self.sae, folder)
        self.save_trainer_state(folder)
        return folder

    def load_shard(self, checkpoint: Path) -> None:
        """Resume this process from its shard of a complete checkpoint.

        Every process checks its shard first; if any fails, all raise its error
        (naming the file, rank and expected shape) before anything is loaded.
        """
        sae = self.sae
        assert isinstance(sae, ScaleTrainingSAE)
        problem, path = "", None
        try:
            path = check_shard(checkpoint, sae, self.parallel)
        except ShardError as error:
            problem = str(error)
        problems: list[str] = [""] * self.parallel.world_size
        dist.all_gather_object(problems, problem, group=self.parallel.group)
        if any(problems) or path is None:
            raise ShardError("; ".join(p for p in problems if p))
        load_shard(sae, path)
        self.load_trainer_state(path.parent)

    @override
    def save_trainer_state(self, checkpoint_path: Path) -> None:
        super().save_trainer_state(checkpoint_path)
        counter = getattr(self.sae, "steps_since_fired", None)
        if counter is not None:  # the SAE's own dead-latent window, for exact resume
            save_file(
                {"steps_since_fired": counter.contiguous()},
                checkpoint_path / STEPS_SINCE_FIRED_FILENAME,
            )

    @override
    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        super().load_trainer_state(checkpoint_path)
        counter = Path(checkpoint_path) / STEPS_SINCE_FIRED_FILENAME
        if counter.is_file() and isinstance(self.sae, ScaleTrainingSAE):
            loaded = load_file(counter, device=str(self.sae.device))
            self.sae.steps_since_fired = loaded["steps_since_fired"]

    @override
    def _run_and_log_evals(self) -> None:
        """SAELens's evals on every process (expert parallelism needs them all in
        each forward pass); each metric is the mean over processes, logged by rank 0
        (the others log to a disabled wandb run)."""
        evaluator = self.evaluator
        if evaluator is None:
            super()._run_and_log_evals()
            return

        def mean_over_processes(*args: Any) -> dict[str, Any]:
            return _mean_over_processes(
                evaluator(*args), self.parallel, self.sae.device
            )

        self.evaluator = mean_over_processes  # pyright: ignore[reportAttributeAccessIssue]
        try:
            super()._run_and_log_evals()
        finally:
            self.evaluator = evaluator

    @override
    def _firing_counts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Tokens each latent fired on, over every process. [d_sae]"""
        return self.parallel.sum(super()._firing_counts(feature_acts))

    @override
    @torch.no_grad()
    def _average_gradients(self) -> None:
        """Gradients of the mean loss over all processes' tokens.

        Each process's backward gives the gradient of the sum of all processes'
        losses for the weights it holds (expert parallelism carries the other
        processes' share back through all_to_all); replicated weights add theirs.
        Lazy Adam's rows of replicated weights are summed on the union of every
        process's touched latents.
        """
        optimizer = self.optimizer
        if isinstance(optimizer, LazyAdam):
            assert optimizer.touched is not None, "gather() comes first"
            optimizer.touched = self._touched_over_processes(optimizer.touched)
        replicated, sharded = self._dense_gradients()
        _sum_in_place(replicated, self.parallel)
        for grad in replicated + sharded + touched_rows(optimizer):
            grad.div_(self.parallel.world_size)

    def _touched_over_processes(self, touched: TouchedGradients) -> TouchedGradients:
        """Data parallel: the rows summed on the union of touched latents. Expert
        parallel: each process's own rows, with the share of the whole dictionary
        touched (so every process takes the dense step together, as one would)."""
        d_sae = self.sae.cfg.d_sae
        if not self.parallel.expert_parallel:
            return _summed_over_processes(touched, d_sae, self.parallel)
        count = torch.tensor(float(touched.latents.numel()), device=self.sae.device)
        return touched._replace(share=float(self.parallel.sum(count)) / d_sae)

    @override
    @torch.no_grad()
    def _clip_gradients(self) -> None:
        """SAELens's clipping at norm 1, by the norm of the whole model's gradient."""
        replicated, sharded = self._gradients()
        device = replicated[0].device
        squares = torch.stack(
            [_squared_norm(replicated, device), _squared_norm(sharded, device)]
        )
        if sharded:
            squares[1:] = self.parallel.sum(squares[1:].clone())
        scale_to_norm(replicated + sharded, squares.sum().sqrt())

    def _gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`_dense_gradients`, with lazy Adam's rows among the sharded (expert
        parallel) or the replicated ones."""
        replicated, sharded = self._dense_gradients()
        rows = touched_rows(self.optimizer)
        if self.parallel.expert_parallel:
            return replicated, sharded + rows
        return replicated + rows, sharded

    def _dense_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Dense gradients of the replicated and of the expert-sharded parameters,
        in a fixed order (a parameter that got none gets zeros, as on the others);
        lazy Adam's expert weights have rows instead."""
        sharded_names = expert_parameters(self.sae, self.parallel)
        lazy = EXPERT_ROW_PARAMETERS if isinstance(self.optimizer, LazyAdam) else ()
        replicated: list[torch.Tensor] = []
        sharded: list[torch.Tensor] = []
        for name, parameter in self.sae.named_parameters():
            if name in lazy:
                continue
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            (sharded if name in sharded_names else replicated).append(parameter.grad)
        return replicated, sharded

    def _estimate_normalisation_over_processes(self) -> None:
        """SAELens's activation scaling factor or whitening, estimated as in one
        process: every process reads the same batches, gathered from all of them,
        so all normalise alike."""
        scaler, d_in = self.activation_scaler, self.sae.cfg.d_in
        normalize = self.sae.cfg.normalize_activations
        batches = _gathered_batches(self.data_provider, self.parallel)
        n_batches = self.cfg.n_batches_for_norm_estimate
        if normalize == "expected_average_only_in" and scaler.scaling_factor is None:
            scaler.estimate_scaling_factor(d_in, batches, n_batches)
        elif normalize == "covariance_whitening" and scaler.whitening is None:
            scaler.estimate_whitening(d_in, batches, n_batches)


def _sum_in_place(grads: list[torch.Tensor], parallel: Parallel) -> None:
    """Each of `grads` summed over processes, with one all_reduce."""
    flat = parallel.sum(torch.cat([grad.reshape(-1) for grad in grads]))
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(summed.view_as(grad))


def _summed_over_processes(
    touched: TouchedGradients, n_latents: int, parallel: Parallel
) -> TouchedGradients:
    """Lazy Adam's rows summed over processes, on the union of their latents."""
    is_touched = touched.latents.new_zeros(n_latents, dtype=torch.float32)
    is_touched[touched.latents] = 1.0
    union = parallel.sum(is_touched).nonzero().squeeze(1)
    _, union_rows = align_rows(
        [LatentRows(touched.latents, rows) for rows in touched.rows],
        [rows.shape[1:] for rows in touched.rows],
        touched.rows[0],
        union,
    )
    _sum_in_place(union_rows, parallel)
    return TouchedGradients(union, union_rows, union.numel() / n_latents)


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of `grads`, a float32 scalar on `device` (0 for no gradients)."""
    if not grads:
        return torch.zeros((), device=device)
    # vector_norm, not grad.pow(2).sum(): no temporary the size of the gradient
    norms = [torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]
    return torch.stack(norms).square().sum()


def _gathered_batches(
    data_provider: Iterator[torch.Tensor], parallel: Parallel
) -> Iterator[torch.Tensor]:
    """Every process's next batch, concatenated in rank order (a collective)."""
    for batch in data_provider:
        parts = [torch.empty_like(batch) for _ in range(parallel.world_size)]
        dist.all_gather(parts, batch.contiguous(), group=parallel.group)
        yield torch.cat(parts)


def _rank_zeros(value: Any, parallel: Parallel) -> Any:
    """Rank 0's `value` on every process (SAELens draws a run id in each process)."""
    shared = [value]
    dist.broadcast_object_list(shared, src=0, group=parallel.group)
    return shared[0]


def _mean_over_processes(
    metrics: dict[str, Any], parallel: Parallel, device: torch.device
) -> dict[str, Any]:
    """`run_evals`'s nested metrics with every number averaged over processes (all
    processes hold the same names)."""
    leaves = sorted(_numeric_leaves(metrics))
    if not leaves:
        return metrics
    values = torch.tensor([value for _, value in leaves], dtype=torch.float64)
    means = (parallel.sum(values.to(device)).cpu() / parallel.world_size).tolist()
    averaged = copy.deepcopy(metrics)
    for (path, _), mean in zip(leaves, means, strict=True):
        *parents, name = path
        node = averaged
        for parent in parents:
            node = node[parent]
        node[name] = mean
    return averaged


def _numeric_leaves(
    metrics: dict[str, Any], prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], float]]:
    leaves: list[tuple[tuple[str, ...], float]] = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            leaves += _numeric_leaves(value, (*prefix, name))  # pyright: ignore[reportUnknownArgumentType]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            leaves.append(((*prefix, name), float(value)))
    return leaves


class DistributedSAETrainingRunner(MoESAETrainingRunner):
    """SAELens's runner for one process of a multi-process training job.

    `lazy_adam` and `fused_adam` are `MoESAETrainer`'s.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        parallel: Parallel,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        lazy_adam: bool = False,
        fused_adam: bool = True,
    ) -> None:
        check_parallel_config(cfg, parallel)
        if parallel.rank != 0:  # one progress bar and one wandb run, rank 0's
            os.environ["TQDM_DISABLE"] = "1"
            os.environ["WANDB_MODE"] = "disabled"  # evals still run on every rank
        cfg = copy.copy(cfg)  # not dataclasses.replace: it would draw another run id
        cfg.checkpoint_path = _rank_zeros(cfg.checkpoint_path, parallel)
        self.sharded_resume: Path | None = None
        """The complete sharded checkpoint this expert-parallel run resumes from."""
        override_sae = None
        if parallel.expert_parallel:
            if cfg.resume_from_checkpoint is not None:  # SAELens would load it whole
                self.sharded_resume = resolve_checkpoint(
                    Path(cfg.resume_from_checkpoint)
                )
                cfg.resume_from_checkpoint = None
            sae_cfg = TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict())
            override_sae = new_expert_shard(sae_cfg, parallel, cfg.device)
            if cfg.from_pretrained_path is not None:
                start_from_folder(override_sae, cfg.from_pretrained_path, parallel)
        super().__init__(
            cfg,
            lazy_adam,
            fused_adam,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=override_sae,
        )
        self.parallel = parallel
        read_own_share(self.activations_store, parallel)
        if not parallel.expert_parallel:
            share_weights(self.sae, parallel)

    @override
    def our_trainer(self, trainer: SAETrainer[Any, Any]) -> MoESAETrainer:
        return DistributedSAETrainer(
            self.parallel,
            lazy_adam=self.lazy_adam,
            fused_adam=self.fused_adam,
            **trainer_arguments(trainer),
        )

    @override
    def resume(self, trainer: MoESAETrainer) -> None:
        if self.sharded_resume is None:
            super().resume(trainer)
            return
        assert isinstance(trainer, DistributedSAETrainer)
        trainer.load_shard(self.sharded_resume)
        self.activations_store.load_from_checkpoint(self.sharded_resume)

    @override
    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        """Rank 0 saves SAELens's folder; under expert parallelism every process
        writes its shard first and rank 0 exports them one expert at a time."""
        if not self.parallel.expert_parallel:
            if self.parallel.rank == 0:
                super().save_final_sae(sae, output_path, log_feature_sparsity)
            dist.barrier(group=self.parallel.group)
            return
        assert isinstance(sae, ScaleTrainingSAE)
        output = Path(output_path)
        save_shard(
            sae, shard_folder(output, self.parallel.rank, self.parallel.world_size)
        )
        dist.barrier(group=self.parallel.group)
        if self.parallel.rank == 0:
            self._export_final_sae(sae, output, log_feature_sparsity)
        dist.barrier(group=self.parallel.group)

    def _export_final_sae(
        self,
        sae: ScaleTrainingSAE,
        output: Path,
        log_feature_sparsity: torch.Tensor | None,
    ) -> None:
        """SAELens's final folder, from the shards every process wrote."""
        mark_complete(output, self.parallel.world_size, sae.cfg.n_experts)
        (output / SAE_CFG_FILENAME).write_text(json.dumps(sae.cfg.to_dict()))
        export_checkpoint(output, output)
        remove_shards(output)
        sparsity_path = None
        if log_feature_sparsity is not None:
            sparsity_path = output / SPARSITY_FILENAME
            save_file({"sparsity": log_feature_sparsity}, sparsity_path)
        (output / RUNNER_CFG_FILENAME).write_text(json.dumps(self.cfg.to_dict()))
        if self.cfg.logger.log_to_wandb:
            self.cfg.logger.log(
                self,
                output / SAE_WEIGHTS_FILENAME,
                output / SAE_CFG_FILENAME,
                sparsity_path=sparsity_path,
                wandb_aliases=["final_model"],
            )
