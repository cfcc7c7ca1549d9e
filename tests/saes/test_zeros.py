"""Zero tensors from the operating system, and the SAE paths that use them."""

import pytest
import torch

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.saes.zeros import MIN_OS_ZEROED_BYTES, big_zeros
from tests.saes.reference import dense_masked_forward


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64]
)
def test_big_zeros_are_zero_writable_and_shaped_like_torch_zeros(
    dtype: torch.dtype,
) -> None:
    like = torch.ones(1, dtype=dtype)
    n_elements = MIN_OS_ZEROED_BYTES // like.element_size() + 3
    zeros = big_zeros((3, n_elements // 3), like=like)
    assert zeros.dtype == dtype
    assert zeros.shape == (3, n_elements // 3)
    assert zeros.is_contiguous()
    assert not zeros.any()
    zeros[2, -1] = 1
    assert zeros.sum().item() == 1


def test_small_zeros_are_ordinary_torch_zeros() -> None:
    like = torch.ones(1, dtype=torch.float16)
    zeros = big_zeros((4, 5), like=like)
    assert zeros.dtype == torch.float16
    assert not zeros.any()
    zeros.resize_(40)  # an ordinary, resizable torch allocation


def test_a_wide_sae_whose_dense_outputs_and_gradients_are_os_zeroed() -> None:
    torch.manual_seed(0)
    d_in, d_sae, n_tokens = 64, 131072, 64  # W_enc and [tokens, d_sae] are 32 MiB
    assert d_in * d_sae * 4 >= MIN_OS_ZEROED_BYTES
    assert n_tokens * d_sae * 4 >= MIN_OS_ZEROED_BYTES
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=d_in, d_sae=d_sae, n_experts=256, k=8)
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(n_tokens, d_in)
    with torch.no_grad():
        acts = sae.encode(x)
    sae(x).pow(2).sum().backward()
    fast_grad = sae.W_enc.grad
    sae.zero_grad()
    reference = dense_masked_forward(sae, x)
    reference.sae_out.pow(2).sum().backward()
    torch.testing.assert_close(acts, reference.feature_acts)
    torch.testing.assert_close(fast_grad, sae.W_enc.grad)
