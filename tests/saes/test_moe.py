"""The routed model, on `fast` and on `moe`'s plain functions, against `moe.dense_forward`.

Comparisons run in float64, where the two differ only by summation order, so the
default tolerances are tight; one test checks float32 against the float64 truth.
"""

from typing import Any

import pytest
import torch

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.saes import fast, moe, scale_sae
from saelens_moe.saes.fast.grouped import grouped_mm_handles
from saelens_moe.saes.moe import EXPERT_WEIGHTINGS, dense_forward, route

D_IN, N_EXPERTS, BLOCK = 10, 4, 6


@pytest.fixture(autouse=True, params=["fast", "moe"])
def compute(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs on the fast subpackage and on the plain functions of `moe`."""
    monkeypatch.setattr(scale_sae, "COMPUTE", {"fast": fast, "moe": moe}[request.param])


@pytest.fixture(autouse=True)
def seed_and_float64() -> Any:
    torch.manual_seed(1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_sae(
    router_bias: torch.Tensor | None = None, **overrides: Any
) -> ScaleTrainingSAE:
    fields: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": N_EXPERTS * BLOCK,
        "n_experts": N_EXPERTS,
        "n_active_experts": 2,
        "k": 4,
        "dtype": "float64",
        **overrides,
    }
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**fields))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "omega":
                param.uniform_(-0.5, 0.5)
            elif name == "W_lowpass":
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.5)
        if router_bias is not None:
            sae.b_router.copy_(router_bias)
    return sae


def assert_matches_dense_reference(sae: ScaleTrainingSAE, x: torch.Tensor) -> None:
    sae.zero_grad()
    target = torch.randn_like(x)
    fast_acts = sae.encode(x).reshape(-1, sae.cfg.d_sae)
    fast_loss = ((sae(x) - target) ** 2).sum()
    fast_loss.backward()
    fast_grads = {
        n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None
    }
    sae.zero_grad()

    d_in = x.shape[-1]
    reference = dense_forward(sae, x.reshape(-1, d_in))
    ((reference.sae_out - target.reshape(-1, d_in)) ** 2).sum().backward()
    reference_grads = {
        n: p.grad for n, p in sae.named_parameters() if p.grad is not None
    }

    torch.testing.assert_close(fast_acts, reference.feature_acts)
    with torch.no_grad():  # the fused per-expert path that builds no graph
        torch.testing.assert_close(
            sae.encode(x).reshape(-1, sae.cfg.d_sae), reference.feature_acts
        )
        torch.testing.assert_close(sae(x).reshape(-1, d_in), reference.sae_out)
    assert fast_grads.keys() == reference_grads.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


@pytest.mark.parametrize("n_active_experts", range(1, N_EXPERTS + 1))
@pytest.mark.parametrize("expert_weighting", EXPERT_WEIGHTINGS)
@pytest.mark.parametrize("feature_scaling", [True, False])
def test_routed_path_equals_dense_masked_reference(
    n_active_experts: int, expert_weighting: str, feature_scaling: bool
) -> None:
    sae = make_sae(
        n_active_experts=n_active_experts,
        expert_weighting=expert_weighting,
        feature_scaling=feature_scaling,
    )
    assert_matches_dense_reference(sae, torch.randn(2, 9, D_IN))


def test_experts_that_receive_no_tokens_get_zero_encoder_gradient() -> None:
    sae = make_sae(router_bias=torch.tensor([0.0, -50.0, 0.0, -50.0]))
    x = torch.randn(16, D_IN)
    assert set(
        route(x - sae.b_dec, sae.W_router, sae.b_router, 2, "probs")
        .experts.unique()
        .tolist()
    ) == {0, 2}
    assert_matches_dense_reference(sae, x)
    sae(x).sum().backward()
    assert sae.W_enc.grad is not None
    unused = sae.W_enc.grad.view(D_IN, N_EXPERTS, BLOCK)[:, [1, 3]]
    # only Feature Scaling's mean direction reaches an unused expert's block
    assert torch.allclose(unused, unused.mean(dim=-1, keepdim=True).expand_as(unused))


def test_every_token_on_one_expert() -> None:
    sae = make_sae(router_bias=torch.tensor([0.0, 0.0, 60.0, 0.0]), n_active_experts=1)
    x = torch.randn(12, D_IN)
    assert (
        route(x - sae.b_dec, sae.W_router, sae.b_router, 1, "probs").experts == 2
    ).all()
    assert_matches_dense_reference(sae, x)


def test_odd_sizes_and_a_single_token() -> None:
    sae = make_sae(d_in=7, d_sae=15, n_experts=5, n_active_experts=3, k=5)
    assert_matches_dense_reference(sae, torch.randn(1, 7))
    assert_matches_dense_reference(sae, torch.randn(5, 7))


ALIGNED = {"d_in": 16, "d_sae": 4 * 8, "n_experts": 4}
"""Sizes whose float32 rows are 16-byte aligned, so the grouped matmuls run."""


@pytest.mark.parametrize("n_active_experts", [1, 2, 4])
@pytest.mark.parametrize("expert_weighting", EXPERT_WEIGHTINGS)
@pytest.mark.parametrize("feature_scaling", [True, False])
def test_grouped_float32_path_is_as_accurate_as_float32_allows(
    n_active_experts: int, expert_weighting: str, feature_scaling: bool
) -> None:
    fields = ALIGNED | {
        "n_active_experts": n_active_experts,
        "expert_weighting": expert_weighting,
        "feature_scaling": feature_scaling,
    }
    assert_float32_close_to_float64_truth(fields, torch.randn(64, ALIGNED["d_in"]))


def test_every_expert_float32_fallback_is_as_accurate_as_float32_allows() -> None:
    assert_float32_close_to_float64_truth({}, torch.randn(64, D_IN))  # 40-byte rows


def assert_float32_close_to_float64_truth(
    fields: dict[str, Any], x64: torch.Tensor
) -> None:
    """The float32 SAE's outputs and gradients against the float64 dense reference."""
    sae64 = make_sae(**fields)
    reference = dense_forward(sae64, x64)
    reference.sae_out.pow(2).sum().backward()
    true_grads = {
        n: p.grad.clone() for n, p in sae64.named_parameters() if p.grad is not None
    }

    sae32 = make_sae(**fields, dtype="float32")
    sae32.load_state_dict({k: v.float() for k, v in sae64.state_dict().items()})
    grouped = grouped_mm_handles(sae32.W_enc, sae32.cfg.d_sae // sae32.cfg.n_experts)
    assert grouped == bool(fields), "the test meant the other path"
    out32 = sae32(x64.float())
    out32.pow(2).sum().backward()

    def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
        return ((value.double() - truth).norm() / truth.norm()).item()

    assert relative_error(out32, reference.sae_out) < 1e-6
    for name, truth in true_grads.items():
        grad = dict(sae32.named_parameters())[name].grad
        assert grad is not None
        if truth.norm() < 1e-9:  # e.g. the router when one expert's weight is 1
            assert grad.norm() < 1e-3, name  # float32 rounding, not signal
        else:
            assert relative_error(grad, truth) < 1e-5, name
