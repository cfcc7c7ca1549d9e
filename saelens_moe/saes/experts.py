"""Routing and expert compute shared by the Scale SAE and Switch SAE architectures.

Only the experts a token is routed to are computed: tokens are grouped by expert,
each expert's encoder block multiplies only its own tokens, the global Top-K runs
over those candidates, and decoding reads only the K kept decoder rows.
See arXiv 2511.05745 (Scale SAE) and arXiv 2410.08201 (Switch SAE).
"""

from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

ExpertWeighting = Literal["softmax_of_probs", "renormalized", "probs", "uniform"]
EXPERT_WEIGHTINGS: tuple[str, ...] = get_args(ExpertWeighting)


class Routing(NamedTuple):
    """Which experts each token uses, and how much each contributes."""

    probs: torch.Tensor
    """Router softmax over all experts. [tokens, n_experts]"""
    experts: torch.Tensor
    """The selected experts, most probable first. [tokens, n_active_experts]"""
    weights: torch.Tensor
    """Multiplier applied to each selected expert's activations. [tokens, n_active_experts]"""


class FeatureScaling(NamedTuple):
    """Per-expert Feature Scaling state: W^_i = (1 + omega_i) W_i - omega_i a_i."""

    omega: torch.Tensor
    """Scaling strength per expert. [n_experts]"""
    anchors: torch.Tensor
    """a_i = T mu_i as columns: the direction each expert scales around. [d_in, n_experts]"""


class SparseCode(NamedTuple):
    """The K kept latents of each token, in the global [d_sae] latent space."""

    values: torch.Tensor
    """Activations of the kept latents (before decoder-norm division). [tokens, k]"""
    latents: torch.Tensor
    """Global index of each kept latent. [tokens, k]"""


class ExpertEncoding(NamedTuple):
    """Everything the encoder computed for one batch of tokens."""

    routing: Routing
    candidate_pre: torch.Tensor
    """Pre-activations of the selected experts' latents, slot-major. [tokens, e * m]"""
    code: SparseCode


def route(
    sae_in: torch.Tensor,  # [tokens, d_in]
    W_router: torch.Tensor,  # [d_in, n_experts]
    b_router: torch.Tensor,  # [n_experts]
    n_active_experts: int,
    expert_weighting: str,
) -> Routing:
    """Route each token to its `n_active_experts` most probable experts."""
    probs = (sae_in @ W_router + b_router).softmax(dim=-1)
    top_probs, experts = probs.topk(n_active_experts, dim=-1)
    return Routing(probs, experts, weigh_experts(top_probs, expert_weighting))


def weigh_experts(top_probs: torch.Tensor, expert_weighting: str) -> torch.Tensor:
    """Multiplier of each selected expert under one of `EXPERT_WEIGHTINGS`."""
    if expert_weighting == "softmax_of_probs":
        return top_probs.softmax(dim=-1)
    if expert_weighting == "renormalized":
        return top_probs / top_probs.sum(dim=-1, keepdim=True)
    if expert_weighting == "probs":
        return top_probs
    if expert_weighting == "uniform":
        return torch.ones_like(top_probs)
    raise ValueError(
        f"expert_weighting must be one of {EXPERT_WEIGHTINGS}, got {expert_weighting!r}"
    )


def feature_scaling_anchors(
    W_enc: torch.Tensor,  # [d_in, d_sae]
    n_experts: int,
    W_lowpass: torch.Tensor | None,  # [d_in, d_in]
) -> torch.Tensor:
    """a_i = T mu_i for every expert, as columns of a [d_in, n_experts] matrix."""
    d_in = W_enc.shape[0]
    mean_directions = W_enc.view(d_in, n_experts, -1).mean(dim=-1)
    if W_lowpass is None:
        return mean_directions
    return W_lowpass @ mean_directions


def fold_feature_scaling(
    W_enc: torch.Tensor, scaling: FeatureScaling, n_experts: int
) -> torch.Tensor:
    """The effective encoder (1 + omega_i) W_i - omega_i a_i, materialised. [d_in, d_sae]"""
    d_in = W_enc.shape[0]
    blocks = W_enc.view(d_in, n_experts, -1)
    omega = scaling.omega[None, :, None]
    folded = (1 + omega) * blocks - omega * scaling.anchors[:, :, None]
    return folded.reshape(d_in, -1)


class _GroupedExpertMatmul(torch.autograd.Function):
    """x @ W_enc[:, block(e)] for each (token, selected expert e) pair.

    Pairs are grouped by expert so each expert's block is one dense matmul over
    only its own tokens; backward mirrors that and writes each block of the
    weight gradient once.
    """

    @staticmethod
    def forward(
        ctx: Any,
        sae_in: torch.Tensor,  # [tokens, d_in]
        W_enc: torch.Tensor,  # [d_in, d_sae]
        experts: torch.Tensor,  # [tokens, e]
        n_experts: int,
    ) -> torch.Tensor:
        n_active = experts.shape[1]
        block_size = W_enc.shape[1] // n_experts
        pair_order = experts.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts.reshape(-1), minlength=n_experts).tolist()
        grouped_in = sae_in.index_select(0, pair_order // n_active)  # [pairs, d_in]
        grouped_out = grouped_in.new_empty(grouped_in.shape[0], block_size)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                block = W_enc[:, expert * block_size : (expert + 1) * block_size]
                torch.mm(
                    grouped_in[start : start + count],
                    block,
                    out=grouped_out[start : start + count],
                )
            start += count
        ctx.save_for_backward(grouped_in, W_enc, pair_order)
        ctx.counts = counts
        ctx.n_tokens = sae_in.shape[0]
        pair_out = torch.empty_like(grouped_out)
        pair_out.index_copy_(0, pair_order, grouped_out)
        return pair_out.view(sae_in.shape[0], n_active * block_size)

    @staticmethod
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grouped_in, W_enc, pair_order = ctx.saved_tensors
        block_size = W_enc.shape[1] // len(ctx.counts)
        grouped_grad = grad_out.reshape(-1, block_size).index_select(0, pair_order)
        grad_in = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.empty_like(W_enc)
        grouped_grad_in = (
            torch.empty_like(grouped_in) if ctx.needs_input_grad[0] else None
        )
        start = 0
        for expert, count in enumerate(ctx.counts):
            columns = slice(expert * block_size, (expert + 1) * block_size)
            rows = slice(start, start + count)
            if grad_W is not None:
                if count:
                    grad_W[:, columns] = grouped_in[rows].T @ grouped_grad[rows]
                else:
                    grad_W[:, columns] = 0
            if grouped_grad_in is not None and count:
                torch.mm(
                    grouped_grad[rows], W_enc[:, columns].T, out=grouped_grad_in[rows]
                )
            start += count
        if grouped_grad_in is not None:
            n_active = grad_out.shape[1] // block_size
            grad_in = grouped_grad_in.new_zeros(ctx.n_tokens, grouped_in.shape[1])
            grad_in.index_add_(0, pair_order // n_active, grouped_grad_in)
        return grad_in, grad_W, None, None


def selected_expert_pre(
    sae_in: torch.Tensor,  # [tokens, d_in]
    experts: torch.Tensor,  # [tokens, e]
    W_enc: torch.Tensor,  # [d_in, d_sae]
    b_enc: torch.Tensor,  # [d_sae]
    n_experts: int,
    scaling: FeatureScaling | None,
) -> torch.Tensor:
    """Encoder pre-activations of the selected experts' latents only. [tokens, e, m]"""
    raw = _GroupedExpertMatmul.apply(sae_in, W_enc, experts, n_experts)
    pre = raw.view(*experts.shape, -1)
    if scaling is not None:
        # (1 + omega) (W_i x) - omega (a_i . x): Feature Scaling without materialising W^_i
        omega = scaling.omega[experts]  # [tokens, e]
        anchor_dot = (sae_in @ scaling.anchors).gather(1, experts)  # [tokens, e]
        pre = (1 + omega)[..., None] * pre - (omega * anchor_dot)[..., None]
    return pre + b_enc.view(n_experts, -1)[experts]


def candidate_latents(experts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Global latent index of every candidate, slot-major. [tokens, e * m]"""
    offsets = torch.arange(block_size, device=experts.device)
    return (experts[..., None] * block_size + offsets).flatten(1)


def keep_top_k(
    candidates: torch.Tensor,  # [tokens, e * m]
    experts: torch.Tensor,  # [tokens, e]
    k: int,
) -> SparseCode:
    """Global Top-K over all selected experts' candidate activations at once."""
    block_size = candidates.shape[1] // experts.shape[1]
    values, positions = candidates.topk(k, dim=-1, sorted=False)
    slot_experts = experts.gather(1, positions // block_size)
    return SparseCode(values, slot_experts * block_size + positions % block_size)


def decode_sparse(
    code: SparseCode,
    W_dec: torch.Tensor,  # [d_sae, d_in]
    decoder_norms: torch.Tensor | None,  # [d_sae]
) -> torch.Tensor:
    """sum_j f_j W_dec[j] over the kept latents only (no bias). [tokens, d_in]

    With `decoder_norms`, rows act as unit directions: f_j is divided by ||W_dec[j]||.
    """
    weights = code.values
    if decoder_norms is not None:
        weights = weights / decoder_norms[code.latents]
    with torch.autocast(device_type=W_dec.device.type, enabled=False):
        return F.embedding_bag(
            code.latents, W_dec, per_sample_weights=weights.to(W_dec.dtype), mode="sum"
        )


def scatter_to_dense(
    values: torch.Tensor, latents: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """Place per-token values at their latent indices in a zero [tokens, d_sae] tensor."""
    dense = values.new_zeros(values.shape[0], d_sae)
    return dense.scatter(1, latents, values)


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


def load_balancing_loss(routing: Routing, d_in: int) -> torch.Tensor:
    """d_in * N * sum_i f_i P_i (Switch Transformer form; its minimum is d_in).

    f_i is the fraction of tokens whose first choice is expert i (no gradient);
    P_i the mean router probability of expert i, through which the gradient flows.
    """
    n_tokens, n_experts = routing.probs.shape
    first_choice = torch.bincount(routing.experts[:, 0], minlength=n_experts)
    token_share = first_choice.to(routing.probs.dtype) / n_tokens
    return d_in * n_experts * (token_share * routing.probs.mean(dim=0)).sum()


def dead_latent_code(
    candidate_pre: torch.Tensor,  # [tokens, e * m]
    experts: torch.Tensor,  # [tokens, e]
    dead_latents: torch.Tensor,  # [d_sae] bool
    k_aux: int,
) -> SparseCode:
    """The k_aux largest pre-activations among computed dead latents (AuxK's input)."""
    latents = candidate_latents(experts, candidate_pre.shape[1] // experts.shape[1])
    is_dead = dead_latents[latents]
    masked = torch.where(is_dead, candidate_pre, float("-inf"))
    values, positions = masked.topk(min(k_aux, masked.shape[1]), dim=-1, sorted=False)
    values = torch.where(is_dead.gather(1, positions), values, 0.0)
    return SparseCode(values, latents.gather(1, positions))


def init_router(
    d_in: int, n_experts: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Parameter, nn.Parameter]:
    """W_router as nn.Linear's default init (uniform in +-1/sqrt(d_in)); b_router zero."""
    bound = d_in**-0.5
    weight = torch.empty(d_in, n_experts, dtype=dtype, device=device)
    nn.init.uniform_(weight, -bound, bound)
    bias = torch.zeros(n_experts, dtype=dtype, device=device)
    return nn.Parameter(weight), nn.Parameter(bias)
