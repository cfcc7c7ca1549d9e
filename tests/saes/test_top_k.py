"""The compiled Top-K kernel against torch.topk, and its fallback to eager PyTorch."""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.saes import kernels
from saelens_moe.saes.experts import EXPERT_WEIGHTINGS, scatter_to_dense
from saelens_moe.saes.kernels import KERNEL_SWITCH
from saelens_moe.saes.top_k import top_k_positions

HAS_COMPILER = kernels.compiler() is not None


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(3)


@pytest.fixture(params=["compiled", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "compiled" and not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine: only the torch.topk path runs")
    monkeypatch.setenv(KERNEL_SWITCH, "1" if request.param == "compiled" else "0")
    return request.param


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty kernel cache and no library loaded yet; restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.compiled_library.cache_clear()
    yield
    kernels.compiled_library.cache_clear()


def rows_of(kind: str, n_rows: int, n_cols: int) -> torch.Tensor:
    values = torch.randn(n_rows, n_cols)
    if kind == "ties":
        return values.mul(2).round()
    if kind == "relu":
        return values.relu()
    if kind == "sorted":  # ascending and descending rows: hard cases for pivots
        ordered = values.sort(dim=1).values
        ordered[::2] = ordered[::2].flip(1)
        return ordered
    if kind == "special":
        values[values > 1.5] = float("nan")
        values[values < -2.0] = -float("nan")  # sign bit set
        values[(values < -1.5) & (values >= -2.0)] = float("-inf")
        values[values.abs() < 0.1] = -0.0
        return values
    return values


def assert_selects_topk_values(
    rows: torch.Tensor, positions: torch.Tensor, k: int
) -> None:
    assert positions.shape == (rows.shape[0], k)
    assert positions.dtype == torch.long
    assert bool((positions.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct
    chosen = rows.gather(1, positions).sort(dim=1, descending=True).values
    expected = rows.topk(k, dim=1).values.sort(dim=1, descending=True).values
    torch.testing.assert_close(chosen, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["normal", "ties", "relu", "sorted", "special"])
@pytest.mark.parametrize(
    ("n_cols", "k"), [(1, 1), (7, 3), (64, 2), (768, 32), (100, 100), (33, 32)]
)
def test_top_k_positions_selects_the_values_torch_topk_selects(
    kernel: str, kind: str, n_cols: int, k: int
) -> None:
    rows = rows_of(kind, 257, n_cols)
    assert_selects_topk_values(rows, top_k_positions(rows, k), k)


def test_top_k_positions_of_a_non_contiguous_view(kernel: str) -> None:
    rows = torch.randn(40, 90)[:, ::3]
    assert_selects_topk_values(rows, top_k_positions(rows, 5), 5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
def test_the_kernel_keeps_the_lowest_positions_among_equal_values() -> None:
    rows = torch.zeros(3, 50)
    rows[:, 40] = 1.0
    assert top_k_positions(rows, 4).sort(dim=1).values.tolist() == [[0, 1, 2, 40]] * 3


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
def test_the_kernel_builds_and_loads_where_a_compiler_exists(fresh_build: None) -> None:
    assert kernels.kernel_in_use()
    assert len(list((kernels.cache_dir()).glob("kernels-*.so"))) == 1


def test_without_a_compiler_everything_runs_on_torch(
    fresh_build: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    rows = torch.randn(20, 30)
    assert kernels.compiled_library() is None
    assert torch.equal(top_k_positions(rows, 4), rows.topk(4, sorted=False).indices)
    sae = make_sae(n_active_experts=2, feature_scaling=True)
    x = torch.randn(16, sae.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), reference_encode(sae, x))


def test_a_failed_build_falls_back_and_logs_the_compiler_error(
    fresh_build: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "false")  # exists, always fails
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.compiled_library() is None
    assert "compiling the kernels failed" in caplog.text
    assert not list(kernels.cache_dir().glob("kernels-*.so"))  # nothing half-written
    rows = torch.randn(5, 9)
    assert_selects_topk_values(rows, top_k_positions(rows, 2), 2)


def test_the_switch_keeps_the_kernel_unloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise AssertionError("the kernel was consulted with the switch off")

    monkeypatch.setenv(KERNEL_SWITCH, "0")
    monkeypatch.setattr(kernels, "compiled_library", refuse)
    rows = torch.randn(6, 11)
    assert torch.equal(top_k_positions(rows, 3), rows.topk(3, sorted=False).indices)
    sae = make_sae(n_active_experts=2)
    with torch.no_grad():
        sae.encode(torch.randn(4, sae.cfg.d_in))


def make_sae(**overrides: Any) -> ScaleTrainingSAE:
    fields: dict[str, Any] = {
        "d_in": 12,
        "d_sae": 5 * 16,
        "n_experts": 5,
        "k": 6,
        **overrides,
    }
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**fields))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "omega":
                param.uniform_(-0.5, 0.5)
            elif name != "W_lowpass":
                param.normal_(0, 0.5)
    return sae


def reference_encode(sae: ScaleTrainingSAE, x: torch.Tensor) -> torch.Tensor:
    """The differentiable path's encode: autograd on, so nothing fused or compiled runs."""
    with torch.enable_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setenv(KERNEL_SWITCH, "0")
        return sae.encode(x).detach()


VARIANTS = [
    {
        "n_active_experts": n_active_experts,
        "expert_weighting": expert_weighting,
        "feature_scaling": feature_scaling,
        "rescale_acts_by_decoder_norm": rescale,
    }
    for n_active_experts in (1, 2, 5)
    for expert_weighting in EXPERT_WEIGHTINGS
    for feature_scaling in (True, False)
    for rescale in (True, False)
]


@pytest.fixture(params=VARIANTS, ids=lambda fields: "-".join(map(str, fields.values())))
def variant_sae(request: pytest.FixtureRequest) -> ScaleTrainingSAE:
    """Every e, weighting, Feature Scaling and decoder-norm rescaling combination."""
    return make_sae(**request.param)


def test_float32_encode_equals_the_differentiable_path(
    kernel: str, variant_sae: ScaleTrainingSAE
) -> None:
    sae = variant_sae
    x = torch.randn(3, 11, sae.cfg.d_in)
    with torch.no_grad():
        fused = sae.encode(x)
        values, latents = sae.encode_sparse(x)
    expected = reference_encode(sae, x)
    torch.testing.assert_close(fused, expected)
    sparse = scatter_to_dense(
        values.flatten(0, 1), latents.flatten(0, 1), sae.cfg.d_sae
    )
    torch.testing.assert_close(sparse.view_as(expected), expected)


def test_float32_encode_with_experts_that_receive_no_tokens(kernel: str) -> None:
    sae = make_sae(n_active_experts=2)
    with torch.no_grad():
        sae.b_router.copy_(torch.tensor([0.0, -60.0, 0.0, -60.0, 0.0]))
    x = torch.randn(24, sae.cfg.d_in)
    with torch.no_grad():
        fused = sae.encode(x)
    assert not fused.view(24, 5, 16)[:, [1, 3]].any()
    torch.testing.assert_close(fused, reference_encode(sae, x))


def test_a_float32_sae_under_a_float64_default_dtype(kernel: str) -> None:
    sae = make_sae(n_active_experts=2, dtype="float32")
    x = torch.randn(16, sae.cfg.d_in)
    expected = reference_encode(sae, x)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            values, latents = sae.encode_sparse(x)
    finally:
        torch.set_default_dtype(previous)
    assert values.dtype == torch.float32
    torch.testing.assert_close(
        scatter_to_dense(values, latents, sae.cfg.d_sae), expected
    )


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
def test_compiled_and_eager_inference_give_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, variant_sae: ScaleTrainingSAE
) -> None:
    """Same matmuls, same epilogue order, no contraction: only tied picks may differ."""
    sae = variant_sae
    x = torch.randn(3, 11, sae.cfg.d_in)
    outputs = []
    for switch in ("1", "0"):
        monkeypatch.setenv(KERNEL_SWITCH, switch)
        with torch.no_grad():
            outputs.append(sae.encode(x))
    assert torch.equal(*outputs)
