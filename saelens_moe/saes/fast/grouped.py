"""The selected experts' encoder matmuls: one grouped matmul for all experts.

The (token, slot) pairs are sorted by expert and each expert's block of `W_enc`
multiplies only its own pairs, in one call of PyTorch's `grouped_mm` whose group
boundaries stay on the device. The number of ops is the same whatever the number
of experts, and nothing is read back to the host, so a GPU never waits on the CPU.

`grouped_mm` takes float32, bfloat16 and float16 on CPU and CUDA, with rows
aligned to 16 bytes. Elsewhere (float64, odd widths, other devices) `moe`'s plain
version runs: every expert computed for every token, the selected blocks picked;
the same values at N/e times the cost, still a fixed number of ops.

On CUDA, PyTorch has one fast grouped kernel: bfloat16 on compute capability 9.0
and 10.0 (`_grouped_mm_cuda` in PyTorch's `GroupedBlas.cpp`). Every other CUDA
case runs PyTorch's fallback, which copies the group ends to the host and loops
over the experts: correct, but a host sync per call. `expert_matmul_path` says
which of these paths a device, dtype and GPU take; the SAE warns once
(`ExpertMatmulFallbackWarning`) when it takes the fallback.
"""

import warnings
from collections.abc import Callable
from functools import cache
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F

from saelens_moe.saes import moe
from saelens_moe.saes.fast.autocast import autocast_dtype
from saelens_moe.saes.sparse_gradients import (
    SparseExpertGradients,
    weighted_row_sums,
)

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_MM_DEVICES = ("cpu", "cuda")
GROUPED_KERNEL_CAPABILITIES = ((9, 0), (10, 0))
"""CUDA compute capabilities with PyTorch's fast grouped kernel (bfloat16 only)."""

ExpertMatmulPath = Literal["grouped", "grouped_host_sync", "every_expert"]
"""How the selected experts' encoder matmuls run:

- "grouped": one `grouped_mm`, group ends never read by the host (CPU; CUDA in
  bfloat16 on compute capability 9.0 / 10.0).
- "grouped_host_sync": one `grouped_mm` that PyTorch runs as its fallback: the
  group ends copied to the host, one `mm` per expert (CUDA, any other dtype or GPU).
- "every_expert": `moe`'s plain version, every expert computed and the selected
  ones picked (float64, rows not 16-byte aligned, devices without `grouped_mm`).
"""
EXPERT_MATMUL_PATHS: tuple[str, ...] = get_args(ExpertMatmulPath)


class ExpertMatmulFallbackWarning(UserWarning):
    """The expert matmuls on this GPU take PyTorch's host-syncing fallback."""


def expert_matmul_path(
    device_type: str,
    dtype: torch.dtype,
    capability: tuple[int, int] | None = None,
    aligned: bool = True,
) -> ExpertMatmulPath:
    """The path the expert matmuls take for a device type, compute dtype and GPU.

    Args:
        device_type: The encoder's device type ("cpu", "cuda", "meta", ...).
        dtype: The dtype the matmuls run in (autocast's dtype under autocast).
        capability: The CUDA compute capability (major, minor); None off CUDA or
            when unknown, which counts as a GPU without the fast kernel.
        aligned: Whether the encoder is contiguous with 16-byte rows and blocks.
    """
    if (
        device_type not in _GROUPED_MM_DEVICES
        or dtype not in _GROUPED_MM_DTYPES
        or not aligned
    ):
        return "every_expert"
    if device_type == "cpu":
        return "grouped"
    if dtype == torch.bfloat16 and capability in GROUPED_KERNEL_CAPABILITIES:
        return "grouped"
    return "grouped_host_sync"


def expert_matmul_path_of(
    W_enc: torch.Tensor, block_size: int, dtype: torch.dtype | None = None
) -> ExpertMatmulPath:
    """`expert_matmul_path` of an encoder [d_in, d_sae] whose matmuls run in `dtype`.

    `dtype` defaults to the encoder's own; under autocast pass autocast's dtype.
    """
    dtype = W_enc.dtype if dtype is None else dtype
    capability = None
    if W_enc.device.type == "cuda":
        capability = _cuda_capability(W_enc.device.index)
    aligned = _is_aligned(W_enc, block_size, dtype)
    return expert_matmul_path(W_enc.device.type, dtype, capability, aligned)


def selected_expert_matmuls(
    sae_in: torch.Tensor,  # [tokens, d_in]
    experts: torch.Tensor,  # [tokens, e]
    W_enc: torch.Tensor,  # [d_in, d_sae]
    n_experts: int,
    gradients: SparseExpertGradients | None = None,
) -> torch.Tensor:
    """`moe.selected_expert_matmuls`, computing only the selected experts. [tokens, e, m]

    With `gradients`, W_enc's gradient goes there as the columns of the latents
    whose pre-activation received a gradient (on the grouped path).
    """
    sae_in, W_enc = _in_compute_dtype(sae_in, W_enc)
    n_tokens, n_active = experts.shape
    block_size = W_enc.shape[1] // n_experts
    if not grouped_mm_handles(W_enc, block_size):
        return moe.selected_expert_matmuls(sae_in, experts, W_enc, n_experts)
    if W_enc.device.type == "cuda" and not torch.compiler.is_compiling():
        _warn_if_host_sync(W_enc, block_size)
    pair_experts, pair_order = experts.reshape(-1).sort(stable=True)
    group_ends = torch.searchsorted(
        pair_experts, torch.arange(n_experts, device=experts.device), right=True
    ).to(torch.int32)
    grouped_in = sae_in.index_select(0, pair_order // n_active)  # [pairs, d_in]
    if gradients is None:
        blocks = W_enc.view(W_enc.shape[0], n_experts, block_size).permute(1, 0, 2)
        grouped_out = grouped_mm(grouped_in, blocks, group_ends)  # [pairs, m]
    else:
        grouped_out = _grouped_mm_with_sparse_gradients(
            grouped_in, W_enc.detach(), group_ends, pair_experts, gradients
        )
    pair_out = torch.empty_like(grouped_out).index_copy(0, pair_order, grouped_out)
    return pair_out.view(n_tokens, n_active, block_size)


def _sparse_gradient_grouped_mm(
    grouped_in: torch.Tensor,
    W_enc: torch.Tensor,
    group_ends: torch.Tensor,
    pair_experts: torch.Tensor,
    gradients: SparseExpertGradients,
) -> torch.Tensor:
    output = _GroupedMMWithSparseGradients.apply(
        grouped_in, W_enc, group_ends, pair_experts, gradients
    )
    assert isinstance(output, torch.Tensor)
    return output


# its backward hands rows to a Python object: eager only (a graph break under compile)
_grouped_mm_with_sparse_gradients: Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SparseExpertGradients],
    torch.Tensor,
] = cast(Any, torch.compiler.disable(_sparse_gradient_grouped_mm))


class _GroupedMMWithSparseGradients(torch.autograd.Function):
    """`grouped_mm` whose backward reads only the nonzero entries of its output's
    gradient (the kept and AuxK latents): the input gradient gathers their encoder
    columns, and W_enc's gradient goes to `SparseExpertGradients` as their columns.
    Backward costs pairs-with-gradient * d_in, not pairs * m * d_in."""

    @staticmethod
    def forward(
        ctx: Any,
        grouped_in: torch.Tensor,  # [pairs, d_in], rows grouped by expert
        W_enc: torch.Tensor,  # [d_in, d_sae], detached
        group_ends: torch.Tensor,  # [n_experts] int32
        pair_experts: torch.Tensor,  # [pairs]
        gradients: SparseExpertGradients,
    ) -> torch.Tensor:
        n_experts = group_ends.shape[0]
        blocks = W_enc.view(W_enc.shape[0], n_experts, -1).permute(1, 0, 2)
        ctx.save_for_backward(grouped_in, W_enc, pair_experts)
        ctx.gradients = gradients
        return grouped_mm(grouped_in, blocks, group_ends)  # [pairs, m]

    @staticmethod
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        grouped_in, W_enc, pair_experts = ctx.saved_tensors
        pairs, within = grad_out.nonzero(as_tuple=True)  # sorted by pair
        values = grad_out[pairs, within]
        latents = pair_experts[pairs] * grad_out.shape[1] + within
        grad_in = None
        if ctx.needs_input_grad[0]:
            starts = torch.arange(grad_out.shape[0], device=pairs.device)
            grad_in = F.embedding_bag(
                latents,
                W_enc.t().contiguous(),  # a view when W_enc is stored by latent
                torch.searchsorted(pairs, starts),
                mode="sum",
                per_sample_weights=values.to(W_enc.dtype),
            )
        sources = grouped_in.float()  # no copy in float32
        ctx.gradients.add("W_enc", *weighted_row_sums(sources, pairs, latents, values))
        return grad_in, None, None, None, None


def grouped_mm_handles(W_enc: torch.Tensor, block_size: int) -> bool:
    """Whether `grouped_mm` takes this encoder: dtype, device and 16-byte rows."""
    aligned = _is_aligned(W_enc, block_size, W_enc.dtype)
    path = expert_matmul_path(W_enc.device.type, W_enc.dtype, aligned=aligned)
    return path != "every_expert"


def _is_aligned(W_enc: torch.Tensor, block_size: int, dtype: torch.dtype) -> bool:
    """Rows and expert blocks a multiple of 16 bytes in `dtype`: contiguous, or
    stored by latent (the transpose of a contiguous [d_sae, d_in], as
    `saelens_moe.lazy_adam` keeps it)."""
    alignment = 16 // dtype.itemsize
    if W_enc.t().is_contiguous():
        return W_enc.shape[0] % alignment == 0
    return (
        W_enc.is_contiguous()
        and W_enc.shape[0] % alignment == 0
        and block_size % alignment == 0
    )


def _in_compute_dtype(
    sae_in: torch.Tensor, W_enc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in autocast's dtype under autocast, else in W_enc's."""
    dtype = autocast_dtype(W_enc.device.type)
    if dtype is not None:
        return sae_in.to(dtype), W_enc.to(dtype)
    return sae_in.to(W_enc.dtype), W_enc


@cache
def _cuda_capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _warn_if_host_sync(W_enc: torch.Tensor, block_size: int) -> None:
    """Warn once per GPU and dtype when the grouped matmul takes the fallback."""
    if expert_matmul_path_of(W_enc, block_size) == "grouped_host_sync":
        _warn_host_sync(W_enc.device.index, W_enc.dtype)


@cache
def _warn_host_sync(device_index: int | None, dtype: torch.dtype) -> None:
    message = host_sync_message(dtype, _cuda_capability(device_index))
    warnings.warn(message, ExpertMatmulFallbackWarning, stacklevel=5)


def host_sync_message(dtype: torch.dtype, capability: tuple[int, int]) -> str:
    """What `ExpertMatmulFallbackWarning` says for a compute dtype on a GPU."""
    major, minor = capability
    kernel = " or ".join(f"{a}.{b}" for a, b in GROUPED_KERNEL_CAPABILITIES)
    if capability in GROUPED_KERNEL_CAPABILITIES:
        fix = (
            "train with SAELens's autocast=True (bfloat16 matmuls; outside training, "
            'torch.autocast("cuda", dtype=torch.bfloat16)) or build the SAE with '
            'dtype="bfloat16"'
        )
    else:
        fix = (
            f"this GPU (compute capability {major}.{minor}) has no such kernel, so "
            "the fallback is the only grouped path on it"
        )
    return (
        f"The Scale/Switch SAE's expert matmuls run in {dtype} on CUDA, which "
        "PyTorch's grouped_mm serves with its fallback: the group ends are copied "
        "to the host and each expert runs its own mm (a host sync per call). Its "
        f"fast kernel takes bfloat16 on compute capability {kernel}: {fix}. "
        "Given once per GPU and dtype."
    )


@torch.library.custom_op("saelens_moe::grouped_mm", mutates_args=())
def grouped_mm(
    grouped_in: torch.Tensor,  # [pairs, d_in], rows grouped by expert
    blocks: torch.Tensor,  # [n_experts, d_in, m]
    group_ends: torch.Tensor,  # [n_experts] int32, cumulative
) -> torch.Tensor:
    """PyTorch's `grouped_mm`, as an op `torch.compile` traces for every dtype.

    (In torch 2.13 the tracer's shape function accepts bfloat16 only.) [pairs, m]
    """
    return F.grouped_mm(grouped_in, blocks, offs=group_ends)


@grouped_mm.register_fake
def _(
    grouped_in: torch.Tensor, blocks: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    del group_ends
    return grouped_in.new_empty(grouped_in.shape[0], blocks.shape[-1])


@torch.library.custom_op("saelens_moe::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(
    grouped_in: torch.Tensor,  # [pairs, d_in]
    grad_out: torch.Tensor,  # [pairs, m]
    group_ends: torch.Tensor,  # [n_experts] int32
) -> torch.Tensor:
    """The gradient of each expert's block: its rows of grouped_in.T @ grad_out. [n_experts, d_in, m]"""
    return F.grouped_mm(grouped_in.t(), grad_out, offs=group_ends)


@grouped_weight_grad.register_fake
def _(
    grouped_in: torch.Tensor, grad_out: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    return grouped_in.new_empty(
        group_ends.shape[0], grouped_in.shape[1], grad_out.shape[1]
    )


def _save_operands(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    output: torch.Tensor,
) -> None:
    del output
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    grouped_in, blocks, group_ends = ctx.saved_tensors  # pyright: ignore[reportAttributeAccessIssue]
    needs_input_grad: tuple[bool, ...] = ctx.needs_input_grad  # pyright: ignore[reportAttributeAccessIssue]
    grad_out = grad_out.contiguous()  # grouped_mm refuses expanded strides
    grad_in = grad_blocks = None
    if needs_input_grad[0]:
        grad_in = grouped_mm(grad_out, blocks.transpose(1, 2), group_ends)
    if needs_input_grad[1]:
        grad_blocks = grouped_weight_grad(grouped_in, grad_out, group_ends)
    return grad_in, grad_blocks, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_save_operands)
