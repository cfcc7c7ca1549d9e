"""Switch SAE: one expert per token, weighted by its router probability.

"Efficient Dictionary Learning with Switch Sparse Autoencoders" (Mudide et al.,
arXiv 2410.08201), the baseline the Scale SAE paper improves on. It is a Scale SAE
with `n_active_experts=1`, `expert_weighting="probs"` and no Feature Scaling, and
runs exactly the same code.
"""

from dataclasses import dataclass

from typing_extensions import override

from saelens_moe.saes.moe import ExpertWeighting
from saelens_moe.saes.scale_sae import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
)

PAPER_URL = "https://arxiv.org/abs/2410.08201"


def _require_switch_routing(cfg: ScaleSAEConfig | ScaleTrainingSAEConfig) -> None:
    if cfg.n_active_experts != 1:
        raise ValueError(
            f"n_active_experts must be 1 for a Switch SAE, got {cfg.n_active_experts!r} "
            "(use architecture='scale' for several experts per token)"
        )
    if cfg.expert_weighting != "probs":
        raise ValueError(
            f"expert_weighting must be 'probs' for a Switch SAE, got "
            f"{cfg.expert_weighting!r} (use architecture='scale' for other weightings)"
        )


@dataclass
class SwitchSAEConfig(ScaleSAEConfig):
    """Configuration of an inference Switch SAE (arXiv 2410.08201).

    k, n_experts, rescale_acts_by_decoder_norm and the SAEConfig fields are as in
    ScaleSAEConfig.

    Args:
        n_active_experts (int): Always 1: each token uses one expert.
        expert_weighting (str): Always "probs": the expert's activations are
            multiplied by its router probability.
    """

    n_active_experts: int = 1
    expert_weighting: ExpertWeighting = "probs"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "switch"

    @override
    def __post_init__(self) -> None:
        _require_switch_routing(self)
        super().__post_init__()


class SwitchSAE(ScaleSAE):
    """Inference Switch SAE."""

    cfg: SwitchSAEConfig  # pyright: ignore[reportIncompatibleVariableOverride]


@dataclass
class SwitchTrainingSAEConfig(ScaleTrainingSAEConfig):
    """Configuration for training a Switch SAE (arXiv 2410.08201).

    k, n_experts, load_balancing_coefficient, load_balancing_warm_up_steps,
    aux_loss_coefficient, dead_latent_window, rescale_acts_by_decoder_norm and the
    inherited fields are as in ScaleTrainingSAEConfig.

    Args:
        n_active_experts (int): Always 1: each token uses one expert.
        expert_weighting (str): Always "probs".
        feature_scaling (bool): Always False: Feature Scaling is the Scale SAE's.
        learn_lowpass (bool): Unused without Feature Scaling; False.
    """

    n_active_experts: int = 1
    expert_weighting: ExpertWeighting = "probs"
    feature_scaling: bool = False
    learn_lowpass: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return "switch"

    @override
    def __post_init__(self) -> None:
        _require_switch_routing(self)
        if self.feature_scaling is not False:
            raise ValueError(
                f"feature_scaling must be False for a Switch SAE, got "
                f"{self.feature_scaling!r} (use architecture='scale' for Feature Scaling)"
            )
        super().__post_init__()


class SwitchTrainingSAE(ScaleTrainingSAE):
    """Trainable Switch SAE."""

    cfg: SwitchTrainingSAEConfig  # pyright: ignore[reportIncompatibleVariableOverride]
