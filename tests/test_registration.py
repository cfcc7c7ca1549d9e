import importlib

import pytest
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    get_sae_class,
    get_sae_training_class,
)
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

import saelens_moe
from saelens_moe.registration import register_architecture


def test_import_registers_both_architectures_for_inference_and_training() -> None:
    assert get_sae_class("scale") == (saelens_moe.ScaleSAE, saelens_moe.ScaleSAEConfig)
    assert get_sae_training_class("scale") == (
        saelens_moe.ScaleTrainingSAE,
        saelens_moe.ScaleTrainingSAEConfig,
    )
    assert get_sae_class("switch")[0].__name__ == "SwitchSAE"
    assert get_sae_training_class("switch")[0].__name__ == "SwitchTrainingSAE"


def test_registration_survives_a_second_import_and_a_reload() -> None:
    importlib.import_module("saelens_moe")
    reloaded = importlib.reload(saelens_moe)
    assert get_sae_class("scale")[0] is reloaded.ScaleSAE


def test_registering_a_key_owned_by_another_package_raises() -> None:
    SAE_CLASS_REGISTRY["not-ours"] = (TopKSAE, TopKSAEConfig)
    try:
        with pytest.raises(ValueError, match="already registered by sae_lens"):
            register_architecture(
                "not-ours",
                (saelens_moe.ScaleSAE, saelens_moe.ScaleSAEConfig),
                (saelens_moe.ScaleTrainingSAE, saelens_moe.ScaleTrainingSAEConfig),
            )
        assert "not-ours" not in SAE_TRAINING_CLASS_REGISTRY
    finally:
        del SAE_CLASS_REGISTRY["not-ours"]
