"""SAELens's hook points fire for Scale and Switch SAEs as they do for SAELens's TopK."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from saelens_moe import (
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

D_IN, D_SAE, K, N_TOKENS = 16, 64, 4, 10
HOOK_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_output",
    "hook_sae_recons",
    "hook_sae_error",
)


def step_input(x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 1.0},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


ENTRY_POINTS: dict[str, Callable[[TrainingSAE[Any], torch.Tensor], object]] = {
    "forward": lambda sae, x: sae(x),
    "encode": lambda sae, x: sae.encode(x),
    "encode_with_hidden_pre": lambda sae, x: sae.encode_with_hidden_pre(x),
    "training_forward_pass": lambda sae, x: sae.training_forward_pass(step_input(x)),
}
SAES: dict[str, Callable[[], TrainingSAE[Any]]] = {
    "scale": lambda: ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, n_experts=4)
    ),
    "switch": lambda: SwitchTrainingSAE(
        SwitchTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, n_experts=4)
    ),
}


def fired_hooks(
    sae: TrainingSAE[Any], entry_point: str, x: torch.Tensor
) -> dict[str, tuple[int, ...]]:
    """Which hook points fired, with the shape each one saw."""
    fired: dict[str, tuple[int, ...]] = {}
    for name in HOOK_POINTS:

        def record(tensor: torch.Tensor, hook: Any, name: str = name) -> None:
            fired[name] = tuple(tensor.shape)

        getattr(sae, name).add_hook(record)
    try:
        ENTRY_POINTS[entry_point](sae, x)
    finally:
        sae.reset_hooks()
    return fired


CASES = [
    (entry_point, leading)
    for entry_point in ENTRY_POINTS
    for leading in [(N_TOKENS,), (2, 5)]
    if entry_point != "training_forward_pass" or len(leading) == 1  # [batch, d_in]
]


@pytest.mark.parametrize("architecture", SAES)
@pytest.mark.parametrize(("entry_point", "leading"), CASES)
def test_hooks_fire_as_for_sae_lens_topk(
    architecture: str, entry_point: str, leading: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    x = torch.randn(*leading, D_IN)
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    expected = fired_hooks(topk, entry_point, x)
    assert "hook_sae_acts_post" in expected  # the table means something
    assert fired_hooks(SAES[architecture](), entry_point, x) == expected


@pytest.mark.parametrize("architecture", SAES)
def test_acts_pre_hook_sees_the_pre_activation_before_decoder_norms(
    architecture: str,
) -> None:
    """As in SAELens's TopK: x @ W_enc + b_enc, here 0 outside the selected experts."""
    torch.manual_seed(0)
    sae = SAES[architecture]()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # norms far from 1, so a rescaled tensor would differ
    x = torch.randn(N_TOKENS, D_IN)
    seen: list[torch.Tensor] = []
    sae.hook_sae_acts_pre.add_hook(lambda tensor, hook: seen.append(tensor))
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    computed = hidden_pre != 0
    norms = sae.W_dec.norm(dim=-1).expand_as(hidden_pre)
    torch.testing.assert_close(
        seen[0][computed] * norms[computed], hidden_pre[computed]
    )


@pytest.mark.parametrize("architecture", SAES)
def test_an_acts_post_edit_in_training_changes_reconstruction_and_loss(
    architecture: str,
) -> None:
    torch.manual_seed(0)
    sae = SAES[architecture]()
    x = torch.randn(N_TOKENS, D_IN)
    plain = sae.training_forward_pass(step_input(x))
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 0)  # ablate every latent
    ablated = sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(
        ablated.sae_out, sae.b_dec.expand_as(ablated.sae_out), msg="only b_dec is left"
    )
    assert not torch.equal(ablated.sae_out, plain.sae_out)
    assert ablated.losses["mse_loss"] != plain.losses["mse_loss"]
    assert ablated.feature_acts.to_dense().eq(0).all()
    ablated.loss.backward()  # the edited step still trains
