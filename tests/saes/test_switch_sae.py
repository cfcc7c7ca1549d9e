from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import SAE, TrainStepInput

from saelens_moe import (
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from saelens_moe.saes.switch_sae import SwitchSAEConfig


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def twins() -> tuple[SwitchTrainingSAE, ScaleTrainingSAE]:
    sizes: dict[str, Any] = {
        "d_in": 16,
        "d_sae": 64,
        "n_experts": 8,
        "k": 5,
        "router_init": "random",  # the router is set by hand below
    }
    switch = SwitchTrainingSAE(SwitchTrainingSAEConfig(**sizes))
    with torch.no_grad():
        for param in switch.parameters():
            param.copy_(torch.randn_like(param))
    scale = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            **sizes, n_active_experts=1, expert_weighting="probs", feature_scaling=False
        )
    )
    scale.load_state_dict(switch.state_dict())
    return switch, scale


def test_SwitchTrainingSAE_is_bit_for_bit_the_scale_preset() -> None:
    switch, scale = twins()
    x = torch.randn(3, 7, 16)
    assert torch.equal(switch(x), scale(x))
    assert torch.equal(switch.encode(x), scale.encode(x))
    step = TrainStepInput(
        sae_in=x[0],
        coefficients={"load_balancing": 3.0},
        dead_neuron_mask=torch.rand(64) < 0.3,
        n_training_steps=0,
        is_logging_step=False,
    )
    switch_out, scale_out = (
        switch.training_forward_pass(step),
        scale.training_forward_pass(step),
    )
    for name, loss in switch_out.losses.items():
        assert torch.equal(loss, scale_out.losses[name]), name
    switch_out.loss.backward()
    scale_out.loss.backward()
    for (name, switch_param), scale_param in zip(
        switch.named_parameters(), scale.parameters(), strict=True
    ):
        assert switch_param.grad is not None and scale_param.grad is not None
        assert torch.equal(switch_param.grad, scale_param.grad), name


def test_switch_defaults_and_parameters() -> None:
    cfg = SwitchTrainingSAEConfig(d_in=512, d_sae=1024)
    assert (cfg.n_active_experts, cfg.expert_weighting, cfg.feature_scaling) == (
        1,
        "probs",
        False,
    )
    names = {name for name, _ in SwitchTrainingSAE(cfg).named_parameters()}
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec", "W_router", "b_router"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_active_experts": 2}, "n_active_experts"),
        ({"expert_weighting": "uniform"}, "expert_weighting"),
        ({"feature_scaling": True}, "feature_scaling"),
    ],
)
def test_switch_refuses_scale_only_settings(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        SwitchTrainingSAEConfig(d_in=16, d_sae=64, k=4, **overrides)
    if field != "feature_scaling":
        with pytest.raises(ValueError, match=field):
            SwitchSAEConfig(d_in=16, d_sae=64, k=4, **overrides)


def test_switch_exports_to_a_switch_inference_sae(tmp_path: Path) -> None:
    switch, _ = twins()
    switch.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is SwitchSAE
    x = torch.randn(6, 16)
    torch.testing.assert_close(loaded(x), switch(x))
