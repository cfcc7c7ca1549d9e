"""Whole-dictionary summaries a step needs, kept current by the sparse step.

Feature Scaling needs each expert's column sum of W_enc, and the decoder-norm
rescaling needs every row norm of W_dec (a step that touches every expert uses them
all). Recomputed each step they cost one more read of each matrix, as much memory
traffic as the routed encoder itself. Lazy Adam changes only the touched latents'
rows, so it adds its own update into the sums and recomputes the norms of those rows
(`DictionarySummaries`); the next forward then reads nothing else of either matrix.

A summary is trusted only while its weight is the tensor it was computed from, at
the version lazy Adam left it (`Tensor._version` counts in-place writes; a loaded
state dict, a fold or any other optimizer changes it), and at most `REFRESH_STEPS`
updates after its last full computation, which bounds the rounding the added updates
accumulate (and any write through `.data`, which the version does not see). A
checkpoint drops both (`MoESAETrainer.continue_as_resumed`): a run resumed from it
recomputes them, and so does the run that wrote it, so the two stay identical.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import torch

REFRESH_STEPS = 100
"""Updates after which a summary is computed afresh from its whole weight."""

RowUpdateHook = Callable[[torch.Tensor, torch.Tensor], None]
"""Called as hook(latents [n], added [n, ...]) after lazy Adam added `added` to a
weight's rows of `latents` (the weight by latent)."""


def block_sums(W_enc: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each expert's columns of W_enc summed. [d_in, N]

    Summed along the contiguous axis: over an encoder stored by latent
    (`saelens_moe.lazy_adam`) a sum across the strided one is several times slower.
    """
    d_in = W_enc.shape[0]
    if W_enc.t().is_contiguous() and not W_enc.is_contiguous():
        return W_enc.t().view(n_experts, -1, d_in).sum(dim=1).t()
    return W_enc.view(d_in, n_experts, -1).sum(dim=-1)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _eager(method: _Method) -> _Method:
    """`method` run eagerly under torch.compile, so whether a kept value is current
    is decided at every call (torch.compiler.disable's typing loses the signature)."""
    return cast(_Method, torch.compiler.disable(method))


class _Kept(NamedTuple):
    """One summary and the state of the weight it describes."""

    value: torch.Tensor
    weight_key: tuple[int, int]
    """(data pointer, version) of the weight when `value` was last made current."""
    updates: int
    """Updates added since `value` was computed from the whole weight."""


class DictionarySummaries:
    """W_enc's per-expert column sums and W_dec's row norms, kept between steps."""

    def __init__(self) -> None:
        self._sums: _Kept | None = None
        self._norms: _Kept | None = None

    @_eager
    def block_sums(self, W_enc: torch.Tensor, n_experts: int) -> torch.Tensor:
        """`block_sums(W_enc, n_experts)`, from the kept value when it is current."""
        kept = _current(self._sums, W_enc)
        if kept is None or kept.value.shape[1] != n_experts:
            kept = self._sums = _Kept(block_sums(W_enc, n_experts), _key(W_enc), 0)
        return kept.value.clone()

    @_eager
    def row_norms(self, W_dec: torch.Tensor) -> torch.Tensor:
        """`W_dec.norm(dim=-1)`, from the kept value when it is current. [d_sae]"""
        kept = _current(self._norms, W_dec)
        if kept is None:
            kept = self._norms = _Kept(W_dec.norm(dim=-1), _key(W_dec), 0)
        return kept.value.clone()

    def encoder_updater(self, W_enc: torch.Tensor) -> RowUpdateHook | None:
        """What lazy Adam calls with each block of rows it adds to `W_enc` (stored
        by latent), so the kept sums follow; None (and none kept) if not current."""
        kept = self._sums = _current(self._sums, W_enc)
        if kept is None:
            return None
        sums_by_expert = kept.value.t()  # [N, d_in], a view of the kept value
        latents_per_expert = W_enc.shape[1] // sums_by_expert.shape[0]

        def add(latents: torch.Tensor, added: torch.Tensor) -> None:
            sums_by_expert.index_add_(0, latents // latents_per_expert, added)

        return add

    def decoder_updater(self, W_dec: torch.Tensor) -> RowUpdateHook | None:
        """What lazy Adam calls with each block of rows it adds to `W_dec`, so the
        kept norms follow; None (and none kept) if not current."""
        kept = self._norms = _current(self._norms, W_dec)
        if kept is None:
            return None
        norms = kept.value

        def renorm(latents: torch.Tensor, added: torch.Tensor) -> None:
            del added  # the norm of the updated row, as a full pass computes it
            norms.index_copy_(0, latents, W_dec.index_select(0, latents).norm(dim=-1))

        return renorm

    def updated(self, W_enc: torch.Tensor, W_dec: torch.Tensor) -> None:
        """Lazy Adam has updated both weights through the updaters: the kept values
        are current again, one update older."""
        if self._sums is not None:
            self._sums = _advanced(self._sums, W_enc)
        if self._norms is not None:
            self._norms = _advanced(self._norms, W_dec)

    def forget(self) -> None:
        """Drop both summaries: the next forward computes them from the weights."""
        self._sums = self._norms = None


def _key(weight: torch.Tensor) -> tuple[int, int]:
    return (weight.data_ptr(), weight._version)


def _current(kept: _Kept | None, weight: torch.Tensor) -> _Kept | None:
    """`kept` if it describes `weight` as it is now and is due no refresh."""
    if kept is None or kept.weight_key != _key(weight):
        return None
    return kept if kept.updates < REFRESH_STEPS else None


def _advanced(kept: _Kept, weight: torch.Tensor) -> _Kept:
    return _Kept(kept.value, _key(weight), kept.updates + 1)
