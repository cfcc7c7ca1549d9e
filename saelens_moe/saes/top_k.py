"""Row-wise Top-K, as a small compiled CPU kernel with `torch.topk` as the fallback.

`torch.topk` partitions (value, index) pairs of every row with a branchy
comparator; for 4096 rows of 768 candidates and k = 32 that took 11-12 ms on two
cores, more than half as long as the selected experts' matmuls. The kernel in
`top_k_rows.cpp` bounds each row's k-th value by its smallest group maximum and
selects only among the entries above it. `compiled_expert_top_k` also builds each
token's candidates on the fly from the grouped matmul outputs (Feature Scaling,
bias, decoder norm, weight, ReLU), so no [tokens, e * m] candidate tensor is
written or re-read.

The kernel is built and loaded by `kernels.py`. Without it, for tensors it does
not handle (not CPU float32), or with `SAELENS_MOE_KERNELS=0`, PyTorch runs
instead. Both choose the same values; only which of several equal values is kept
may differ.
"""

from typing import NamedTuple

import torch
from torch.profiler import record_function

from saelens_moe.saes import kernels

_MAX_COLUMNS = 1 << 32  # the kernel packs a position into 32 bits


def top_k_positions(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of each row (NaN largest), in no order. [rows, k]"""
    library = kernels.compiled_library() if _kernel_handles(candidates, k) else None
    if library is None:
        return candidates.topk(k, dim=-1, sorted=False).indices
    matrix = candidates.contiguous()
    n_rows, n_cols = matrix.shape
    positions = torch.empty(n_rows, k, dtype=torch.long)
    with record_function("saelens_moe::top_k_positions"):  # visible in profiles
        library.top_k_positions(
            kernels.address(matrix),
            n_rows,
            n_cols,
            k,
            kernels.address(positions),
            kernels.threads(),
        )
    return positions


class ExpertEpilogue(NamedTuple):
    """What turns the selected experts' matmul outputs into weighted ReLU candidates.

    Fields in the order `selected_expert_top_k` in the kernel takes them.
    """

    scale: torch.Tensor | None
    """Feature Scaling's (1 + omega) per (token, slot), or None. [tokens, e]"""
    shift: torch.Tensor | None
    """Feature Scaling's omega (a . x) per (token, slot), or None. [tokens, e]"""
    weights: torch.Tensor
    """Expert weights, all >= 0. [tokens, e]"""
    bias: torch.Tensor
    """b_enc. [d_sae]"""
    norms: torch.Tensor | None
    """Decoder row norms to multiply by, or None. [d_sae]"""


def compiled_expert_top_k(
    grouped_pre: torch.Tensor,  # [pairs, m], rows grouped by expert
    grouped_row: torch.Tensor,  # [tokens, e], row of each (token, slot)
    experts: torch.Tensor,  # [tokens, e]
    epilogue: ExpertEpilogue,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, global latents) of each token's top k candidates, or None without the kernel.

    The candidate of latent j of slot s is grouped_pre[grouped_row[t, s], j] through
    the epilogue, in the order `experts._weighted_candidates` applies it; each
    [tokens, k].
    """
    n_tokens, n_active = experts.shape
    block_size = grouped_pre.shape[1]
    floats = [grouped_pre, epilogue.weights, epilogue.bias]
    optional = [epilogue.scale, epilogue.shift, epilogue.norms]
    floats += [tensor for tensor in optional if tensor is not None]
    handled = kernels.kernel_enabled() and all(
        tensor.device.type == "cpu" and tensor.dtype == torch.float32
        for tensor in floats
    )
    n_candidates = n_active * block_size
    fits = 0 < k <= n_candidates < _MAX_COLUMNS
    library = kernels.compiled_library() if handled and fits else None
    if library is None:
        return None
    values = torch.empty(n_tokens, k, dtype=torch.float32)
    latents = torch.empty(n_tokens, k, dtype=torch.long)
    # contiguous copies are bound here, so they outlive the call that reads them
    inputs = [
        None if tensor is None else tensor.contiguous()
        for tensor in (grouped_pre, grouped_row, experts, *epilogue)
    ]
    with record_function("saelens_moe::selected_expert_top_k"):  # visible in profiles
        library.selected_expert_top_k(
            *(kernels.address(tensor) for tensor in inputs),
            n_tokens,
            n_active,
            block_size,
            k,
            kernels.address(values),
            kernels.address(latents),
            kernels.threads(),
        )
    return values, latents


def _kernel_handles(candidates: torch.Tensor, k: int) -> bool:
    return (
        kernels.kernel_enabled()
        and candidates.device.type == "cpu"
        and candidates.dtype == torch.float32
        and candidates.dim() == 2
        and 0 < k <= candidates.shape[1] < _MAX_COLUMNS
    )
