"""The compiled expert matmuls against the PyTorch loop they replace, and their fallbacks."""

import logging
from collections.abc import Iterator

import pytest
import torch

from saelens_moe import ScaleSAE, ScaleSAEConfig
from saelens_moe.saes import expert_matmuls, kernels
from saelens_moe.saes.expert_matmuls import compiled_expert_matmuls, group_pairs
from saelens_moe.saes.experts import _expert_matmul_loop, _expert_rows

# where these hold, the compiled matmuls must run; a failed self-check is a failure
COMPILABLE = kernels.compiler() is not None and torch.backends.mkl.is_available()
needs_compiled = pytest.mark.skipif(
    not COMPILABLE, reason="no C++ compiler or no MKL in PyTorch: the torch loop runs"
)


class Problem:
    """Routed tokens and a (possibly row-strided) encoder, grouped as the encode groups them."""

    def __init__(
        self,
        n_tokens: int,
        d_in: int,
        n_experts: int,
        block_size: int,
        n_active: int,
        unused_experts: tuple[int, ...] = (),
        row_padding: int = 0,
    ) -> None:
        self.block_size = block_size
        self.sae_in = torch.randn(n_tokens, d_in)
        width = n_experts * block_size
        self.W_enc = torch.randn(d_in, width + row_padding)[:, :width]
        scores = torch.rand(n_tokens, n_experts)
        scores[:, list(unused_experts)] = -1.0
        experts = scores.topk(n_active, dim=1).indices
        pair_order, self.counts, _ = group_pairs(experts, n_experts)
        self.token_of_pair = pair_order // n_active
        self.expert_of_pair = experts.flatten()[pair_order]

    def compiled(self) -> torch.Tensor | None:
        return compiled_expert_matmuls(
            self.sae_in, self.token_of_pair, self.counts, self.W_enc
        )

    def torch_loop(self) -> torch.Tensor:
        rows = [(e, r) for e, r in _expert_rows(self.counts) if r.stop > r.start]
        return _expert_matmul_loop(
            self.sae_in, self.token_of_pair, rows, self.W_enc, self.block_size
        )

    def float64_truth(self) -> torch.Tensor:
        blocks = self.W_enc.double().view(self.W_enc.shape[0], -1, self.block_size)
        chosen = blocks[:, self.expert_of_pair].transpose(0, 1)  # [pairs, d_in, m]
        inputs = self.sae_in.double()[self.token_of_pair]
        return torch.einsum("pd,pdm->pm", inputs, chosen).float()


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(5)


@pytest.fixture
def fresh_check() -> Iterator[None]:
    expert_matmuls._checked_sgemm.cache_clear()
    yield
    expert_matmuls._checked_sgemm.cache_clear()


PROBLEMS = {
    "gpt2-like block": dict(
        n_tokens=300, d_in=96, n_experts=8, block_size=48, n_active=2
    ),
    "odd sizes": dict(n_tokens=37, d_in=13, n_experts=5, block_size=7, n_active=2),
    "unused experts": dict(
        n_tokens=50,
        d_in=12,
        n_experts=6,
        block_size=8,
        n_active=2,
        unused_experts=(0, 4),
    ),
    "one expert takes all": dict(
        n_tokens=40,
        d_in=10,
        n_experts=4,
        block_size=6,
        n_active=1,
        unused_experts=(0, 1, 3),
    ),
    "every expert": dict(n_tokens=9, d_in=11, n_experts=3, block_size=5, n_active=3),
    "single token": dict(n_tokens=1, d_in=16, n_experts=4, block_size=4, n_active=2),
    "row-strided encoder": dict(
        n_tokens=64, d_in=24, n_experts=4, block_size=16, n_active=2, row_padding=5
    ),
}


@needs_compiled
def test_the_compiled_matmuls_pass_their_check_against_torch_mm() -> None:
    assert expert_matmuls.compiled_matmuls_in_use()


@needs_compiled
@pytest.mark.parametrize("shape", PROBLEMS.values(), ids=PROBLEMS.keys())
def test_the_compiled_matmuls_give_the_torch_loops_bits(shape: dict[str, int]) -> None:
    problem = Problem(**shape)
    got = problem.compiled()
    assert got is not None
    assert torch.equal(got, problem.torch_loop())
    torch.testing.assert_close(got, problem.float64_truth())


def test_the_torch_loop_matches_float64() -> None:
    problem = Problem(**PROBLEMS["unused experts"])
    torch.testing.assert_close(problem.torch_loop(), problem.float64_truth())


@needs_compiled
def test_a_single_row_encoder_whose_strides_say_nothing() -> None:
    """A [1, n] view of a column has strides (1, 1); the BLAS must get n as its stride."""
    problem = Problem(n_tokens=7, d_in=1, n_experts=2, block_size=4, n_active=1)
    problem.W_enc = torch.randn(8, 1).T
    assert problem.W_enc.stride() == (1, 1)
    got = problem.compiled()
    assert got is not None
    assert torch.equal(got, problem.torch_loop())


def test_a_d_in_1_sae_encodes_the_same_with_and_without_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = ScaleSAE(
        ScaleSAEConfig(d_in=1, d_sae=4, n_experts=1, n_active_experts=1, k=4)
    )
    x = torch.randn(5, 1)
    codes, outputs = [], []
    for switch in ("1", "0"):
        monkeypatch.setenv(kernels.KERNEL_SWITCH, switch)
        with torch.no_grad():
            codes.append(sae.encode(x))
            outputs.append(sae(x))
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(*codes)
    torch.testing.assert_close(*outputs)  # kept latents may be summed in another order


@pytest.mark.parametrize(
    "unhandled",
    ["switch off", "float64", "column-strided encoder", "overlapping rows"],
)
def test_unhandled_inputs_leave_the_work_to_torch(
    unhandled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = Problem(**PROBLEMS["odd sizes"])
    sae_in, W_enc = problem.sae_in, problem.W_enc
    if unhandled == "switch off":
        monkeypatch.setenv(kernels.KERNEL_SWITCH, "0")
        assert not expert_matmuls.compiled_matmuls_in_use()
    elif unhandled == "float64":
        sae_in, W_enc = sae_in.double(), W_enc.double()
    else:
        W_enc = W_enc.T.contiguous().T
    assert (
        compiled_expert_matmuls(sae_in, problem.token_of_pair, problem.counts, W_enc)
        is None
    )


def test_without_mkl_in_torch_the_torch_loop_runs(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(expert_matmuls, "_mkl_sgemm", lambda: None)
    problem = Problem(**PROBLEMS["odd sizes"])
    assert not expert_matmuls.compiled_matmuls_in_use()
    assert problem.compiled() is None


@needs_compiled
def test_a_blas_that_disagrees_with_torch_mm_is_not_used(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def wrong(*args: object) -> torch.Tensor:
        return torch.zeros(8, 5)

    monkeypatch.setattr(expert_matmuls, "_run", wrong)
    with caplog.at_level(logging.WARNING, logger=expert_matmuls.__name__):
        assert not expert_matmuls.compiled_matmuls_in_use()
    assert "disagrees with torch.mm" in caplog.text


def torch_groups(experts: torch.Tensor, n_experts: int) -> expert_matmuls.PairGroups:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(kernels.KERNEL_SWITCH, "0")
        return group_pairs(experts, n_experts)


@pytest.mark.parametrize(
    ("n_tokens", "n_active", "n_experts"),
    [(300, 2, 8), (1, 1, 3), (0, 2, 4), (50, 5, 5)],
)
def test_group_pairs_is_a_stable_grouping_by_expert(
    n_tokens: int, n_active: int, n_experts: int
) -> None:
    experts = torch.rand(n_tokens, n_experts).topk(n_active, dim=1).indices
    groups = group_pairs(experts, n_experts)
    flat = experts.flatten()
    assert groups.counts == torch.bincount(flat, minlength=n_experts).tolist()
    assert bool((flat[groups.order].diff() >= 0).all())  # grouped by expert
    for expert in range(n_experts):  # token order within each expert
        assert bool((groups.order[flat[groups.order] == expert].diff() > 0).all())
    assert torch.equal(groups.order[groups.row_of_pair], torch.arange(flat.numel()))
    expected = torch_groups(experts, n_experts)
    assert torch.equal(groups.order, expected.order)
    assert groups.counts == expected.counts
    assert torch.equal(groups.row_of_pair, expected.row_of_pair)


def test_group_pairs_leaves_experts_out_of_range_to_torch() -> None:
    experts = torch.tensor([[0, 3], [1, 0]])
    groups = group_pairs(experts, 2)  # expert 3 does not exist
    assert groups.counts == torch.bincount(experts.flatten()).tolist()
    assert torch.equal(groups.order, experts.flatten().argsort(stable=True))
