"""Decoding the kept latents with one embedding bag, and W_dec's gradient written once."""

from typing import Any

import torch
import torch.nn.functional as F

from saelens_moe.saes.fast.autocast import autocast_disabled
from saelens_moe.saes.moe import Decoder, SparseCode


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
    """`moe.decoder_for`, with W_dec's two gradient terms summed in place."""
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
        return F.embedding_bag(
            code.latents,
            weight,
            per_sample_weights=weights.to(weight.dtype),
            mode="sum",
        )
