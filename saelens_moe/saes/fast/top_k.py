"""The global Top-K with backward over the kept entries only."""

import torch

from saelens_moe.saes.moe import SparseCode, global_latents, weighted_candidates


def keep_top_k(
    pre: torch.Tensor,  # [tokens, e, m]
    weights: torch.Tensor,  # [tokens, e]
    experts: torch.Tensor,  # [tokens, e]
    k: int,
) -> SparseCode:
    """`moe.keep_top_k`, ranking without autograd.

    ReLU and weighting are applied again to the k kept entries only, so backward
    never runs over the [tokens, e * m] candidates (same values: the same ops on
    the same entries).
    """
    block_size = pre.shape[-1]
    flat_pre = pre.flatten(1)  # [tokens, e * m]
    with torch.no_grad():
        candidates = weighted_candidates(pre, weights).flatten(1)
        positions = candidates.topk(k, dim=-1, sorted=False).indices
    kept_weights = weights.gather(1, positions // block_size)
    values = flat_pre.gather(1, positions).relu() * kept_weights
    return SparseCode(values, global_latents(positions, experts, block_size))
