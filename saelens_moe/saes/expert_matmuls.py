"""Grouping (token, slot) pairs by expert, and the experts' inference matmuls, compiled.

`group_pairs` is a stable counting sort in C++ (about 0.7 ms of argsort, bincount
and inverse-permutation ops in PyTorch for 8192 pairs), with those ops as its
fallback. From Python, each expert's gather and matmul are six dispatched ops; at
64 experts that is 2-3 ms of a 35 ms encode. `expert_matmuls.cpp` runs the same
loop in C++ and calls the sgemm PyTorch's matmuls call: MKL's, found by its symbol
in PyTorch's own library, so the results are the same bits as `torch.mm`'s. It is
used only where PyTorch is built with MKL (its LP64 `sgemm_`) and after a check
against `torch.mm` on first use; otherwise, or without the compiled kernels
(`kernels.py`), `compiled_expert_matmuls` returns None and the caller's PyTorch
loop runs."""

import ctypes
import functools
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import record_function

from saelens_moe.saes import kernels

_MAX_INT = (1 << 31) - 1  # the BLAS takes 32-bit sizes
_logger = logging.getLogger(__name__)


class PairGroups(NamedTuple):
    """(token, slot) pairs grouped by expert, in token order within each expert."""

    order: torch.Tensor
    """The flat (token, slot) pair in each grouped row. [pairs]"""
    counts: list[int]
    """How many pairs each expert has. [n_experts]"""
    row_of_pair: torch.Tensor
    """The grouped row of each flat pair: the inverse of `order`. [pairs]"""


def group_pairs(experts: torch.Tensor, n_experts: int) -> PairGroups:
    """Group the (token, slot) pairs of `experts` [tokens, e] by expert."""
    flat = experts.reshape(-1)
    if kernels.kernel_enabled() and flat.device.type == "cpu":
        library = kernels.compiled_library()
        grouped = (
            None if library is None else _compiled_groups(library, flat, n_experts)
        )
        if grouped is not None:
            return grouped
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    order = flat.argsort(stable=True)
    row_of_pair = torch.empty_like(order)
    row_of_pair[order] = torch.arange(order.numel(), device=order.device)
    return PairGroups(order, counts, row_of_pair)


def _compiled_groups(
    library: ctypes.CDLL, flat: torch.Tensor, n_experts: int
) -> PairGroups | None:
    experts = flat.to(torch.int64).contiguous()
    order, row_of_pair = torch.empty_like(experts), torch.empty_like(experts)
    counts = torch.empty(n_experts, dtype=torch.int64)
    status = library.group_pairs(
        kernels.address(experts),
        experts.numel(),
        n_experts,
        kernels.address(order),
        kernels.address(row_of_pair),
        kernels.address(counts),
    )
    if status != 0:  # an expert out of range: leave it to the PyTorch path
        return None
    return PairGroups(order, counts.tolist(), row_of_pair)


def compiled_expert_matmuls(
    sae_in: torch.Tensor,  # [tokens, d_in]
    token_of_pair: torch.Tensor,  # [pairs], grouped by expert
    counts: list[int],  # pairs per expert
    W_enc: torch.Tensor,  # [d_in, d_sae]
) -> torch.Tensor | None:
    """sae_in[token] @ W_enc[:, block of its expert] for every pair, or None without the kernel.

    Rows come out in the grouped order. [pairs, d_sae / n_experts]
    """
    row_stride = _row_stride(W_enc)
    if not kernels.kernel_enabled() or row_stride is None:
        return None
    if not _handles(sae_in, W_enc, row_stride, counts):
        return None
    library = kernels.compiled_library()
    sgemm = None if library is None else _checked_sgemm(library)
    if library is None or sgemm is None:
        return None
    return _run(library, sgemm, sae_in, token_of_pair, counts, W_enc, row_stride)


def compiled_matmuls_in_use() -> bool:
    """Whether the compiled expert matmuls run here (building the kernels if needed)."""
    library = kernels.compiled_library() if kernels.kernel_enabled() else None
    return library is not None and _checked_sgemm(library) is not None


def _handles(
    sae_in: torch.Tensor, W_enc: torch.Tensor, row_stride: int, counts: list[int]
) -> bool:
    return (
        all(
            tensor.device.type == "cpu" and tensor.dtype == torch.float32
            for tensor in (sae_in, W_enc)
        )
        and max(sae_in.shape[1], row_stride, *counts) <= _MAX_INT
        and sum(counts) > 0
    )


def _row_stride(W_enc: torch.Tensor) -> int | None:
    """The distance between W_enc's rows as the BLAS reads them, or None if it can't.

    Each row must be contiguous and rows must not overlap. Strides of size-1
    dimensions mean nothing (a [1, n] view of a column has strides (1, 1)), so a
    single row is read as if its stride were its length.
    """
    n_rows, n_cols = W_enc.shape
    if n_cols > 1 and W_enc.stride(1) != 1:
        return None
    if n_rows == 1:
        return n_cols
    return W_enc.stride(0) if W_enc.stride(0) >= n_cols else None


def _run(
    library: ctypes.CDLL,
    sgemm: int,
    sae_in: torch.Tensor,
    token_of_pair: torch.Tensor,
    counts: list[int],
    W_enc: torch.Tensor,
    row_stride: int,  # from _row_stride
) -> torch.Tensor:
    block_size = W_enc.shape[1] // len(counts)
    pre = sae_in.new_empty(token_of_pair.numel(), block_size)
    # contiguous copies are bound here, so they outlive the call that reads them
    inputs = sae_in.contiguous(), token_of_pair.contiguous(), torch.tensor(counts)
    with record_function("saelens_moe::expert_matmuls"):  # visible in profiles
        library.gathered_expert_matmuls(
            sgemm,
            kernels.address(inputs[0]),
            sae_in.shape[1],
            kernels.address(inputs[1]),
            kernels.address(inputs[2]),
            len(counts),
            W_enc.data_ptr(),  # rows may be strided; each row is contiguous
            row_stride,
            block_size,
            kernels.address(pre),
            kernels.threads(),
        )
    return pre


@functools.cache
def _checked_sgemm(library: ctypes.CDLL) -> int | None:
    """Address of PyTorch's MKL sgemm, once `library` has matched torch.mm with it."""
    sgemm = _mkl_sgemm()
    if sgemm is None:
        return None
    generator = torch.Generator().manual_seed(0)
    sae_in = torch.randn(6, 9, generator=generator)
    W_enc = torch.randn(9, 3 * 5 + 4, generator=generator)[:, :15]  # strided rows
    token_of_pair = torch.tensor([4, 0, 5, 1, 1, 2, 3, 0])
    counts = [3, 0, 5]
    got = _run(library, sgemm, sae_in, token_of_pair, counts, W_enc, W_enc.stride(0))
    blocks = [0] * 3 + [2] * 5
    expected = torch.stack(
        [
            sae_in[token] @ W_enc[:, 5 * block : 5 * block + 5]
            for token, block in zip(token_of_pair.tolist(), blocks, strict=True)
        ]
    )
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        _logger.warning("the BLAS found in PyTorch disagrees with torch.mm; not used")
        return None
    return sgemm


def _mkl_sgemm() -> int | None:
    """Address of `sgemm_` in PyTorch's CPU library, where PyTorch is built with MKL."""
    if not torch.backends.mkl.is_available():
        return None
    torch_lib = Path(torch.__file__).parent / "lib"
    for path in sorted(torch_lib.glob("libtorch_cpu.*")):
        try:
            function = ctypes.CDLL(str(path)).sgemm_
        except (OSError, AttributeError):
            continue
        return ctypes.cast(function, ctypes.c_void_p).value
    _logger.info("no sgemm_ symbol in PyTorch's library; experts use torch.mm")
    return None
