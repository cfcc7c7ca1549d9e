"""Mixture-of-Experts sparse autoencoders (Scale SAE, Switch SAE) for SAELens.

Importing this package registers the architectures "scale" and "switch" with
SAELens, so `SAE.from_pretrained`, `SAE.load_from_disk` and SAELens's training
runners accept them.
"""

from saelens_moe.loading import load_sae
from saelens_moe.registration import register_architecture
from saelens_moe.saes import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

__version__ = "0.1.0"

__all__ = [
    "ScaleSAE",
    "ScaleSAEConfig",
    "ScaleTrainingSAE",
    "ScaleTrainingSAEConfig",
    "SwitchSAE",
    "SwitchSAEConfig",
    "SwitchTrainingSAE",
    "SwitchTrainingSAEConfig",
    "load_sae",
]

register_architecture(
    "scale", (ScaleSAE, ScaleSAEConfig), (ScaleTrainingSAE, ScaleTrainingSAEConfig)
)
register_architecture(
    "switch",
    (SwitchSAE, SwitchSAEConfig),
    (SwitchTrainingSAE, SwitchTrainingSAEConfig),
)
