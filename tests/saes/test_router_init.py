"""The router that starts from k-means centroids of the first training batch."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from saelens_moe import (
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from saelens_moe.saes.moe import route
from saelens_moe.saes.router_init import KMEANS_LOGIT_SCALE, kmeans_router

D_IN, N_EXPERTS = 16, 4
FIELDS: dict[str, Any] = {"d_in": D_IN, "d_sae": 32, "n_experts": N_EXPERTS, "k": 3}


def clustered_tokens(n_per_cluster: int = 64, seed: int = 0) -> torch.Tensor:
    """Tokens around N_EXPERTS orthogonal directions, cluster after cluster. [tokens, d_in]"""
    generator = torch.Generator().manual_seed(seed)
    centres = 5 * torch.eye(D_IN)[:N_EXPERTS]
    noise = torch.randn(N_EXPERTS, n_per_cluster, D_IN, generator=generator)
    return (centres[:, None] + noise).reshape(-1, D_IN)


def step(x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 3.0},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def top_expert(sae: ScaleTrainingSAE, x: torch.Tensor) -> torch.Tensor:
    return route(x, sae.W_router, sae.b_router, 1, "probs").experts[:, 0]


def test_kmeans_router_sends_each_cluster_to_its_own_expert() -> None:
    x = clustered_tokens()
    W_router, b_router = kmeans_router(x, N_EXPERTS, None)
    experts = (x @ W_router + b_router).argmax(dim=-1).view(N_EXPERTS, -1)
    # every token of a cluster goes to one expert, and no two clusters share one
    assert (experts == experts[:, :1]).all()
    assert experts[:, 0].unique().numel() == N_EXPERTS
    # a token of mean norm lying on its centroid gets logit KMEANS_LOGIT_SCALE
    logits = W_router.norm(dim=0) * x.norm(dim=-1).mean()
    torch.testing.assert_close(logits, torch.full((N_EXPERTS,), KMEANS_LOGIT_SCALE))
    assert torch.equal(b_router, torch.zeros(N_EXPERTS))


@pytest.mark.parametrize(
    ("sae_class", "config_class"),
    [
        (ScaleTrainingSAE, ScaleTrainingSAEConfig),
        (SwitchTrainingSAE, SwitchTrainingSAEConfig),
    ],
)
def test_the_first_training_batch_sets_the_router_and_later_ones_do_not(
    sae_class: type[ScaleTrainingSAE], config_class: type[ScaleTrainingSAEConfig]
) -> None:
    torch.manual_seed(0)
    sae = sae_class(config_class(**FIELDS))
    assert sae.cfg.router_init == "kmeans" and sae.router_init_pending
    x = clustered_tokens()
    before = top_expert(sae, x).view(N_EXPERTS, -1)
    assert not (before == before[:, :1]).all()  # a random router mixes the clusters
    sae.training_forward_pass(step(x))
    expected = kmeans_router(sae.process_sae_in(x), N_EXPERTS, None)
    torch.testing.assert_close(sae.W_router.detach(), expected[0])
    after = top_expert(sae, x).view(N_EXPERTS, -1)
    assert (after == after[:, :1]).all()
    router = sae.W_router.detach().clone()
    sae.training_forward_pass(step(clustered_tokens(seed=1)[:32]))
    assert torch.equal(sae.W_router.detach(), router)


def test_a_random_router_is_left_as_initialised() -> None:
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS, router_init="random"))
    router = sae.W_router.detach().clone()
    sae.training_forward_pass(step(clustered_tokens()))
    assert not sae.router_init_pending
    assert torch.equal(sae.W_router.detach(), router)


def test_a_loaded_router_is_never_replaced(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS))
    trained.training_forward_pass(step(clustered_tokens()))
    trained.save_model(tmp_path)
    by_checkpoint = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS))
    by_checkpoint.load_weights_from_checkpoint(tmp_path)
    by_state_dict = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS))
    by_state_dict.load_state_dict(trained.state_dict())
    for loaded in (by_checkpoint, by_state_dict):
        assert not loaded.router_init_pending
        loaded.training_forward_pass(step(clustered_tokens(seed=2)))
        torch.testing.assert_close(loaded.W_router, trained.W_router)


def test_router_init_is_checked_at_config_time() -> None:
    with pytest.raises(
        ValueError, match=r"router_init must be one of \('kmeans', 'random'\)"
    ):
        ScaleTrainingSAEConfig(**FIELDS, router_init="zeros")  # pyright: ignore[reportArgumentType]
