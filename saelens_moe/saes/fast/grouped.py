"""The selected experts' encoder matmuls: one grouped matmul for all experts.

The (token, slot) pairs are sorted by expert and each expert's block of `W_enc`
multiplies only its own pairs, in one call of PyTorch's `grouped_mm` whose group
boundaries stay on the device. The number of ops is the same whatever the number
of experts, and nothing is read back to the host, so a GPU never waits on the CPU.

`grouped_mm` takes float32, bfloat16 and float16 on CPU and CUDA, with rows
aligned to 16 bytes. Elsewhere (float64, odd widths, other devices) `moe`'s plain
version runs: every expert computed for every token, the selected blocks picked;
the same values at N/e times the cost, still a fixed number of ops.
"""

import torch
import torch.nn.functional as F

from saelens_moe.saes import moe

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_MM_DEVICES = ("cpu", "cuda")


def selected_expert_matmuls(
    sae_in: torch.Tensor,  # [tokens, d_in]
    experts: torch.Tensor,  # [tokens, e]
    W_enc: torch.Tensor,  # [d_in, d_sae]
    n_experts: int,
) -> torch.Tensor:
    """`moe.selected_expert_matmuls`, computing only the selected experts. [tokens, e, m]"""
    sae_in, W_enc = _in_compute_dtype(sae_in, W_enc)
    n_tokens, n_active = experts.shape
    block_size = W_enc.shape[1] // n_experts
    if not grouped_mm_handles(W_enc, block_size):
        return moe.selected_expert_matmuls(sae_in, experts, W_enc, n_experts)
    pair_experts, pair_order = experts.reshape(-1).sort(stable=True)
    group_ends = torch.searchsorted(
        pair_experts, torch.arange(n_experts, device=experts.device), right=True
    ).to(torch.int32)
    grouped_in = sae_in.index_select(0, pair_order // n_active)  # [pairs, d_in]
    blocks = W_enc.view(W_enc.shape[0], n_experts, block_size).permute(1, 0, 2)
    grouped_out = grouped_mm(grouped_in, blocks, group_ends)  # [pairs, m]
    pair_out = torch.empty_like(grouped_out).index_copy(0, pair_order, grouped_out)
    return pair_out.view(n_tokens, n_active, block_size)


def grouped_mm_handles(W_enc: torch.Tensor, block_size: int) -> bool:
    """Whether `grouped_mm` takes this encoder: dtype, device and 16-byte rows."""
    alignment = 16 // W_enc.element_size()
    return (
        W_enc.dtype in _GROUPED_MM_DTYPES
        and W_enc.device.type in _GROUPED_MM_DEVICES
        and W_enc.is_contiguous()
        and W_enc.shape[0] % alignment == 0
        and block_size % alignment == 0
    )


def _in_compute_dtype(
    sae_in: torch.Tensor, W_enc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in autocast's dtype under autocast, else in W_enc's."""
    device = W_enc.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return sae_in.to(dtype), W_enc.to(dtype)
    return sae_in.to(W_enc.dtype), W_enc


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
