"""The fast subpackage against `moe`'s plain functions and per-expert matmuls."""

import warnings
from typing import Any

import pytest
import torch

from saelens_moe.saes import fast, moe
from saelens_moe.saes.fast import grouped as grouped_matmuls
from saelens_moe.saes.fast.grouped import grouped_mm_handles, selected_expert_matmuls
from saelens_moe.saes.moe import SparseCode
from saelens_moe.saes.sparse_gradients import LatentRows, SparseExpertGradients

D_IN, N_EXPERTS, BLOCK = 16, 4, 8


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def problem(
    n_tokens: int = 20, n_active: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sae_in = torch.randn(n_tokens, D_IN, dtype=dtype, requires_grad=True)
    W_enc = torch.randn(D_IN, N_EXPERTS * BLOCK, dtype=dtype, requires_grad=True)
    scores = torch.rand(n_tokens, N_EXPERTS)
    experts = scores.topk(n_active, dim=-1).indices
    return sae_in, experts, W_enc


def per_expert_mm(
    sae_in: torch.Tensor, experts: torch.Tensor, W_enc: torch.Tensor
) -> torch.Tensor:
    """One matmul per (token, slot): the definition. [tokens, e, m]"""
    rows = [
        [sae_in[token] @ W_enc[:, e * BLOCK : (e + 1) * BLOCK] for e in token_experts]
        for token, token_experts in enumerate(experts.tolist())
    ]
    return torch.stack([torch.stack(row) for row in rows])


def gradients(output: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, output.numel()).view_as(output).to(output.dtype)
    return torch.autograd.grad((output * weights).sum(), inputs)


def test_grouped_mm_takes_float32_bfloat16_and_float16_with_16_byte_rows() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert grouped_mm_handles(torch.empty(D_IN, 32, dtype=dtype), BLOCK)
    assert not grouped_mm_handles(torch.empty(D_IN, 32, dtype=torch.float64), BLOCK)
    assert not grouped_mm_handles(torch.empty(10, 32), BLOCK)  # 40-byte rows
    assert not grouped_mm_handles(torch.empty(D_IN, 12), 6)  # 24-byte blocks
    assert grouped_mm_handles(torch.empty(32, D_IN).T, BLOCK)  # stored by latent
    assert not grouped_mm_handles(torch.empty(D_IN, 64)[:, ::2], BLOCK)  # strided


def test_grouped_matmuls_take_an_encoder_stored_by_latent() -> None:
    sae_in, experts, W_enc = problem(n_active=2)
    by_latent = W_enc.t().contiguous().t()
    torch.testing.assert_close(
        selected_expert_matmuls(sae_in, experts, by_latent, N_EXPERTS),
        per_expert_mm(sae_in, experts, W_enc),
    )


@pytest.mark.parametrize("n_active", [1, 2, 4])
def test_grouped_matmuls_equal_one_matmul_per_pair(n_active: int) -> None:
    sae_in, experts, W_enc = problem(n_active=n_active)
    grouped = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    torch.testing.assert_close(grouped, per_expert_mm(sae_in, experts, W_enc))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_every_expert_paths_agree_on_values_and_gradients(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    sae_in, experts, W_enc = problem(dtype=dtype)
    grouped = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    grouped_grads = gradients(grouped, sae_in, W_enc)
    monkeypatch.setattr(grouped_matmuls, "grouped_mm_handles", lambda *_: False)
    fallback = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    torch.testing.assert_close(grouped, fallback)
    # bfloat16 gradients sum 20 rounded products in another order on each path
    tolerance = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {}
    for got, expected in zip(
        grouped_grads, gradients(fallback, sae_in, W_enc), strict=True
    ):
        torch.testing.assert_close(got, expected, **tolerance)


def test_experts_without_tokens_get_zero_gradient() -> None:
    sae_in, _, W_enc = problem()
    experts = torch.full((20, 1), 2)
    grouped = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    (grad_W,) = gradients(grouped, W_enc)
    blocks = grad_W.view(D_IN, N_EXPERTS, BLOCK)
    assert blocks[:, [0, 1, 3]].eq(0).all()
    assert blocks[:, 2].ne(0).any()


@pytest.mark.parametrize("requires_grad", [True, False])
def test_an_empty_batch_gives_an_empty_output(requires_grad: bool) -> None:
    sae_in, experts, W_enc = problem(n_tokens=0)
    W_enc.requires_grad_(requires_grad)
    out = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    assert out.shape == (0, 2, BLOCK)
    if requires_grad:
        (grad_W,) = gradients(out, W_enc)
        assert grad_W.eq(0).all()


def test_autocast_runs_the_experts_in_its_dtype() -> None:
    sae_in, experts, W_enc = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), per_expert_mm(sae_in, experts, W_enc), atol=0.1, rtol=0.02
    )
    (grad_W,) = gradients(out, W_enc)
    assert grad_W.dtype == torch.float32


def test_grouped_mm_op_traces_under_torch_compile() -> None:
    sae_in, experts, W_enc = problem()

    def matmuls(*args: Any) -> torch.Tensor:
        return selected_expert_matmuls(*args, N_EXPERTS)

    compiled = torch.compile(matmuls, fullgraph=True, backend="aot_eager")
    out = compiled(sae_in, experts, W_enc)
    torch.testing.assert_close(out, per_expert_mm(sae_in, experts, W_enc))
    for got, expected in zip(
        gradients(out, sae_in, W_enc),
        gradients(matmuls(sae_in, experts, W_enc), sae_in, W_enc),
        strict=True,
    ):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("rescale", [True, False])
def test_fast_decoding_equals_moe_decoding_with_gradients(rescale: bool) -> None:
    W_dec = torch.randn(N_EXPERTS * BLOCK, D_IN, requires_grad=True)
    values = torch.rand(20, 3, requires_grad=True)
    latents = torch.randint(0, N_EXPERTS * BLOCK, (20, 3))
    outputs = []
    for module in (fast, moe):
        decoder = module.decoder_for(W_dec, rescale)
        decoded = module.decode_sparse(SparseCode(values, latents), decoder)
        norm_term = decoder.norms.sum() if decoder.norms is not None else 0
        outputs.append((decoded, gradients(decoded + norm_term, values, W_dec)))
    (fast_out, fast_grads), (moe_out, moe_grads) = outputs
    torch.testing.assert_close(fast_out, moe_out)
    for got, expected in zip(fast_grads, moe_grads, strict=True):
        torch.testing.assert_close(got, expected)


def dense_rows(rows: LatentRows, n_latents: int) -> torch.Tensor:
    dense = rows.rows.new_zeros(n_latents, *rows.rows.shape[1:])
    return dense.index_add_(0, rows.latents, rows.rows)


def test_sparse_gradients_of_the_expert_matmuls_equal_the_dense_ones() -> None:
    sae_in, experts, W_enc = problem()
    # a gradient on a few entries only, as the kept latents leave
    mask = torch.rand(20, 2, BLOCK) < 0.1
    grad_out = torch.randn(20, 2, BLOCK) * mask
    dense = selected_expert_matmuls(sae_in, experts, W_enc, N_EXPERTS)
    expected = torch.autograd.grad(dense, (sae_in, W_enc), grad_out)
    collector = SparseExpertGradients()
    sparse = selected_expert_matmuls(
        sae_in, experts, W_enc.t().contiguous().t(), N_EXPERTS, collector
    )
    torch.testing.assert_close(sparse, dense)
    (grad_in,) = torch.autograd.grad(sparse, (sae_in,), grad_out)
    torch.testing.assert_close(grad_in, expected[0])
    rows = collector.take("W_enc")
    assert rows is not None and rows.latents.numel() < N_EXPERTS * BLOCK
    torch.testing.assert_close(dense_rows(rows, N_EXPERTS * BLOCK), expected[1].t())


@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_gradients_of_decoding_equal_the_dense_ones(rescale: bool) -> None:
    W_dec = torch.randn(N_EXPERTS * BLOCK, D_IN, requires_grad=True)
    values = torch.rand(20, 3) * (torch.rand(20, 3) < 0.7)  # some kept at 0
    values.requires_grad_()
    latents = torch.randint(0, N_EXPERTS * BLOCK, (20, 3))
    code = SparseCode(values, latents)
    decoder = fast.decoder_for(W_dec, rescale)
    decoded = fast.decode_sparse(code, decoder)
    norm_term = decoder.norms[latents].sum() if decoder.norms is not None else 0
    expected = gradients(decoded + norm_term, values, W_dec)
    collector = SparseExpertGradients()
    decoder = fast.decoder_for(W_dec, rescale, collector)
    decoded = fast.decode_sparse(code, decoder)
    norm_term = decoder.norms[latents].sum() if decoder.norms is not None else 0
    output = decoded + norm_term
    weights = torch.linspace(-1, 1, output.numel()).view_as(output)
    (output * weights).sum().backward()  # as training: autograd.grad would skip W_dec
    torch.testing.assert_close(values.grad, expected[0])
    assert W_dec.grad is None
    rows = collector.take("W_dec")
    assert rows is not None
    # decoding reaches the latents kept above 0; the norm term here, every one
    touched = (latents if rescale else latents[values != 0]).unique()
    assert torch.equal(rows.latents, touched)
    torch.testing.assert_close(dense_rows(rows, N_EXPERTS * BLOCK), expected[1])


def test_fast_top_k_equals_moe_top_k_with_gradients() -> None:
    pre = torch.randn(20, 2, BLOCK, requires_grad=True)
    weights = torch.rand(20, 2, requires_grad=True)
    experts = torch.rand(20, N_EXPERTS).topk(2, dim=-1).indices
    codes = [module.keep_top_k(pre, weights, experts, 5) for module in (fast, moe)]
    # the same entries, in whatever order topk returns them: sort by latent
    fast_code, moe_code = (
        SparseCode(*(t.gather(1, c.latents.argsort(dim=-1)) for t in c)) for c in codes
    )
    torch.testing.assert_close(fast_code.latents, moe_code.latents)
    torch.testing.assert_close(fast_code.values, moe_code.values)
    for got, expected in zip(
        gradients(fast_code.values, pre, weights),
        gradients(moe_code.values, pre, weights),
        strict=True,
    ):
        torch.testing.assert_close(got, expected)


H100, A100 = (9, 0), (8, 0)


@pytest.mark.parametrize(
    ("device_type", "dtype", "capability", "aligned", "path"),
    [
        ("cuda", torch.bfloat16, H100, True, "grouped"),
        ("cuda", torch.bfloat16, (10, 0), True, "grouped"),
        ("cuda", torch.float32, H100, True, "grouped_host_sync"),
        ("cuda", torch.float16, H100, True, "grouped_host_sync"),
        ("cuda", torch.bfloat16, A100, True, "grouped_host_sync"),
        ("cuda", torch.bfloat16, (12, 0), True, "grouped_host_sync"),
        ("cuda", torch.bfloat16, None, True, "grouped_host_sync"),
        ("cuda", torch.float64, H100, True, "every_expert"),
        ("cuda", torch.bfloat16, H100, False, "every_expert"),
        ("cpu", torch.float32, None, True, "grouped"),
        ("cpu", torch.bfloat16, None, True, "grouped"),
        ("cpu", torch.float64, None, True, "every_expert"),
        ("cpu", torch.float32, None, False, "every_expert"),
        ("mps", torch.float32, None, True, "every_expert"),
        ("meta", torch.bfloat16, None, True, "every_expert"),
    ],
)
def test_expert_matmul_path_over_device_dtype_and_capability(
    device_type: str,
    dtype: torch.dtype,
    capability: tuple[int, int] | None,
    aligned: bool,
    path: str,
) -> None:
    assert path in grouped_matmuls.EXPERT_MATMUL_PATHS
    assert (
        grouped_matmuls.expert_matmul_path(device_type, dtype, capability, aligned)
        == path
    )


def test_expert_matmul_path_of_reads_alignment_from_the_encoder() -> None:
    assert grouped_matmuls.expert_matmul_path_of(torch.empty(D_IN, 32), BLOCK) == (
        "grouped"
    )
    assert grouped_matmuls.expert_matmul_path_of(torch.empty(10, 32), BLOCK) == (
        "every_expert"
    )


def test_host_sync_warning_names_the_fix_where_the_gpu_has_the_kernel() -> None:
    message = grouped_matmuls.host_sync_message(torch.float32, H100)
    assert "torch.float32" in message
    assert "autocast=True" in message
    assert 'dtype="bfloat16"' in message
    older = grouped_matmuls.host_sync_message(torch.bfloat16, A100)
    assert "compute capability 8.0" in older
    assert "autocast=True" not in older


def test_host_sync_warning_is_given_once_per_gpu_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        grouped_matmuls, "expert_matmul_path_of", lambda *_: "grouped_host_sync"
    )
    monkeypatch.setattr(grouped_matmuls, "_cuda_capability", lambda _: H100)
    grouped_matmuls._warn_host_sync.cache_clear()
    W_enc = torch.empty(D_IN, 32)
    with pytest.warns(grouped_matmuls.ExpertMatmulFallbackWarning) as caught:
        for _ in range(3):
            grouped_matmuls._warn_if_host_sync(W_enc, BLOCK)
    assert len(caught) == 1
    grouped_matmuls._warn_host_sync.cache_clear()


def test_no_host_sync_warning_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grouped_matmuls, "expert_matmul_path_of", lambda *_: "grouped")
    grouped_matmuls._warn_host_sync.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped_matmuls._warn_if_host_sync(torch.empty(D_IN, 32), BLOCK)
