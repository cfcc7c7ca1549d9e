"""The Scale SAE as the paper writes it (arXiv 2511.05745); Switch SAE is its e = 1 case.

For a token x, with N experts of m latents each (expert i owns latents
[i*m, (i+1)*m)), e experts per token and K latents kept:

1. Route:     p = softmax((x - b_dec) W_router + b_router); S = the e most probable experts.
2. Weigh:     w_i for i in S from p_S (`weigh_experts`; softmax over p_S by default).
3. Scale:     W^_i = (1 + omega_i) W_i - omega_i T mu_i, mu_i the mean of expert i's
              encoder rows, T a learned low-pass map ("Feature Scaling").
4. Encode:    f_i = w_i * ReLU(n_i * (W^_i (x - b_dec) + b_enc,i)) for i in S, where n_i
              are the decoder row norms (rows act as unit directions).
5. Keep:      the K largest of the e*m candidates f (one global Top-K), and decode
              x_hat = sum_j f_j W_dec[j] / ||W_dec[j]|| + b_dec.

Loss: ||x - x_hat||^2 + alpha * d_in * N * sum_i f_i P_i (load balancing, f_i the share
of tokens whose first choice is i, P_i its mean probability) [+ SAELens's AuxK].

`dense_forward` is steps 1-5 in one function, every expert computed for every token
and the unselected ones masked out: the oracle every fast path is tested against.
The SAE classes compute only the selected experts. They call the four functions at
the bottom of this file through `saelens_moe.saes.fast`, which has faster versions
of each under the same names; importing `moe as COMPUTE` in `scale_sae.py` instead
runs the model on these.
"""

from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import torch

from saelens_moe.saes.sparse_gradients import SparseExpertGradients
from saelens_moe.saes.summaries import block_sums

if TYPE_CHECKING:
    from saelens_moe.saes.scale_sae import ScaleSAE, ScaleTrainingSAE

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


class Decoder(NamedTuple):
    """The decoder as one forward pass uses it."""

    weight: torch.Tensor
    """W_dec, to read the kept rows from. [d_sae, d_in]"""
    norms: torch.Tensor | None
    """||W_dec[j]|| when rows act as unit directions, else None. [d_sae]"""
    gradients: SparseExpertGradients | None = None
    """Where W_dec's gradient goes as rows (`weight` is then detached), or None."""


class DenseOutput(NamedTuple):
    """What `dense_forward` computes."""

    feature_acts: torch.Tensor
    """The kept activations in the global latent space. [tokens, d_sae]"""
    sae_out: torch.Tensor
    """The reconstruction x_hat. [tokens, d_in]"""


def dense_forward(sae: "ScaleSAE | ScaleTrainingSAE", x: torch.Tensor) -> DenseOutput:
    """Steps 1-5 for a batch of tokens [tokens, d_in], every expert computed."""
    cfg = sae.cfg
    n_tokens, n_experts = x.shape[0], cfg.n_experts
    sae_in = x - sae.b_dec  # (T, d)
    routing = route(
        sae_in, sae.W_router, sae.b_router, cfg.n_active_experts, cfg.expert_weighting
    )
    raw = (sae_in @ sae.W_enc).view(n_tokens, n_experts, -1)  # (T, N, m)
    scaling = sae.feature_scaling_state()
    omega = anchor_dot = None
    if scaling is not None:
        omega = scaling.omega.expand(n_tokens, -1)  # (T, N)
        anchor_dot = sae_in @ feature_scaling_anchors(sae.W_enc, scaling, n_experts)
    W_dec = sae.W_dec  # (M, d)
    row_norms = W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None
    norms = None if row_norms is None else row_norms.view(n_experts, -1)
    pre = candidate_pre(raw, omega, anchor_dot, sae.b_enc.view(n_experts, -1))
    if norms is not None:
        pre = pre * norms  # decoder rows act as unit directions
    weights = torch.zeros_like(routing.probs).scatter(
        1, routing.experts, routing.weights
    )
    candidates = weighted_candidates(pre, weights).flatten(1)  # (T, M)
    is_selected = torch.zeros_like(weights, dtype=torch.bool).scatter(
        1, routing.experts, True
    )
    is_candidate = is_selected.repeat_interleave(pre.shape[-1], dim=1)  # (T, M)
    values, latents = candidates.masked_fill(~is_candidate, -1).topk(cfg.k, dim=-1)
    feature_acts = torch.zeros_like(candidates).scatter(1, latents, values)  # (T, M)
    if row_norms is not None:
        W_dec = W_dec / row_norms[:, None]  # unit rows
    sae_out = feature_acts @ W_dec + sae.b_dec  # (T, d)
    return DenseOutput(feature_acts, sae_out)


def route(
    sae_in: torch.Tensor,  # [tokens, d_in]
    W_router: torch.Tensor,  # [d_in, n_experts]
    b_router: torch.Tensor,  # [n_experts]
    n_active_experts: int,
    expert_weighting: str,
) -> Routing:
    """Step 1: each token's `n_active_experts` most probable experts, and their weights."""
    probs = (sae_in @ W_router + b_router).softmax(dim=-1)
    top_probs, experts = probs.topk(n_active_experts, dim=-1)
    return Routing(probs, experts, weigh_experts(top_probs, expert_weighting))


def weigh_experts(top_probs: torch.Tensor, expert_weighting: str) -> torch.Tensor:
    """Step 2: the multiplier of each selected expert under one of `EXPERT_WEIGHTINGS`."""
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
    W_enc: torch.Tensor,
    scaling: FeatureScaling,
    n_experts: int,
    sums: torch.Tensor | None = None,  # [d_in, N]: block_sums(W_enc), if known
) -> torch.Tensor:
    """Step 3's a_i = T mu_i, the direction expert i is scaled around, as columns. [d_in, N]"""
    # sum, then divide the small result: mean's backward would write a full-size
    # quotient, sum's is a broadcast view
    if sums is None:
        sums = block_sums(W_enc, n_experts)
    anchors = sums / (W_enc.shape[1] // n_experts)
    if scaling.W_lowpass is not None:
        anchors = scaling.W_lowpass @ anchors
    return anchors


def fold_feature_scaling(
    W_enc: torch.Tensor, scaling: FeatureScaling, n_experts: int
) -> torch.Tensor:
    """Step 3's effective encoder W^, materialised (for export). [d_in, d_sae]"""
    blocks = W_enc.view(W_enc.shape[0], n_experts, -1)
    anchors = feature_scaling_anchors(W_enc, scaling, n_experts)
    omega = scaling.omega[None, :, None]
    folded = (1 + omega) * blocks - omega * anchors[:, :, None]
    return folded.reshape(W_enc.shape[0], -1)


def candidate_pre(
    raw: torch.Tensor,  # [tokens, experts, m]: W_i (x - b_dec)
    omega: torch.Tensor | None,  # [tokens, experts]
    anchor_dot: torch.Tensor | None,  # [tokens, experts]: a_i . (x - b_dec)
    bias: torch.Tensor,  # [(tokens,) experts, m]
) -> torch.Tensor:
    """Step 4's pre-activation W^_i (x - b_dec) + b_enc,i. [tokens, experts, m]

    W^_i x = (1 + omega_i) W_i x - omega_i (a_i . x), so W^_i is never built. The
    decoder norms n_i multiply it next, where SAELens's TopK multiplies them.
    """
    pre = raw
    if omega is not None and anchor_dot is not None:
        pre = (1 + omega)[..., None] * raw - (omega * anchor_dot)[..., None]
    return pre + bias


def weighted_candidates(pre: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Step 4: w_i * ReLU(pre) of each expert's latents. [tokens, experts, m]"""
    return pre.relu() * weights[..., None]


def routing_counts(routing: Routing) -> torch.Tensor:
    """Per expert: first-choice count, selected count, summed probability. [3, n_experts]

    Sums over tokens, so several batches' (or processes') counts add up; float32, so
    counts stay exact in low-precision training. No gradient.
    """
    probs, experts = routing.probs.detach().float(), routing.experts
    counts = probs.new_zeros(2, probs.shape[-1])
    ones = torch.ones_like(experts, dtype=probs.dtype)
    counts[0].index_add_(0, experts[:, 0], ones[:, 0])  # bincount would read the host
    counts[1].index_add_(0, experts.reshape(-1), ones.reshape(-1))
    return torch.cat([counts, probs.sum(dim=0)[None]])


def load_balance_ratio(
    routing: Routing, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """N * sum_i f_i P_i: 1 when balanced, N when one expert takes everything.

    f_i is the share of tokens whose first choice is expert i (no gradient); P_i the
    mean router probability of expert i, through which the gradient flows. `counts`
    (`routing_counts`, e.g. summed over processes) gives f_i over more tokens.
    """
    if counts is None:
        counts = routing_counts(routing)
    first_choice = counts[0]
    share = (first_choice / first_choice.sum()).to(routing.probs.dtype)
    return routing.probs.shape[-1] * (share * routing.probs.mean(dim=0)).sum()


def load_balancing_loss(
    routing: Routing, d_in: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """d_in * N * sum_i f_i P_i (Switch Transformer form; its minimum is d_in)."""
    return d_in * load_balance_ratio(routing, counts)


# The four functions the SAE classes call through `saelens_moe.saes.fast`: here in
# their plain form, every expert computed and every kept row gathered.


def selected_expert_matmuls(
    sae_in: torch.Tensor,  # [tokens, d_in]
    experts: torch.Tensor,  # [tokens, e]
    W_enc: torch.Tensor,  # [d_in, d_sae]
    n_experts: int,
    gradients: SparseExpertGradients | None = None,
) -> torch.Tensor:
    """W_i (x - b_dec) of each selected expert: all experts computed, then picked. [tokens, e, m]

    W_enc's gradient stays dense here (`gradients` is not used).
    """
    del gradients
    block_size = W_enc.shape[1] // n_experts
    all_blocks = (sae_in @ W_enc).view(sae_in.shape[0], n_experts, block_size)
    return all_blocks.gather(1, experts[..., None].expand(-1, -1, block_size))


def decoder_for(
    W_dec: torch.Tensor,
    rescale_acts_by_decoder_norm: bool,
    gradients: SparseExpertGradients | None = None,
) -> Decoder:
    """W_dec with its row norms if rows act as unit directions (its gradient dense:
    `gradients` is not used)."""
    del gradients
    return Decoder(W_dec, W_dec.norm(dim=-1) if rescale_acts_by_decoder_norm else None)


def decode_sparse(code: SparseCode, decoder: Decoder) -> torch.Tensor:
    """sum_j f_j W_dec[j] (/ ||W_dec[j]||) over the kept latents, without b_dec. [tokens, d_in]"""
    weights = code.values
    if decoder.norms is not None:
        weights = weights / decoder.norms[code.latents]
    rows = decoder.weight[code.latents]  # [tokens, k, d_in]
    return (weights[..., None].to(rows.dtype) * rows).sum(dim=1)


def keep_top_k(
    pre: torch.Tensor,  # [tokens, e, m]
    weights: torch.Tensor,  # [tokens, e]
    experts: torch.Tensor,  # [tokens, e]
    k: int,
) -> SparseCode:
    """Step 5's global Top-K over the weighted candidates of all selected experts."""
    candidates = weighted_candidates(pre, weights).flatten(1)  # [tokens, e * m]
    values, positions = candidates.topk(k, dim=-1, sorted=False)
    return SparseCode(values, global_latents(positions, experts, pre.shape[-1]))


def global_latents(
    positions: torch.Tensor,  # [tokens, k], into the slot-major candidates
    experts: torch.Tensor,  # [tokens, e]
    block_size: int,
) -> torch.Tensor:
    """The global latent of each candidate position. [tokens, k]"""
    slot_experts = experts.gather(1, positions // block_size)
    return slot_experts * block_size + positions % block_size
