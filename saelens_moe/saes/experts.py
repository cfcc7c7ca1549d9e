"""Routing and expert compute shared by the Scale SAE and Switch SAE architectures.

Only the experts a token is routed to are computed: tokens are grouped by expert,
each expert's encoder block multiplies only its own tokens, the global Top-K runs
over those candidates, and decoding reads only the K kept decoder rows.
See arXiv 2511.05745 (Scale SAE) and arXiv 2410.08201 (Switch SAE).
"""

import warnings
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from saelens_moe.saes.expert_matmuls import selected_expert_matmuls

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
    """Per-expert Feature Scaling: W^_i = (1 + omega_i) W_i - omega_i a_i, a_i = T mu_i."""

    omega: torch.Tensor
    """Scaling strength per expert. [n_experts]"""
    W_lowpass: torch.Tensor | None
    """The low-pass map T, or None for the identity. [d_in, d_in]"""


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
    decoder: "Decoder"
    """The decoder (and its row norms) the encoding was made against."""


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


def fold_feature_scaling(
    W_enc: torch.Tensor, scaling: FeatureScaling, n_experts: int
) -> torch.Tensor:
    """The effective encoder (1 + omega_i) W_i - omega_i a_i, materialised. [d_in, d_sae]"""
    blocks = W_enc.view(W_enc.shape[0], n_experts, -1)
    anchors = feature_scaling_anchors(W_enc, scaling, n_experts)
    omega = scaling.omega[None, :, None]
    folded = (1 + omega) * blocks - omega * anchors[:, :, None]
    return folded.reshape(W_enc.shape[0], -1)


def feature_scaling_anchors(
    W_enc: torch.Tensor, scaling: FeatureScaling, n_experts: int
) -> torch.Tensor:
    """a_i = T mu_i, the direction expert i is scaled around, as columns. [d_in, n_experts]"""
    blocks = W_enc.view(W_enc.shape[0], n_experts, -1)
    # sum, then divide the small result: mean's backward would write a full-size
    # quotient, sum's is a broadcast view
    anchors = blocks.sum(dim=-1) / blocks.shape[-1]
    if scaling.W_lowpass is not None:
        anchors = scaling.W_lowpass @ anchors
    return anchors


class Decoder(NamedTuple):
    """The decoder as one forward pass uses it."""

    weight: torch.Tensor
    """W_dec, to read the kept rows from. [d_sae, d_in]"""
    norms: torch.Tensor | None
    """||W_dec[j]|| when rows act as unit directions, else None. [d_sae]"""


class _DecoderWithNorms(torch.autograd.Function):
    """Row norms of W_dec plus an alias of W_dec to decode with.

    Both uses send their gradient back here, so the norm term is added into the
    decoding gradient in place: W_dec's gradient is written once, not summed
    from two full-size tensors.
    """

    @staticmethod
    def forward(ctx: Any, W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        norms = W_dec.norm(dim=-1)
        ctx.save_for_backward(W_dec, norms)
        return norms, W_dec.view_as(W_dec)

    @staticmethod
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_norms: torch.Tensor | None, grad_weight: torch.Tensor | None
    ) -> torch.Tensor | None:
        W_dec, norms = ctx.saved_tensors
        if grad_norms is None:
            return grad_weight
        norm_term = (grad_norms / norms)[:, None]  # d||w|| / dw = w / ||w||
        if grad_weight is None:
            return W_dec * norm_term
        # grad_weight is the fresh tensor embedding_bag's backward made; reuse it
        return grad_weight.addcmul_(W_dec, norm_term)


def decoder_for(W_dec: torch.Tensor, rescale_acts_by_decoder_norm: bool) -> Decoder:
    """W_dec ready for one forward pass, with its row norms if rows act as unit directions."""
    if not rescale_acts_by_decoder_norm:
        return Decoder(W_dec, None)
    norms, weight = _DecoderWithNorms.apply(W_dec)
    return Decoder(weight, norms)


def selected_expert_pre(
    sae_in: torch.Tensor,  # [tokens, d_in]
    experts: torch.Tensor,  # [tokens, e]
    W_enc: torch.Tensor,  # [d_in, d_sae]
    b_enc: torch.Tensor,  # [d_sae]
    n_experts: int,
    scaling: FeatureScaling | None,
) -> torch.Tensor:
    """Encoder pre-activations of the selected experts' latents only. [tokens, e, m]"""
    pre = selected_expert_matmuls(sae_in, experts, W_enc, n_experts)
    if scaling is not None:
        # (1 + omega) (W_i x) - omega (a_i . x): Feature Scaling without materialising W^_i
        anchors = feature_scaling_anchors(W_enc, scaling, n_experts)
        omega = per_selected_expert(scaling.omega, experts)  # [tokens, e]
        anchor_dot = (sae_in @ anchors).gather(1, experts)  # [tokens, e]
        pre = (1 + omega)[..., None] * pre - (omega * anchor_dot)[..., None]
    return pre + per_selected_expert(b_enc.view(n_experts, -1), experts)


def per_selected_expert(
    per_expert: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """The rows of `per_expert` [n_experts, ...] of each selected expert. [tokens, e, ...]

    As an index_select, whose backward is an index_add: advanced indexing's
    backward (an accumulating index_put) took 11 ms of a training step per use at
    [4096, 2] pairs of [64, 384] rows, against 1 ms.
    """
    picked = per_expert.index_select(0, experts.reshape(-1))
    return picked.view(*experts.shape, *per_expert.shape[1:])


def candidate_latents(experts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Global latent index of every candidate, slot-major. [tokens, e * m]"""
    offsets = torch.arange(block_size, device=experts.device)
    return (experts[..., None] * block_size + offsets).flatten(1)


def keep_weighted_top_k(
    pre: torch.Tensor,  # [tokens, e * m], slot-major
    weights: torch.Tensor,  # [tokens, e]
    experts: torch.Tensor,  # [tokens, e]
    k: int,
) -> SparseCode:
    """Global Top-K of relu(pre) times each slot's expert weight, over all selected experts.

    The candidates are built and ranked without autograd; ReLU and weighting are
    then applied again to the k kept entries only, so backward never runs over
    the full [tokens, e * m] candidates (same values: the same ops on the same entries).
    """
    n_tokens, n_active = experts.shape
    block_size = pre.shape[1] // n_active
    with torch.no_grad():
        blocks = pre.reshape(n_tokens, n_active, block_size).relu()
        candidates = (blocks * weights[..., None]).view(n_tokens, n_active * block_size)
        positions = candidates.topk(k, dim=-1, sorted=False).indices
    values = pre.gather(1, positions).relu() * weights.gather(
        1, positions // block_size
    )
    return SparseCode(values, _global_latents(positions, experts, block_size))


def _global_latents(
    positions: torch.Tensor,  # [tokens, k], into the slot-major candidates
    experts: torch.Tensor,  # [tokens, e]
    block_size: int,
) -> torch.Tensor:
    """The global latent of each candidate position. [tokens, k]"""
    slot_experts = experts.gather(1, positions // block_size)
    return slot_experts * block_size + positions % block_size


def decode_sparse(code: SparseCode, decoder: Decoder) -> torch.Tensor:
    """sum_j f_j W_dec[j] over the kept latents only (no bias). [tokens, d_in]

    With decoder norms, rows act as unit directions: f_j is divided by ||W_dec[j]||.
    """
    weights = code.values
    if decoder.norms is not None:
        weights = weights / decoder.norms[code.latents]
    weight = decoder.weight
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return F.embedding_bag(
            code.latents,
            weight,
            per_sample_weights=weights.to(weight.dtype),
            mode="sum",
        )


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


def load_balancing_loss(routing: Routing, d_in: int) -> torch.Tensor:
    """d_in * N * sum_i f_i P_i (Switch Transformer form; its minimum is d_in).

    f_i is the fraction of tokens whose first choice is expert i (no gradient);
    P_i the mean router probability of expert i, through which the gradient flows.
    """
    probs = routing.probs
    n_tokens, n_experts = probs.shape
    first_choice = routing.experts[:, 0]
    counts = probs.new_zeros(n_experts).index_add_(  # bincount would read the host
        0, first_choice, torch.ones_like(first_choice, dtype=probs.dtype)
    )
    token_share = counts.detach() / n_tokens
    return d_in * n_experts * (token_share * probs.mean(dim=0)).sum()


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
    positions = masked.detach().topk(min(k_aux, masked.shape[1]), sorted=False).indices
    values = torch.where(is_dead.gather(1, positions), masked.gather(1, positions), 0.0)
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
