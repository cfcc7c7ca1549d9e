"""SAELens's trainer and runner with the optimizer chosen here.

    MoESAETrainingRunner(cfg, lazy_adam=True).run()
    saelens-moe-train --architecture scale ... --lazy_adam

`MoESAETrainer` is SAELens's `SAETrainer` (same step, clipping at norm 1, lr and
coefficient schedules, checkpoints and resume) with one change: the optimizer.

- `lazy_adam=True`: `saelens_moe.lazy_adam.LazyAdam`, whose step writes only the
  latents the batch touched (Scale and Switch SAEs).
- otherwise PyTorch's Adam, fused (one kernel for every tensor) unless
  `fused_adam=False`: the same update as SAELens's per-tensor Adam
  (benchmarks/README.md has the timings).

`MoESAETrainingRunner` is SAELens's `LanguageModelSAETrainingRunner` training with it.
"""

from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from torch.optim import Adam, Optimizer
from transformer_lens.hook_points import HookedRootModule
from typing_extensions import override

from saelens_moe.lazy_adam import LazyAdam, check_betas
from saelens_moe.saes.scale_sae import ScaleTrainingSAE

MAX_GRAD_NORM = 1.0  # SAELens's trainer clips at 1.0 too


class MoESAETrainer(SAETrainer[Any, Any]):
    """SAELens's trainer with lazy Adam (opt-in) or fused Adam.

    Args:
        lazy_adam: Update expert weights only on the latents each step touched
            (`saelens_moe.lazy_adam`); Scale and Switch SAEs only.
        fused_adam: PyTorch's fused Adam for the weights updated densely (all of
            them without lazy_adam), and with lazy_adam a compiled update of the
            touched rows (`lazy_adam.CompiledRows`).
        **trainer_args: SAELens's `SAETrainer` arguments.
    """

    def __init__(
        self, lazy_adam: bool = False, fused_adam: bool = True, **trainer_args: Any
    ) -> None:
        super().__init__(**trainer_args)
        self.lazy_adam = lazy_adam
        assert self.cfg.lr_end is not None  # set by SAELens's config
        self.optimizer = build_optimizer(
            self.sae, self.cfg.lr, self.betas(), lazy_adam, fused_adam
        )
        self.lr_scheduler = get_lr_scheduler(
            self.cfg.lr_scheduler_name,
            lr=self.cfg.lr,
            optimizer=self.optimizer,
            warm_up_steps=self.cfg.lr_warm_up_steps,
            decay_steps=self.cfg.lr_decay_steps,
            training_steps=self.cfg.total_training_steps,
            lr_end=self.cfg.lr_end,
            num_cycles=self.cfg.n_restart_cycles,
        )

    def betas(self) -> tuple[float, float]:
        return (self.cfg.adam_beta1, self.cfg.adam_beta2)

    @override
    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """SAELens's checkpoint, after which training continues as a run resumed
        from it would (`continue_as_resumed`)."""
        self.continue_as_resumed()
        super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)

    def continue_as_resumed(self) -> None:
        """Lazy Adam: its waiting latents make the moves they owe, so the saved
        weights are dense Adam's, and it drops what a checkpoint does not hold, the
        kept block sums and decoder norms (`LazyAdam.catch_up`): recomputed at the
        next step from the weights, as a resumed run recomputes them, so both end
        with the same weights."""
        if isinstance(self.optimizer, LazyAdam):
            self.optimizer.catch_up()

    @override
    def _train_step(
        self, sae: TrainingSAE[Any], sae_in: torch.Tensor
    ) -> TrainStepOutput:
        """SAELens's step; gradients gathered (lazy Adam), averaged (several
        processes) and clipped before the optimizer step."""
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
        if isinstance(self.optimizer, LazyAdam):
            self.optimizer.gather()
        self._average_gradients()
        self._clip_gradients()
        self.optimizer.step()
        if isinstance(self.optimizer, LazyAdam) and self._finished():
            self.optimizer.catch_up()  # the trained weights are dense Adam's
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return output

    def _finished(self) -> bool:
        """Whether this is `fit()`'s last step (`step()` counted its samples)."""
        return self.n_training_samples >= self.cfg.total_training_samples

    @torch.no_grad()
    def _count_firing(self, feature_acts: torch.Tensor) -> None:
        """SAELens's dead-latent and firing-rate statistics."""
        fired = self._firing_counts(feature_acts)
        self.n_forward_passes_since_fired += 1
        self.n_forward_passes_since_fired.masked_fill_(fired > 0, 0)
        self.act_freq_scores += fired
        self.n_frac_active_samples += self.cfg.train_batch_size_samples

    def _firing_counts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Tokens each latent fired on in this batch. [d_sae]"""
        fired = feature_acts.bool().float().sum(dim=0)
        return fired.to_dense() if fired.is_sparse else fired

    def _average_gradients(self) -> None:
        """One process: the gradients are already those of the mean loss."""

    @torch.no_grad()
    def _clip_gradients(self) -> None:
        """SAELens's clipping at norm 1, by the norm of every gradient (the touched
        rows' included)."""
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        grads += touched_rows(self.optimizer)
        total_norm = torch.nn.utils.get_total_norm(grads)
        scale_to_norm(grads, total_norm)


class MoESAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's `LanguageModelSAETrainingRunner`, training with `MoESAETrainer`.

    Args:
        cfg: SAELens's runner config.
        lazy_adam: See `MoESAETrainer`.
        fused_adam: See `MoESAETrainer`.
        override_dataset: As SAELens's runner.
        override_model: As SAELens's runner.
        override_sae: As SAELens's runner.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        lazy_adam: bool = False,
        fused_adam: bool = True,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ) -> None:
        if lazy_adam:  # before SAELens's runner loads the model
            check_betas((cfg.adam_beta1, cfg.adam_beta2))
        super().__init__(
            cfg,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=override_sae,
        )
        self.lazy_adam = lazy_adam
        self.fused_adam = fused_adam

    @override
    def run_trainer_with_interruption_handling(
        self, trainer: SAETrainer[Any, Any]
    ) -> TrainingSAE[Any]:
        ours = self.our_trainer(trainer)
        self.resume(ours)
        return super().run_trainer_with_interruption_handling(ours)

    def resume(self, trainer: MoESAETrainer) -> None:
        """Load the resumed checkpoint's trainer state (SAELens loaded it into the
        trainer it built, whose optimizer is not ours)."""
        if self.cfg.resume_from_checkpoint is not None:
            trainer.load_trainer_state(self.cfg.resume_from_checkpoint)

    def our_trainer(self, trainer: SAETrainer[Any, Any]) -> MoESAETrainer:
        """`MoESAETrainer` in place of the `SAETrainer` SAELens's runner built."""
        return MoESAETrainer(
            self.lazy_adam, self.fused_adam, **trainer_arguments(trainer)
        )


def trainer_arguments(trainer: SAETrainer[Any, Any]) -> dict[str, Any]:
    """What SAELens's runner built `trainer` with, to build another from."""
    return {
        "cfg": trainer.cfg,
        "sae": trainer.sae,
        "data_provider": trainer.data_provider,
        "evaluator": trainer.evaluator,
        "save_checkpoint_fn": trainer.save_checkpoint_fn,
    }


def build_optimizer(
    sae: TrainingSAE[Any],
    lr: float,
    betas: tuple[float, float],
    lazy_adam: bool,
    fused_adam: bool,
) -> Optimizer:
    """Lazy Adam, or PyTorch's Adam (fused if asked and the weights allow it)."""
    if lazy_adam:
        if not isinstance(sae, ScaleTrainingSAE):
            raise ValueError(
                f"lazy_adam needs a Scale or Switch SAE (architecture 'scale' or "
                f"'switch'), got architecture {sae.cfg.architecture()!r}"
            )
        return LazyAdam(sae, lr, betas, fused=fused_adam or None)
    return Adam(sae.parameters(), lr=lr, betas=betas, fused=fused_adam or None)


def touched_rows(optimizer: Optimizer) -> list[torch.Tensor]:
    """Lazy Adam's gathered gradient rows this step; [] for any other optimizer."""
    if isinstance(optimizer, LazyAdam) and optimizer.touched is not None:
        return optimizer.touched.rows
    return []


def scale_to_norm(
    grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float = MAX_GRAD_NORM
) -> None:
    """Scale `grads` in place as `clip_grad_norm_` does, given their total norm."""
    coefficient = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device))
