"""Slow, obviously-correct Scale SAE implementations that the fast path is tested against.

Both read the parameters of a `ScaleTrainingSAE` (or `ScaleSAE`) and follow the
design document's equations literally: `naive_forward` one token at a time,
`dense_masked_forward` computing every expert for every token and masking (the
authors' formulation).
"""

from typing import NamedTuple

import torch

from saelens_moe.saes.scale_sae import ScaleSAE, ScaleTrainingSAE


class ReferenceOutput(NamedTuple):
    feature_acts: torch.Tensor  # [tokens, d_sae]
    sae_out: torch.Tensor  # [tokens, d_in]


def _expert_weights(top_probs: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "softmax_of_probs":
        return torch.exp(top_probs) / torch.exp(top_probs).sum()
    if rule == "renormalized":
        return top_probs / top_probs.sum()
    if rule == "probs":
        return top_probs
    assert rule == "uniform"
    return torch.ones_like(top_probs)


def _scaled_rows(sae: ScaleSAE | ScaleTrainingSAE, expert: int) -> torch.Tensor:
    """W^_i = a_i + (1 + omega_i) (W_i - a_i), as m rows of length d_in."""
    m = sae.cfg.d_sae // sae.cfg.n_experts
    rows = sae.W_enc[:, expert * m : (expert + 1) * m].T
    if not getattr(sae.cfg, "feature_scaling", False):
        return rows
    assert isinstance(sae, ScaleTrainingSAE)
    anchor = rows.mean(dim=0)
    if sae.cfg.learn_lowpass:
        anchor = sae.W_lowpass @ anchor
    return anchor + (1 + sae.omega[expert]) * (rows - anchor)


def _decode(sae: ScaleSAE | ScaleTrainingSAE, acts: torch.Tensor) -> torch.Tensor:
    W_dec = sae.W_dec
    if sae.cfg.rescale_acts_by_decoder_norm:
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return acts @ W_dec + sae.b_dec


def naive_forward(sae: ScaleSAE | ScaleTrainingSAE, x: torch.Tensor) -> ReferenceOutput:
    """Per-token loop over the design document's forward pass. x: [tokens, d_in]."""
    cfg = sae.cfg
    m = cfg.d_sae // cfg.n_experts
    all_acts = []
    for token in x:
        sae_in = token - sae.b_dec
        probs = torch.softmax(sae_in @ sae.W_router + sae.b_router, dim=-1)
        top_probs, selected = probs.topk(cfg.n_active_experts)
        weights = _expert_weights(top_probs, cfg.expert_weighting)
        candidate_values, candidate_latents = [], []
        for weight, expert in zip(weights, selected.tolist(), strict=True):
            pre = (
                _scaled_rows(sae, expert) @ sae_in
                + sae.b_enc[expert * m : (expert + 1) * m]
            )
            if cfg.rescale_acts_by_decoder_norm:
                pre = pre * sae.W_dec[expert * m : (expert + 1) * m].norm(dim=-1)
            candidate_values.append(weight * torch.relu(pre))
            candidate_latents.append(torch.arange(expert * m, (expert + 1) * m))
        values = torch.cat(candidate_values)
        kept = values.topk(cfg.k).indices
        acts = torch.zeros(cfg.d_sae, dtype=x.dtype)
        acts = acts.index_put((torch.cat(candidate_latents)[kept],), values[kept])
        all_acts.append(acts)
    feature_acts = torch.stack(all_acts)
    return ReferenceOutput(feature_acts, _decode(sae, feature_acts))


def dense_masked_forward(
    sae: ScaleSAE | ScaleTrainingSAE, x: torch.Tensor
) -> ReferenceOutput:
    """Every expert computed for every token, unselected experts masked out."""
    cfg = sae.cfg
    m = cfg.d_sae // cfg.n_experts
    sae_in = x - sae.b_dec
    probs = torch.softmax(sae_in @ sae.W_router + sae.b_router, dim=-1)
    top_probs, selected = probs.topk(cfg.n_active_experts, dim=-1)
    weights = torch.stack([_expert_weights(p, cfg.expert_weighting) for p in top_probs])
    expert_weight = torch.zeros_like(probs).scatter(1, selected, weights)  # [T, N]
    is_selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, selected, True)
    W_hat = torch.cat(
        [_scaled_rows(sae, i) for i in range(cfg.n_experts)]
    )  # [d_sae, d_in]
    pre = sae_in @ W_hat.T + sae.b_enc
    if cfg.rescale_acts_by_decoder_norm:
        pre = pre * sae.W_dec.norm(dim=-1)
    candidates = torch.relu(pre) * expert_weight.repeat_interleave(m, dim=1)
    candidates = candidates.masked_fill(~is_selected.repeat_interleave(m, dim=1), -1.0)
    values, latents = candidates.topk(cfg.k, dim=-1)
    feature_acts = torch.zeros_like(pre).scatter(1, latents, values.clamp(min=0))
    return ReferenceOutput(feature_acts, _decode(sae, feature_acts))
