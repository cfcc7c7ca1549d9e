"""Decoding the kept latents with one embedding bag, and W_dec's gradient written once."""

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from saelens_moe.saes.fast.autocast import autocast_disabled
from saelens_moe.saes.moe import Decoder, SparseCode
from saelens_moe.saes.sparse_gradients import (
    LatentRows,
    SparseExpertGradients,
    collect_rows,
    norms_with_rows,
    weighted_row_sums,
)


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


def decoder_for(
    W_dec: torch.Tensor,
    rescale_acts_by_decoder_norm: bool,
    gradients: SparseExpertGradients | None = None,
) -> Decoder:
    """`moe.decoder_for`, with W_dec's two gradient terms summed in place.

    With `gradients`, both terms go there as the rows of the latents they reach.
    """
    if gradients is not None:
        norms = None
        if rescale_acts_by_decoder_norm:
            norms = norms_with_rows(W_dec, gradients)
        return Decoder(W_dec.detach(), norms, gradients)
    if not rescale_acts_by_decoder_norm:
        return Decoder(W_dec, None)
    norms, weight = _DecoderWithNorms.apply(W_dec)
    return Decoder(weight, norms)


def decode_sparse(code: SparseCode, decoder: Decoder) -> torch.Tensor:
    """`moe.decode_sparse` as one embedding bag: no [tokens, k, d_in] rows. [tokens, d_in]"""
    weights = code.values
    if decoder.norms is not None:
        weights = weights / decoder.norms[code.latents]
    weight = decoder.weight
    with autocast_disabled(weight.device.type):
        decoded = F.embedding_bag(
            code.latents,
            weight,
            per_sample_weights=weights.to(weight.dtype),
            mode="sum",
        )
    if decoder.gradients is None:
        return decoded
    rows_of = partial(_decoder_rows, code.latents, weights.detach())
    return collect_rows(decoded, decoder.gradients, "W_dec", rows_of)


def _decoder_rows(
    latents: torch.Tensor,  # [tokens, k]
    weights: torch.Tensor,  # [tokens, k]: f / ||W_dec[j]|| (or f)
    grad_out: torch.Tensor,  # [tokens, d_in]
) -> LatentRows:
    """W_dec's gradient rows of the decoded latents: sum of weight * grad_out over
    the tokens that kept each (latents kept at 0 get no row). [latents, d_in]"""
    tokens, slots = (weights != 0).nonzero(as_tuple=True)
    return weighted_row_sums(
        grad_out.float(), tokens, latents[tokens, slots], weights[tokens, slots]
    )
