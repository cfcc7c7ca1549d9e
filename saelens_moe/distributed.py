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
- output: only rank 0 logs to wandb, saves checkpoints and the final SAE, and
  pushes to the Hub. Under expert parallelism the experts are gathered to rank 0
  first, so checkpoints are ordinary SAELens folders.
"""

import dataclasses
import os
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from torch import nn
from transformer_lens.hook_points import HookedRootModule
from typing_extensions import override

from saelens_moe.errors import NonFiniteLossError
from saelens_moe.saes.parallel import EXPERT_PARAMETERS, Parallel, expert_slice
from saelens_moe.saes.scale_sae import ScaleTrainingSAE

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective waits for the other processes before the job fails."""
ARCHITECTURES = ("scale", "switch")
MAX_GRAD_NORM = 1.0  # SAELens's trainer clips at 1.0 too


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
    unsupported = {
        "normalize_activations='covariance_whitening'": (
            cfg.sae.normalize_activations == "covariance_whitening"
        ),
        "use_cached_activations": cfg.use_cached_activations,
        "resume_from_checkpoint with expert_parallel": (
            parallel.expert_parallel and cfg.resume_from_checkpoint is not None
        ),
    }
    for setting, used in unsupported.items():
        if used:
            raise ValueError(f"{setting} is not supported on several processes yet")


def read_own_share(store: ActivationsStore, parallel: Parallel) -> None:
    """Make the store read every P-th row from row `rank`, 1/P of each batch."""
    store.train_batch_size_tokens //= parallel.world_size
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
    """Start every process from rank 0's weights; under expert parallelism keep
    only this process's experts."""
    for parameter in sae.parameters():
        dist.broadcast(parameter.data, src=0, group=parallel.group)
    if isinstance(sae, ScaleTrainingSAE):
        if parallel.expert_parallel:
            _keep_own_experts(sae, parallel)
        sae.parallel = parallel


def _keep_own_experts(sae: ScaleTrainingSAE, parallel: Parallel) -> None:
    cfg = sae.cfg
    latents = expert_slice(parallel, cfg.n_experts, cfg.d_sae // cfg.n_experts)
    experts = expert_slice(parallel, cfg.n_experts, 1)
    own = {
        "W_enc": sae.W_enc.data[:, latents],
        "W_dec": sae.W_dec.data[latents],
        "b_enc": sae.b_enc.data[latents],
    }
    if cfg.feature_scaling:
        own["omega"] = sae.omega.data[experts]
    for name, shard in own.items():
        setattr(sae, name, nn.Parameter(shard.clone()))


def expert_parameters(sae: nn.Module, parallel: Parallel) -> set[str]:
    """Names of the parameters each process holds only a share of."""
    if not parallel.expert_parallel:
        return set()
    return {name for name, _ in sae.named_parameters() if name in EXPERT_PARAMETERS}


@contextmanager
def whole_experts(sae: TrainingSAE[Any], parallel: Parallel | None) -> Generator[None]:
    """Within the block, rank 0's SAE holds every expert (to save it); a collective."""
    if parallel is None or not parallel.expert_parallel:
        yield
        return
    assert isinstance(sae, ScaleTrainingSAE)
    own: dict[str, torch.Tensor] = {}
    for name in sorted(expert_parameters(sae, parallel)):
        parameter = getattr(sae, name)
        own[name] = parameter.data
        parts = [torch.empty_like(parameter.data) for _ in range(parallel.world_size)]
        dist.all_gather(parts, parameter.data.contiguous(), group=parallel.group)
        parameter.data = torch.cat(parts, dim=1 if name == "W_enc" else 0)
    sae.parallel = None
    try:
        yield
    finally:
        for name, data in own.items():
            getattr(sae, name).data = data
        sae.parallel = parallel


class DistributedSAETrainer(SAETrainer[Any, Any]):
    """SAELens's trainer with gradients, statistics and saving shared by processes."""

    def __init__(self, parallel: Parallel, **trainer_args: Any) -> None:
        super().__init__(**trainer_args)
        self.parallel = parallel

    @override
    def fit(self) -> TrainingSAE[Any]:
        try:
            self._estimate_scaling_factor_over_processes()
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
    def _train_step(
        self, sae: TrainingSAE[Any], sae_in: torch.Tensor
    ) -> TrainStepOutput:
        sae.train()
        with self.autocast_if_enabled:
            output = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=sae_in,
                    dead_neuron_mask=self.dead_neurons,
                    coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                )
            )
            self._count_firing(output.feature_acts)
        output.loss.backward()
        self._average_gradients()
        self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return output

    @override
    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        with whole_experts(self.sae, self.parallel):
            if self.parallel.rank == 0:
                super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)

    @torch.no_grad()
    def _count_firing(self, feature_acts: torch.Tensor) -> None:
        """SAELens's dead-latent and firing-rate statistics, over every process."""
        fired = feature_acts.bool().float().sum(dim=0)
        fired = self.parallel.sum(fired.to_dense() if fired.is_sparse else fired)
        self.n_forward_passes_since_fired += 1
        self.n_forward_passes_since_fired.masked_fill_(fired > 0, 0)
        self.act_freq_scores += fired
        self.n_frac_active_samples += self.cfg.train_batch_size_samples

    @torch.no_grad()
    def _average_gradients(self) -> None:
        """Gradients of the mean loss over all processes' tokens.

        Each process's backward gives the gradient of the sum of all processes'
        losses for the weights it holds (expert parallelism carries the other
        processes' share back through all_to_all); replicated weights add theirs.
        """
        replicated, sharded = self._gradients()
        flat = self.parallel.sum(torch.cat([grad.reshape(-1) for grad in replicated]))
        for grad, summed in zip(
            replicated, flat.split([grad.numel() for grad in replicated]), strict=True
        ):
            grad.copy_(summed.view_as(grad))
        for grad in replicated + sharded:
            grad.div_(self.parallel.world_size)

    @torch.no_grad()
    def _clip_gradients(self) -> None:
        """SAELens's clipping at norm 1, by the norm of the whole model's gradient."""
        replicated, sharded = self._gradients()
        squares = torch.stack([_squared_norm(replicated), _squared_norm(sharded)])
        if sharded:
            squares[1:] = self.parallel.sum(squares[1:].clone())
        torch.nn.utils.clip_grads_with_norm_(
            self.sae.parameters(), MAX_GRAD_NORM, squares.sum().sqrt()
        )

    def _gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Gradients of the replicated and of the expert-sharded parameters, in a
        fixed order (a parameter that got none gets zeros, as on the others)."""
        sharded_names = expert_parameters(self.sae, self.parallel)
        replicated: list[torch.Tensor] = []
        sharded: list[torch.Tensor] = []
        for name, parameter in self.sae.named_parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            (sharded if name in sharded_names else replicated).append(parameter.grad)
        return replicated, sharded

    def _estimate_scaling_factor_over_processes(self) -> None:
        """`expected_average_only_in`'s factor, estimated on every process's data."""
        scaler = self.activation_scaler
        if (
            self.sae.cfg.normalize_activations != "expected_average_only_in"
            or scaler.scaling_factor is not None
        ):
            return
        scaler.estimate_scaling_factor(
            d_in=self.sae.cfg.d_in,
            data_provider=self.data_provider,
            n_batches_for_norm_estimate=self.cfg.n_batches_for_norm_estimate,
        )
        # the factor is sqrt(d_in) / mean norm: average the mean norms
        assert scaler.scaling_factor is not None
        mean_norm = torch.tensor([self.sae.cfg.d_in**0.5 / scaler.scaling_factor])
        mean_norm = self.parallel.sum(mean_norm.to(self.sae.device)).cpu()
        scaler.scaling_factor = float(
            self.sae.cfg.d_in**0.5 / (mean_norm.item() / self.parallel.world_size)
        )


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    return torch.stack([grad.float().pow(2).sum() for grad in grads]).sum()


class DistributedSAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's runner for one process of a multi-process training job."""

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        parallel: Parallel,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
    ) -> None:
        check_parallel_config(cfg, parallel)
        if parallel.rank != 0:  # one progress bar and one wandb run, rank 0's
            os.environ["TQDM_DISABLE"] = "1"
            logger = dataclasses.replace(cfg.logger, log_to_wandb=False)
            cfg = dataclasses.replace(cfg, logger=logger)
        super().__init__(
            cfg, override_dataset=override_dataset, override_model=override_model
        )
        self.parallel = parallel
        read_own_share(self.activations_store, parallel)
        share_weights(self.sae, parallel)

    @override
    def run_trainer_with_interruption_handling(
        self, trainer: SAETrainer[Any, Any]
    ) -> TrainingSAE[Any]:
        distributed = DistributedSAETrainer(
            self.parallel,
            cfg=trainer.cfg,
            sae=trainer.sae,
            data_provider=trainer.data_provider,
            # evals run the SAE on rank 0 alone, which needs every expert there
            evaluator=None if self.parallel.expert_parallel else trainer.evaluator,
            save_checkpoint_fn=trainer.save_checkpoint_fn,
        )
        if self.cfg.resume_from_checkpoint is not None:
            distributed.load_trainer_state(self.cfg.resume_from_checkpoint)
        return super().run_trainer_with_interruption_handling(distributed)

    @override
    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        with whole_experts(sae, self.parallel):
            if self.parallel.rank == 0:
                super().save_final_sae(sae, output_path, log_feature_sparsity)
        dist.barrier(group=self.parallel.group)
