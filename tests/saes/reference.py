"""A per-token Scale SAE forward pass, written apart from the package's own oracle.

`naive_forward` reads the parameters of a `ScaleTrainingSAE` (or `ScaleSAE`) and
follows the design document's equations literally, one token at a time; tests hold
`saelens_moe.saes.moe.dense_forward` (every expert computed and masked) to it.
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
