"""The expert weights' gradients as rows of the latents a batch touched.

A Top-K SAE's loss reaches a latent's encoder column, decoder row and bias only
through the tokens that kept it (or picked it for AuxK): at most tokens * (k + k_aux)
latents per batch, however wide the dictionary. `SparseExpertGradients` collects,
during one backward pass, each expert weight's gradient as (latents, rows), where a
row is W_enc's column, W_dec's row or b_enc's entry of one latent, so nothing of
size d_in * d_sae is written. `saelens_moe.lazy_adam` updates those rows only.

The fast compute functions (`saes.fast`) fill it when the SAE holds one; a
gradient that reaches a weight densely instead (`moe`'s plain versions, a hook,
float64) is turned into rows by `LazyAdam`, so the rows are the same either way.
"""

from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F

from saelens_moe.saes.summaries import DictionarySummaries

EXPERT_ROW_PARAMETERS = ("W_enc", "W_dec", "b_enc")
"""The weights with one row per latent; W_enc's row of a latent is its column."""


class LatentRows(NamedTuple):
    """Some latents' rows of one weight's gradient."""

    latents: torch.Tensor
    """The latents, sorted and unique. [n]"""
    rows: torch.Tensor
    """Their gradient rows. [n, d_in] (or [n] for b_enc)"""


class SparseExpertGradients:
    """Gradient rows of the expert weights, added by the backward pass of one step."""

    def __init__(self) -> None:
        self._parts: defaultdict[str, list[LatentRows]] = defaultdict(list)
        self.summaries = DictionarySummaries()
        """W_enc's block sums and W_dec's row norms, which the sparse step keeps
        current instead of recomputing them from the whole dictionary."""

    def add(self, name: str, latents: torch.Tensor, rows: torch.Tensor) -> None:
        """Add `rows` [n, ...] to the gradient of weight `name` at `latents` [n] (unique)."""
        self._parts[name].append(LatentRows(latents, rows))

    def take(self, name: str) -> LatentRows | None:
        """Weight `name`'s rows added so far, summed per latent; None if none.

        Forgets them, so the next step starts empty.
        """
        parts = self._parts.pop(name, [])
        return sum_parts(parts) if parts else None

    def clear(self) -> None:
        """Forget every row added (the step was abandoned)."""
        self._parts.clear()


def sum_parts(parts: list[LatentRows]) -> LatentRows:
    """Rows given at several sets of latents (each set unique), summed per latent.

    The parts' rows are fresh tensors of a backward pass: the first may be summed into.
    """
    latents = torch.cat([part.latents for part in parts]).unique(sorted=True)
    first, *others = parts
    if torch.equal(first.latents, latents):
        summed = first.rows
    else:
        summed = first.rows.new_zeros(latents.shape[0], *first.rows.shape[1:])
        summed.index_add_(0, torch.searchsorted(latents, first.latents), first.rows)
    for part in others:
        if torch.equal(part.latents, latents):
            summed.add_(part.rows.to(summed.dtype))
        else:
            positions = torch.searchsorted(latents, part.latents)
            summed.index_add_(0, positions, part.rows.to(summed.dtype))
    return LatentRows(latents, summed)


def weighted_row_sums(
    sources: torch.Tensor,  # [n_sources, d]
    source_index: torch.Tensor,  # [n_pairs]
    latents: torch.Tensor,  # [n_pairs]
    weights: torch.Tensor,  # [n_pairs]
) -> LatentRows:
    """For every latent j among `latents`: sum of weight * sources[source] over its
    pairs, as one embedding bag (no [n_pairs, d] tensor). [n_latents, d]"""
    order = latents.argsort()
    unique, counts = torch.unique_consecutive(latents[order], return_counts=True)
    offsets = counts.cumsum(0) - counts
    rows = F.embedding_bag(
        source_index[order],
        sources,
        offsets,
        mode="sum",
        per_sample_weights=weights[order].to(sources.dtype),
    )
    return LatentRows(unique, rows)


class _CollectRows(torch.autograd.Function):
    """The identity on a tensor; its backward also hands one weight's gradient rows,
    computed from the tensor's gradient, to a `SparseExpertGradients`."""

    @staticmethod
    def forward(
        ctx: Any,
        output: torch.Tensor,
        gradients: SparseExpertGradients,
        name: str,
        rows_of: Callable[[torch.Tensor], LatentRows],
    ) -> torch.Tensor:
        ctx.collect = (gradients, name, rows_of)
        return output.view_as(output)

    @staticmethod
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        gradients, name, rows_of = ctx.collect
        gradients.add(name, *rows_of(grad))
        return grad, None, None, None


def _collect_rows(
    output: torch.Tensor,
    gradients: SparseExpertGradients,
    name: str,
    rows_of: Callable[[torch.Tensor], LatentRows],
) -> torch.Tensor:
    """`output`, unchanged; in backward, `rows_of(output's gradient)` goes to `gradients`."""
    collected = _CollectRows.apply(output, gradients, name, rows_of)
    assert isinstance(collected, torch.Tensor)
    return collected


# the backward hands rows to a Python object: eager only (a graph break under compile)
collect_rows: Callable[
    [torch.Tensor, SparseExpertGradients, str, Callable[[torch.Tensor], LatentRows]],
    torch.Tensor,
] = cast(Any, torch.compiler.disable(_collect_rows))


class _NormsWithRows(torch.autograd.Function):
    """Row norms of W_dec whose backward gives `SparseExpertGradients` only the rows
    of latents whose norm received a gradient."""

    @staticmethod
    def forward(
        ctx: Any, W_dec: torch.Tensor, gradients: SparseExpertGradients
    ) -> torch.Tensor:
        norms = gradients.summaries.row_norms(W_dec.detach())
        ctx.save_for_backward(W_dec.detach(), norms)
        ctx.gradients = gradients
        return norms

    @staticmethod
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_norms: torch.Tensor
    ) -> tuple[None, None]:
        W_dec, norms = ctx.saved_tensors
        latents = grad_norms.nonzero().squeeze(1)
        scale = (grad_norms[latents] / norms[latents])[:, None]  # d||w||/dw = w/||w||
        ctx.gradients.add("W_dec", latents, W_dec.index_select(0, latents).mul_(scale))
        return None, None


def _norms_with_rows(
    W_dec: torch.Tensor, gradients: SparseExpertGradients
) -> torch.Tensor:
    """||W_dec[j]|| for every latent; backward adds rows to `gradients`. [d_sae]"""
    norms = _NormsWithRows.apply(W_dec, gradients)
    assert isinstance(norms, torch.Tensor)
    return norms


norms_with_rows: Callable[[torch.Tensor, SparseExpertGradients], torch.Tensor] = cast(
    Any, torch.compiler.disable(_norms_with_rows)
)
