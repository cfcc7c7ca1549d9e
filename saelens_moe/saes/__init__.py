from saelens_moe.saes.scale_sae import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
)
from saelens_moe.saes.switch_sae import (
    SwitchSAE,
    SwitchSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

__all__ = [
    "ScaleSAE",
    "ScaleSAEConfig",
    "ScaleTrainingSAE",
    "ScaleTrainingSAEConfig",
    "SwitchSAE",
    "SwitchSAEConfig",
    "SwitchTrainingSAE",
    "SwitchTrainingSAEConfig",
]
