"""Ready-made settings: the Scale SAE paper's own training choices (arXiv 2511.05745).

The package's defaults differ from the authors' training in measured ways
(benchmarks/README.md): AuxK revives dead latents from step 100 on and the router
starts from k-means centroids of the first batch. `paper_setting`
gives the authors' choices instead, to reproduce the paper rather than our defaults:

    setting = paper_setting(total_training_steps=10_000, d_sae=24576, device="cuda")
    sae_cfg = ScaleTrainingSAEConfig(d_in=768, d_sae=24576, n_experts=64, k=32,
                                     **setting.sae)
    runner_cfg = LanguageModelSAERunnerConfig(sae=sae_cfg, device="cuda", ...,
                                              **setting.runner)

SAELens's trainer already clips gradients at norm 1.0 and uses Adam with the
authors' betas, so neither needs setting. On CUDA the runner settings add
SAELens's `autocast=True`: bfloat16 matmuls, the dtype PyTorch's fast grouped
kernel takes (in float32 the expert matmuls would take its host-syncing fallback).
"""

import math
from typing import Any, NamedTuple

import torch


class PaperSetting(NamedTuple):
    """Keyword arguments for a Scale / Switch training config and for the runner."""

    sae: dict[str, Any]
    """For `ScaleTrainingSAEConfig` / `SwitchTrainingSAEConfig`."""
    runner: dict[str, Any]
    """For `LanguageModelSAERunnerConfig` or `SyntheticSAERunnerConfig`."""


def paper_lr(d_sae: int) -> float:
    """The authors' learning rate, 2e-4 / sqrt(d_sae / 2**14) (1.63e-4 at 24576)."""
    if d_sae < 1:
        raise ValueError(f"d_sae must be >= 1, got {d_sae!r}")
    return 2e-4 / math.sqrt(d_sae / 2**14)


def paper_setting(
    total_training_steps: int, d_sae: int = 24576, device: str = "cpu"
) -> PaperSetting:
    """The authors' training: no AuxK, a random router, load balancing 3, their lr,
    decay over the last 20%.

    `total_training_steps` is the run's length in steps (training tokens divided by
    the batch size); the learning rate falls linearly to 0 over its last fifth.
    `device` is where the runner trains: on CUDA the runner settings add
    `autocast=True` (bfloat16 matmuls; a `LanguageModelSAERunnerConfig` field,
    called `autocast_sae` on `SyntheticSAERunnerConfig`). The device itself is
    not among the settings: pass it to the runner config as usual.
    """
    if total_training_steps < 1:
        raise ValueError(
            f"total_training_steps must be >= 1, got {total_training_steps!r}"
        )
    sae = {
        "aux_loss_coefficient": 0.0,
        "dead_latent_window": None,
        "load_balancing_coefficient": 3.0,
        "load_balancing_warm_up_steps": 0,
        "router_init": "random",
    }
    runner = {
        "lr": paper_lr(d_sae),
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": 0,
        "lr_decay_steps": total_training_steps // 5,
    }
    if torch.device(device).type == "cuda":
        runner["autocast"] = True
    return PaperSetting(sae, runner)
