"""Latents in SAELens's global [tokens, d_sae] space: dense, COO and block-sparse forms."""

import warnings

import torch


def candidate_latents(experts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Global latent index of every candidate, slot-major. [tokens, e * m]"""
    offsets = torch.arange(block_size, device=experts.device)
    return (experts[..., None] * block_size + offsets).flatten(1)


def scatter_to_dense(
    values: torch.Tensor, latents: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """Place per-token values at their latent indices in a zero [tokens, d_sae] tensor."""
    dense = values.new_zeros(values.shape[0], d_sae)
    return dense.scatter_(1, latents, values)


def to_sparse_coo(
    values: torch.Tensor, latents: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """The same placement as `scatter_to_dense`, as a sparse COO tensor."""
    rows = torch.arange(values.shape[0], device=values.device)
    rows = rows.repeat_interleave(values.shape[1])
    indices = torch.stack([rows, latents.flatten()])
    return torch.sparse_coo_tensor(
        indices, values.flatten(), (values.shape[0], d_sae), check_invariants=False
    )


def to_block_sparse(
    candidate_pre: torch.Tensor,  # [tokens, e * m]
    experts: torch.Tensor,  # [tokens, e]
    d_sae: int,
) -> torch.Tensor:
    """Candidates in the global [tokens, d_sae] space as a block-sparse (BSR) tensor.

    Each token holds e blocks of m latents, one per selected expert, so the blocks
    are the candidates themselves; zeros stand for the unselected experts' latents.
    """
    n_tokens, n_active = experts.shape
    block_size = candidate_pre.shape[1] // n_active
    sorted_experts, slot_order = experts.sort(dim=1)
    blocks = candidate_pre.view(n_tokens, n_active, block_size)
    blocks = blocks.gather(1, slot_order[..., None].expand(-1, -1, block_size))
    row_starts = torch.arange(
        0, n_tokens * n_active + 1, n_active, device=experts.device
    )
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse BSR tensor support is in beta"
        )
        return torch.sparse_bsr_tensor(
            row_starts,
            sorted_experts.flatten(),
            blocks.reshape(-1, 1, block_size),
            size=(n_tokens, d_sae),
            check_invariants=False,
        )
