"""Streaming per-latent statistics: nothing grows with the number of tokens read.

Each batch is encoded by the SAE itself (`encode_sparse` where it exists, else
`encode` a block of tokens at a time) into (token, latent, value) triples of its
nonzero latents, which update:

- `LatentHistograms`: per latent, an exact histogram whose range doubles as needed;
- `TopExamples`: per latent, the best `n` (value, context, position) triples, at
  most one per context, with the tokens and the latent's activations around each;
- `ExpertTokens`: expert load and (token id, expert) routing counts.

State is [d_sae, n_bins] + [d_sae, n, 2 * window + 1] + [n_experts, d_vocab].
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import SAE

from saelens_moe.metrics import expert_layout, route_activations
from saelens_moe.router_health import ExpertLoadCounter
from saelens_moe.saes.moe import SparseCode

DENSE_CHUNK_BYTES = 64 * 2**20
"""Largest [tokens, d_sae] block `encode` returns at once (SAEs without encode_sparse)."""


class Batch(NamedTuple):
    """One batch of contexts: activations at the SAE's hook and their tokens."""

    activations: torch.Tensor
    """Model activations (or bare activation vectors). [contexts, positions, ...]"""
    tokens: torch.Tensor | None
    """Token ids, or None for bare activation vectors. [contexts, positions]"""


class LatentTriples(NamedTuple):
    """A batch's nonzero latents, one entry per (token, latent), on the CPU."""

    token: torch.Tensor
    """Flat token index in the batch, context * positions + position. [nnz]"""
    latent: torch.Tensor
    """Global latent index. [nnz]"""
    value: torch.Tensor
    """Activation (> 0). [nnz]"""


@torch.no_grad()
def sparse_latents(sae: SAE[Any], activations: torch.Tensor) -> LatentTriples:
    """Nonzero latents of activations [tokens, ...]: encode_sparse, else chunked encode."""
    encode_sparse: Callable[[torch.Tensor], SparseCode] | None = getattr(
        sae, "encode_sparse", None
    )
    if encode_sparse is not None:
        code = encode_sparse(activations)
        values, latents = code.values.flatten(1), code.latents.flatten(1)
        tokens = torch.arange(values.shape[0], device=values.device)
        return _positive(tokens.repeat_interleave(values.shape[1]), latents, values)
    chunk = max(1, DENSE_CHUNK_BYTES // (4 * sae.cfg.d_sae))
    parts = [
        _dense_triples(sae.encode(activations[start : start + chunk]), start)
        for start in range(0, activations.shape[0], chunk)
    ]
    return LatentTriples(*(torch.cat(field) for field in zip(*parts, strict=True)))


def _dense_triples(feature_acts: torch.Tensor, offset: int) -> LatentTriples:
    tokens, latents = feature_acts.nonzero(as_tuple=True)
    return _positive(tokens + offset, latents, feature_acts[tokens, latents])


def _positive(
    tokens: torch.Tensor, latents: torch.Tensor, values: torch.Tensor
) -> LatentTriples:
    keep = values.flatten() > 0
    return LatentTriples(
        tokens.flatten()[keep].cpu(),
        latents.flatten()[keep].cpu(),
        values.flatten()[keep].float().cpu(),
    )


class LatentHistograms:
    """Per-latent activation histograms over [0, 2^exponent), widened by doubling.

    When a value reaches past a latent's range, the range doubles as often as
    needed and neighbouring bins merge, so counts stay exact and the values seen
    always reach past the first half of the bins.
    """

    def __init__(self, d_sae: int, n_bins: int) -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.counts = torch.zeros(d_sae, n_bins, dtype=torch.long)
        """Nonzero activations per bin. [d_sae, n_bins]"""
        self.exponent = torch.zeros(d_sae, dtype=torch.long)
        """The bins span [0, 2^exponent). [d_sae]"""
        self.value_sum = torch.zeros(d_sae, dtype=torch.float64)
        """Sum of the nonzero activations. [d_sae]"""

    @property
    def fired(self) -> torch.Tensor:
        """Nonzero activations counted per latent. [d_sae]"""
        return self.counts.sum(-1)

    def add(self, triples: LatentTriples) -> None:
        """Count one batch of nonzero activations."""
        latent, value = triples.latent, triples.value
        batch_max = torch.zeros(self.counts.shape[0])
        batch_max.scatter_reduce_(0, latent, value, "amax")
        touched = (batch_max > 0).nonzero().flatten()
        needed = torch.frexp(batch_max[touched]).exponent.long()  # max < 2^needed
        empty = self.counts[touched].sum(-1) == 0
        current = torch.where(empty, needed, self.exponent[touched])
        self._widen(touched, (needed - current).clamp(min=0))
        self.exponent[touched] = torch.maximum(needed, current)
        scale = self.n_bins / torch.exp2(self.exponent[latent].double())
        bins = (value.double() * scale).long().clamp(0, self.n_bins - 1)
        self.counts.view(-1).index_add_(
            0, latent * self.n_bins + bins, torch.ones_like(bins)
        )
        self.value_sum.index_add_(0, latent, value.double())

    def _widen(self, rows: torch.Tensor, shifts: torch.Tensor) -> None:
        """Double the range of each row `shift` times, merging bins in groups."""
        for shift in shifts.unique().tolist():
            if shift == 0:
                continue
            selected = rows[shifts == shift]
            group = min(2**shift, self.n_bins)
            merged = self.counts[selected].view(len(selected), -1, group).sum(-1)
            widened = torch.zeros(len(selected), self.n_bins, dtype=torch.long)
            widened[:, : merged.shape[1]] = merged
            self.counts[selected] = widened


class TopExamples:
    """Per latent, its `n` highest activations (one per context) with their windows.

    Slots are sorted by value; an empty slot has value 0 and context -1.
    """

    def __init__(self, d_sae: int, n: int, window: int) -> None:
        width = 2 * window + 1
        self.window = window
        self.values = torch.zeros(d_sae, n)
        """Activation at the example's token. [d_sae, n]"""
        self.context = torch.full((d_sae, n), -1, dtype=torch.long)
        """Index of the context (row) in the token stream. [d_sae, n]"""
        self.position = torch.zeros(d_sae, n, dtype=torch.long)
        """Position of the token in its context. [d_sae, n]"""
        self.window_tokens = torch.full((d_sae, n, width), -1, dtype=torch.long)
        """Token ids from position - window on; -1 outside the context. [d_sae, n, width]"""
        self.window_acts = torch.zeros(d_sae, n, width)
        """The latent's activation on those tokens. [d_sae, n, width]"""

    def add(
        self,
        triples: LatentTriples,
        n_positions: int,
        tokens: torch.Tensor | None,  # [contexts, positions]
        first_context: int,
    ) -> None:
        """Merge one batch whose contexts are numbered from `first_context`."""
        # only values above a latent's current n-th best can enter its list
        entering = triples.value > self.values[triples.latent, -1]
        candidates = LatentTriples(*(field[entering] for field in triples))
        best = best_per_latent(candidates, n_positions, self.values.shape[1])
        if best.token.numel() == 0:
            return
        fresh = [
            best.value,
            first_context + best.token // n_positions,
            best.token % n_positions,
            *self._windows(triples, best, n_positions, tokens),
        ]
        self._merge(best.latent, fresh)

    def _windows(
        self,
        triples: LatentTriples,
        best: LatentTriples,
        n_positions: int,
        tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and the latent's activations around each best entry. [b, width]"""
        offsets = torch.arange(-self.window, self.window + 1)
        position = (best.token % n_positions)[:, None] + offsets
        valid = (position >= 0) & (position < n_positions)
        flat = torch.where(valid, best.token[:, None] + offsets, 0)
        d_sae = self.values.shape[0]
        keys, order = (triples.token * d_sae + triples.latent).sort()
        queries = flat * d_sae + best.latent[:, None]
        found = torch.searchsorted(keys, queries).clamp(max=keys.numel() - 1)
        hit = valid & (keys[found] == queries)
        acts = torch.where(hit, triples.value[order[found]], 0.0)
        ids = (
            torch.zeros_like(flat) if tokens is None else tokens.reshape(-1).cpu()[flat]
        )
        return torch.where(valid, ids, -1), acts

    def _merge(self, latent: torch.Tensor, fresh: list[torch.Tensor]) -> None:
        """Keep the n best of each touched latent's old and new entries."""
        touched, row = latent.unique(return_inverse=True)
        rank = _rank_within(latent)
        states = [
            self.values,
            self.context,
            self.position,
            self.window_tokens,
            self.window_acts,
        ]
        joined: list[torch.Tensor] = []
        for state, values in zip(states, fresh, strict=True):
            old = state[touched]
            new = torch.full_like(old, 0 if state is self.values else -1)
            new[row, rank] = values.to(state.dtype)
            joined.append(torch.cat([old, new], dim=1))
        keep = joined[0].topk(self.values.shape[1], dim=1).indices
        for state, merged in zip(states, joined, strict=True):
            index = keep.view(*keep.shape, *[1] * (merged.dim() - 2))
            state[touched] = merged.gather(1, index.expand(-1, -1, *merged.shape[2:]))


def best_per_latent(triples: LatentTriples, n_positions: int, n: int) -> LatentTriples:
    """Each latent's `n` strongest entries, at most one per context, grouped by latent."""
    by_value = triples.value.argsort(descending=True, stable=True)
    latent, token = triples.latent[by_value], triples.token[by_value]
    n_contexts = int(token.max()) // n_positions + 1 if token.numel() else 1
    context_key = latent * n_contexts + token // n_positions
    order = context_key.argsort(stable=True)  # by (latent, context), then value
    key = context_key[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    kept = by_value[order[first]]  # each (latent, context)'s maximum
    kept = kept[triples.value[kept].argsort(descending=True, stable=True)]
    kept = kept[triples.latent[kept].argsort(stable=True)]
    kept = kept[_rank_within(triples.latent[kept]) < n]
    return LatentTriples(triples.token[kept], triples.latent[kept], triples.value[kept])


def _rank_within(groups: torch.Tensor) -> torch.Tensor:
    """Index of each entry within its run of equal values (`groups` sorted)."""
    _, counts = groups.unique_consecutive(return_counts=True)
    starts = counts.cumsum(0) - counts
    return torch.arange(groups.numel()) - starts.repeat_interleave(counts)


class ExpertTokens:
    """Expert load, and how often each token id was routed to each expert."""

    def __init__(self, n_experts: int, d_vocab: int) -> None:
        self.load = ExpertLoadCounter(n_experts)
        self.counts = torch.zeros(n_experts, d_vocab, dtype=torch.long)
        """Selections of each expert, by token id. [n_experts, d_vocab]"""
        self.token_counts = torch.zeros(d_vocab, dtype=torch.long)
        """Occurrences of each token id. [d_vocab]"""

    def add(self, experts: torch.Tensor, tokens: torch.Tensor | None) -> None:
        """Count one batch's selected experts [tokens, e] and token ids [tokens]."""
        self.load.add(experts)
        if tokens is None or self.token_counts.numel() == 0:
            return
        ids = tokens.reshape(-1).cpu()
        flat = (experts.cpu() * self.token_counts.numel() + ids[:, None]).flatten()
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.token_counts.index_add_(0, ids, torch.ones_like(ids))


class Collector:
    """Everything the browser shows about the latents, accumulated batch by batch."""

    def __init__(
        self, sae: SAE[Any], n_examples: int, window: int, n_bins: int, d_vocab: int
    ) -> None:
        d_sae = sae.cfg.d_sae
        self.sae = sae
        self.layout = expert_layout(sae)
        self.histograms = LatentHistograms(d_sae, n_bins)
        self.examples = TopExamples(d_sae, n_examples, window)
        self.experts = (
            ExpertTokens(self.layout.n_experts, d_vocab)
            if self.layout.has_router
            else None
        )
        self.n_tokens = 0
        self.n_contexts = 0
        self.has_tokens = False

    @torch.no_grad()
    def add(self, batch: Batch) -> None:
        """Encode one batch and fold it into every statistic."""
        n_contexts, n_positions = batch.activations.shape[:2]
        flat = batch.activations.flatten(0, 1).to(self.sae.device, self.sae.dtype)
        triples = sparse_latents(self.sae, flat)
        self.histograms.add(triples)
        self.examples.add(triples, n_positions, batch.tokens, self.n_contexts)
        if self.experts is not None:
            self.experts.add(route_activations(self.sae, flat).experts, batch.tokens)
        self.n_tokens += n_contexts * n_positions
        self.n_contexts += n_contexts
        self.has_tokens |= batch.tokens is not None
