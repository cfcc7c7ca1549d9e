import copy
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from saelens_moe.lazy_adam import LazyAdam
from saelens_moe.saes import summaries
from saelens_moe.saes.scale_sae import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.saes.summaries import DictionarySummaries, block_sums

D_IN = 16


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def make_sae() -> ScaleTrainingSAE:
    """Feature Scaling and decoder-norm rescaling on; 3 tokens keep at most 12 of
    the 128 latents, so every step is a partial (lazy) one."""
    cfg = ScaleTrainingSAEConfig(
        d_in=D_IN,
        d_sae=128,
        k=4,
        n_experts=8,
        n_active_experts=2,
        feature_scaling=True,
        rescale_acts_by_decoder_norm=True,
        dead_latent_window=None,
        router_init="random",
    )
    sae = ScaleTrainingSAE(cfg)
    with torch.no_grad():
        sae.omega.fill_(0.5)
    return sae


def lazy_step(sae: ScaleTrainingSAE, optimizer: LazyAdam, step: int) -> None:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=torch.randn(3, D_IN),
            coefficients={"load_balancing": 1.0},
            dead_neuron_mask=None,
            n_training_steps=step,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    assert optimizer.gather().share < 0.5
    optimizer.step()
    optimizer.zero_grad()


def no_full_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a summary is computed from its whole weight from here on."""

    def refused(*args: Any) -> torch.Tensor:
        raise AssertionError("recomputed from the whole weight")

    monkeypatch.setattr(summaries, "block_sums", refused)
    monkeypatch.setattr(torch.Tensor, "norm", refused)


def kept_values(sae: ScaleTrainingSAE) -> tuple[torch.Tensor, torch.Tensor]:
    assert sae.sparse_gradients is not None
    kept = sae.sparse_gradients.summaries
    return kept.block_sums(sae.W_enc, sae.cfg.n_experts), kept.row_norms(sae.W_dec)


def test_lazy_steps_keep_the_summaries_equal_to_recomputed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = make_sae()
    optimizer = LazyAdam(sae, lr=0.05)
    start = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    for step in range(6):
        lazy_step(sae, optimizer, step)
    expected_sums = block_sums(sae.W_enc.detach(), sae.cfg.n_experts)
    expected_norms = sae.W_dec.detach().norm(dim=-1)
    assert not torch.allclose(expected_sums, block_sums(start[0], 8), atol=1e-3)
    assert not torch.allclose(expected_norms, start[1].norm(dim=-1), atol=1e-3)
    with monkeypatch.context() as patched:
        no_full_computation(patched)
        sums, norms = kept_values(sae)
    torch.testing.assert_close(sums, expected_sums, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norms, expected_norms, atol=1e-6, rtol=1e-5)


def test_kept_summaries_train_as_summaries_recomputed_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = make_sae()
    recomputing = copy.deepcopy(sae)
    state = torch.get_rng_state()
    optimizer = LazyAdam(sae, lr=0.05)
    for step in range(8):
        lazy_step(sae, optimizer, step)
    torch.set_rng_state(state)
    monkeypatch.setattr(summaries, "REFRESH_STEPS", 0)
    optimizer = LazyAdam(recomputing, lr=0.05)
    for step in range(8):
        lazy_step(recomputing, optimizer, step)
    for (name, kept), (_, recomputed) in zip(
        sae.named_parameters(), recomputing.named_parameters(), strict=True
    ):
        torch.testing.assert_close(kept, recomputed, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("change", ["in_place", "load_state_dict"])
def test_a_weight_changed_outside_lazy_adam_is_summarised_afresh(change: str) -> None:
    sae = make_sae()
    optimizer = LazyAdam(sae, lr=0.05)
    lazy_step(sae, optimizer, 0)
    other = make_sae().state_dict()
    with torch.no_grad():
        if change == "in_place":
            sae.W_enc.mul_(2.0)
            sae.W_dec.mul_(3.0)
        else:
            sae.load_state_dict(other)
    sums, norms = kept_values(sae)
    torch.testing.assert_close(sums, block_sums(sae.W_enc.detach(), 8))
    torch.testing.assert_close(norms, sae.W_dec.detach().norm(dim=-1))


def test_summaries_are_computed_afresh_every_REFRESH_STEPS_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(summaries, "REFRESH_STEPS", 3)
    sae = make_sae()
    optimizer = LazyAdam(sae, lr=0.05)
    computed: list[int] = []
    full_sums = summaries.block_sums

    def counted(W_enc: torch.Tensor, n_experts: int) -> torch.Tensor:
        computed.append(1)
        return full_sums(W_enc, n_experts)

    monkeypatch.setattr(summaries, "block_sums", counted)
    for step in range(7):
        lazy_step(sae, optimizer, step)
    assert len(computed) == 3  # steps 0, 3 and 6


def test_a_summary_of_another_tensor_is_not_reused() -> None:
    kept = DictionarySummaries()
    W_dec = torch.randn(8, 4)
    kept.row_norms(W_dec)
    other = W_dec * 2
    torch.testing.assert_close(kept.row_norms(other), other.norm(dim=-1))
