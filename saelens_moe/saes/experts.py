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

from saelens_moe.saes.expert_matmuls import compiled_expert_matmuls, group_pairs
from saelens_moe.saes.top_k import (
    ExpertEpilogue,
    compiled_expert_top_k,
    top_k_positions,
)

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
    chosen = top_k_positions(probs.detach(), n_active_experts)
    top_probs, slot_order = probs.gather(1, chosen).sort(dim=-1, descending=True)
    experts = chosen.gather(1, slot_order)
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
    anchors = W_enc.view(W_enc.shape[0], n_experts, -1).mean(dim=-1)
    if scaling.W_lowpass is not None:
        anchors = scaling.W_lowpass @ anchors
    return anchors


class _GroupedExpertEncoder(torch.autograd.Function):
    """x @ W_enc[:, block(e)] for each (token, selected expert e) pair.

    Pairs are grouped by expert so each expert's block is one dense matmul over
    only its own tokens. With `with_block_means`, also returns the mean column of
    every expert's block (Feature Scaling's mu_i), taken while the block is in
    cache; backward adds its gradient to each block as it writes it, so the weight
    gradient is written once.
    """

    @staticmethod
    def forward(
        ctx: Any,
        sae_in: torch.Tensor,  # [tokens, d_in]
        W_enc: torch.Tensor,  # [d_in, d_sae]
        experts: torch.Tensor,  # [tokens, e]
        n_experts: int,
        with_block_means: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        n_active = experts.shape[1]
        block_size = W_enc.shape[1] // n_experts
        pair_order, counts, _ = group_pairs(experts, n_experts)
        grouped_in = sae_in.index_select(0, pair_order // n_active)  # [pairs, d_in]
        grouped_out = grouped_in.new_empty(grouped_in.shape[0], block_size)
        block_means = W_enc.new_empty(
            W_enc.shape[0], n_experts if with_block_means else 0
        )
        for expert, rows in _expert_rows(counts):
            block = W_enc[:, expert * block_size : (expert + 1) * block_size]
            if rows.stop > rows.start:
                torch.mm(grouped_in[rows], block, out=grouped_out[rows])
            if with_block_means:  # while the block is in cache
                torch.mean(block, dim=1, out=block_means[:, expert])
        ctx.save_for_backward(grouped_in, W_enc, pair_order)
        ctx.counts = counts
        ctx.n_tokens, ctx.n_active = experts.shape
        pair_out = torch.empty_like(grouped_out).index_copy_(0, pair_order, grouped_out)
        return pair_out.view(sae_in.shape[0], n_active * block_size), block_means

    @staticmethod
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_out: torch.Tensor | None, grad_means: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        grouped_in, W_enc, pair_order = ctx.saved_tensors
        n_experts = len(ctx.counts)
        block_size = W_enc.shape[1] // n_experts
        if grad_out is None:  # only the block means were used
            grouped_grad = grouped_in.new_zeros(pair_order.numel(), block_size)
        else:
            grouped_grad = grad_out.reshape(-1, block_size).index_select(0, pair_order)
        grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.empty_like(W_enc)
            for expert, rows in _expert_rows(ctx.counts):
                block = grad_W[:, expert * block_size : (expert + 1) * block_size]
                if rows.stop > rows.start:
                    torch.mm(grouped_in[rows].T, grouped_grad[rows], out=block)
                else:
                    block.zero_()
                if grad_means is not None:  # d mean / d column = 1 / m
                    block.add_(grad_means[:, expert, None] / block_size)
        grad_in = None
        if ctx.needs_input_grad[0]:
            grouped_grad_in = torch.empty_like(grouped_in)
            for expert, rows in _expert_rows(ctx.counts):
                block = W_enc[:, expert * block_size : (expert + 1) * block_size]
                if rows.stop > rows.start:
                    torch.mm(grouped_grad[rows], block.T, out=grouped_grad_in[rows])
            grad_in = grouped_grad_in.new_zeros(ctx.n_tokens, grouped_in.shape[1])
            grad_in.index_add_(0, pair_order // ctx.n_active, grouped_grad_in)
        return grad_in, grad_W, None, None, None


def _expert_rows(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows in the grouped order) for every expert; empty for no tokens."""
    rows, start = [], 0
    for expert, count in enumerate(counts):
        rows.append((expert, slice(start, start + count)))
        start += count
    return rows


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
    raw, block_means = _GroupedExpertEncoder.apply(
        sae_in, W_enc, experts, n_experts, scaling is not None
    )
    pre = raw.view(*experts.shape, W_enc.shape[1] // n_experts)
    if scaling is not None:
        # (1 + omega) (W_i x) - omega (a_i . x): Feature Scaling without materialising W^_i
        anchors = (
            block_means
            if scaling.W_lowpass is None
            else scaling.W_lowpass @ block_means
        )
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


@torch.no_grad()
def selected_expert_code(
    sae_in: torch.Tensor,  # [tokens, d_in]
    routing: Routing,
    W_enc: torch.Tensor,  # [d_in, d_sae]
    b_enc: torch.Tensor,  # [d_sae]
    scaling: FeatureScaling | None,
    decoder_norms: torch.Tensor | None,  # [d_sae]
    k: int,
) -> SparseCode:
    """The code `keep_top_k` keeps from the selected experts' candidates, without autograd.

    The candidates are what `selected_expert_pre` followed by decoder-norm
    rescaling, ReLU and expert weighting gives. Each expert's matmul covers only
    its own tokens (one compiled loop, `expert_matmuls.py`, or a PyTorch loop); the
    epilogue and the Top-K then run per token in one pass of the compiled kernel
    (`top_k.py`) or, without it, per expert block while it is in cache, followed by
    `keep_top_k`. Like the differentiable path, the experts compute in the weights'
    dtype under autocast.
    """
    with torch.autocast(device_type=W_enc.device.type, enabled=False):
        sae_in = sae_in.to(W_enc.dtype)
        grouped = _grouped_matmuls(sae_in, routing, W_enc)
        epilogue = _expert_epilogue(
            sae_in, routing, W_enc, b_enc, scaling, decoder_norms
        )
        compiled = compiled_expert_top_k(
            grouped.pre, grouped.row_of_pair, routing.experts, epilogue, k
        )
        if compiled is not None:
            return SparseCode(*compiled)
        candidates = _weighted_candidates(grouped, routing.experts, epilogue)
        return keep_top_k(candidates, routing.experts, k)


class _GroupedPre(NamedTuple):
    """The selected experts' matmul outputs, (token, slot) pairs grouped by expert."""

    pre: torch.Tensor
    """x @ W_enc[:, block] of each pair's expert, in grouped order. [pairs, m]"""
    pair_order: torch.Tensor
    """The flat (token, slot) pair in each grouped row. [pairs]"""
    row_of_pair: torch.Tensor
    """The grouped row of each (token, slot) pair. [tokens, e]"""
    expert_rows: list[tuple[int, slice]]
    """(expert, its grouped rows) for every expert with tokens."""


def _grouped_matmuls(
    sae_in: torch.Tensor, routing: Routing, W_enc: torch.Tensor
) -> _GroupedPre:
    """x @ W_enc[:, block] for every (token, selected expert) pair, one matmul per expert."""
    n_tokens, n_active = routing.experts.shape
    n_experts = routing.probs.shape[1]
    pair_order, counts, row_of_pair = group_pairs(routing.experts, n_experts)
    token_of_pair = pair_order // n_active
    expert_rows = [
        (expert, rows)
        for expert, rows in _expert_rows(counts)
        if rows.stop > rows.start
    ]
    pre = compiled_expert_matmuls(sae_in, token_of_pair, counts, W_enc)
    if pre is None:
        block_size = W_enc.shape[1] // n_experts
        pre = _expert_matmul_loop(sae_in, token_of_pair, expert_rows, W_enc, block_size)
    return _GroupedPre(
        pre, pair_order, row_of_pair.view(n_tokens, n_active), expert_rows
    )


def _expert_matmul_loop(
    sae_in: torch.Tensor,
    token_of_pair: torch.Tensor,
    expert_rows: list[tuple[int, slice]],
    W_enc: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """What `compiled_expert_matmuls` computes, in PyTorch. [pairs, m]"""
    pre = sae_in.new_empty(token_of_pair.numel(), block_size)
    # one expert's inputs at a time, in a buffer that stays in cache
    busiest = max((rows.stop - rows.start for _, rows in expert_rows), default=0)
    expert_in = sae_in.new_empty(busiest, sae_in.shape[1])
    for expert, rows in expert_rows:
        inputs = expert_in[: rows.stop - rows.start]
        torch.index_select(sae_in, 0, token_of_pair[rows], out=inputs)
        latents = slice(expert * block_size, (expert + 1) * block_size)
        torch.mm(inputs, W_enc[:, latents], out=pre[rows])
    return pre


def _expert_epilogue(
    sae_in: torch.Tensor,
    routing: Routing,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    scaling: FeatureScaling | None,
    decoder_norms: torch.Tensor | None,
) -> ExpertEpilogue:
    """The per-pair and per-latent factors between the matmuls and the candidates."""
    scale, shift = None, None
    if scaling is not None:  # (1 + omega) (W_i x) - omega (a_i . x)
        anchors = feature_scaling_anchors(W_enc, scaling, routing.probs.shape[1])
        omega = per_selected_expert(scaling.omega, routing.experts)  # [tokens, e]
        anchor_dot = (sae_in @ anchors).gather(1, routing.experts)  # [tokens, e]
        scale, shift = 1 + omega, omega * anchor_dot
    return ExpertEpilogue(scale, shift, routing.weights, b_enc, decoder_norms)


def _weighted_candidates(
    grouped: _GroupedPre, experts: torch.Tensor, epilogue: ExpertEpilogue
) -> torch.Tensor:
    """The kernel's candidates, in PyTorch per expert block. [tokens, e * m], slot-major."""
    block_size = grouped.pre.shape[1]

    def in_grouped_order(per_pair: torch.Tensor) -> torch.Tensor:
        return per_pair.flatten()[grouped.pair_order, None]  # [pairs, 1]

    weights = in_grouped_order(epilogue.weights)
    scaling = None
    if epilogue.scale is not None and epilogue.shift is not None:
        scaling = in_grouped_order(epilogue.scale), in_grouped_order(epilogue.shift)
    for expert, rows in grouped.expert_rows:
        latents = slice(expert * block_size, (expert + 1) * block_size)
        out = grouped.pre[rows]  # in cache from here on
        if scaling is not None:
            out.mul_(scaling[0][rows]).sub_(scaling[1][rows])
        out.add_(epilogue.bias[latents])
        if epilogue.norms is not None:
            out.mul_(epilogue.norms[latents])
        # weights are >= 0, so weighting before the ReLU gives the same values
        out.mul_(weights[rows]).relu_()
    candidates = grouped.pre[grouped.row_of_pair.flatten()]
    return candidates.view(experts.shape[0], experts.shape[1] * block_size)


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
    positions = top_k_positions(candidates.detach(), k)
    return SparseCode(
        candidates.gather(1, positions), _global_latents(positions, experts, block_size)
    )


def keep_weighted_top_k(
    pre: torch.Tensor,  # [tokens, e * m], slot-major
    weights: torch.Tensor,  # [tokens, e]
    experts: torch.Tensor,  # [tokens, e]
    k: int,
) -> SparseCode:
    """`keep_top_k` of relu(pre) times each slot's expert weight, differentiable.

    The candidates are built and ranked without autograd; ReLU and weighting are
    then applied again to the k kept entries only, so backward never runs over
    the full [tokens, e * m] candidates (same values: the same ops on the same entries).
    """
    n_tokens, n_active = experts.shape
    block_size = pre.shape[1] // n_active
    with torch.no_grad():
        blocks = pre.reshape(n_tokens, n_active, block_size).relu()
        candidates = (blocks * weights[..., None]).view(n_tokens, n_active * block_size)
        positions = top_k_positions(candidates, k)
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
    positions = top_k_positions(masked.detach(), min(k_aux, masked.shape[1]))
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
