"""Where the browser's activations and token strings come from.

Tokens come from a tensor of ids, or a dataset read through SAELens's
`ActivationsStore` (which tokenizes text and packs contexts as training did);
activations are read at the SAE's hook with `run_with_cache`, stopping after the
hook's layer. Bare activation vectors (no model) are contexts of one position.
"""

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset
from sae_lens.saes.sae import SAE
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import extract_layer_from_tlens_hook_name
from transformer_lens import HookedRootModule, HookedTransformer

from saelens_moe.browse.collect import Batch
from saelens_moe.metrics import activation_batches

DEFAULT_CONTEXT_SIZE = 128
TokenSource = torch.Tensor | Dataset | str
"""Token ids [contexts, positions], a tokenized or text dataset, or a SAELens dataset path."""
TokenText = Callable[[Sequence[int]], list[str]]
"""Token ids to the strings shown for them."""
SYLLABLES = ("ka", "lo", "mi", "te", "ru", "sa", "po", "ne", "di", "vu", "ba", "go")


@torch.no_grad()
def hook_activations(
    model: HookedRootModule, sae: SAE[Any], tokens: torch.Tensor
) -> torch.Tensor:
    """The model's activations at the SAE's hook. [contexts, positions, ...]"""
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("the SAE's cfg.metadata names no hook_name to read from")
    kwargs: dict[str, Any] = {}
    layer = extract_layer_from_tlens_hook_name(hook)
    if isinstance(model, HookedTransformer) and layer is not None:
        kwargs["stop_at_layer"] = layer + 1
    _, cache = model.run_with_cache(tokens, names_filter=[hook], **kwargs)
    activations: torch.Tensor = cache[hook]
    head = sae.cfg.metadata.hook_head_index
    return activations if head is None else activations[:, :, head]


def context_size_of(sae: SAE[Any], context_size: int | None) -> int:
    """`context_size`, else the SAE's metadata's, else DEFAULT_CONTEXT_SIZE."""
    size = context_size or sae.cfg.metadata.context_size
    return int(size) if size else DEFAULT_CONTEXT_SIZE


def token_rows(
    model: HookedRootModule,
    sae: SAE[Any],
    source: TokenSource,
    context_size: int,
    n_contexts: int,
    rows_per_batch: int,
) -> Iterator[torch.Tensor]:
    """Batches of token rows [rows, context_size]: at most `n_contexts` rows, once each."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(
                f"tokens must be [contexts, positions], got {source.shape}"
            )
        yield from source[:n_contexts, :context_size].split(rows_per_batch)
        return
    with warnings.catch_warnings():  # SAELens warns of epochs; one pass is read
        warnings.filterwarnings("ignore", message=".*fewer samples.*")
        store = ActivationsStore.from_sae(
            model,
            sae,
            dataset=source,
            context_size=context_size,
            store_batch_size_prompts=rows_per_batch,
            total_tokens=n_contexts * context_size,
            device=str(sae.device),
        )
    for start in range(0, n_contexts, rows_per_batch):
        size = min(rows_per_batch, n_contexts - start)
        try:
            with warnings.catch_warnings():  # SAELens copies tensors with torch.tensor
                warnings.filterwarnings("ignore", message="To copy construct")
                rows = store.get_batch_tokens(size, raise_at_epoch_end=True)
        except StopIteration:  # the dataset ran out
            return
        yield rows


def model_batches(
    model: HookedRootModule,
    sae: SAE[Any],
    tokens: TokenSource,
    n_tokens: int,
    context_size: int,
    batch_tokens: int,
) -> Iterator[Batch]:
    """Activations at the SAE's hook for about `n_tokens` tokens, a batch at a time."""
    n_contexts = math.ceil(n_tokens / context_size)
    rows_per_batch = max(1, batch_tokens // context_size)
    for rows in token_rows(
        model, sae, tokens, context_size, n_contexts, rows_per_batch
    ):
        yield Batch(hook_activations(model, sae, rows), rows)


def vector_batches(
    activations: torch.Tensor | Iterable[torch.Tensor], n_vectors: int, batch_size: int
) -> Iterator[Batch]:
    """Up to `n_vectors` bare activation vectors [n, d_in], each a one-position context."""
    remaining = n_vectors
    for batch in activation_batches(activations, n_vectors, batch_size):
        if remaining <= 0:
            return
        vectors = batch.reshape(-1, batch.shape[-1])[:remaining]
        remaining -= vectors.shape[0]
        yield Batch(vectors[:, None], None)


def token_text(model: HookedRootModule | None) -> TokenText:
    """The model tokenizer's string for each token id, else "#<id>"."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return lambda ids: [f"#{i}" for i in ids]
    return lambda ids: [str(tokenizer.decode([i])) for i in ids]


def pseudo_words(ids: Sequence[int]) -> list[str]:
    """Readable stand-in strings for a tokenizer-less model's ids: " kalo" for 12."""
    return [" " + _pseudo_word(token) for token in ids]


def _pseudo_word(token: int) -> str:
    """The id's base-12 digits as syllables, least significant first."""
    high, digit = divmod(token, len(SYLLABLES))
    return SYLLABLES[digit] + (_pseudo_word(high) if high else "")


def prompt_tokens(model: HookedRootModule, sae: SAE[Any], prompt: str) -> torch.Tensor:
    """A prompt's token ids [1, positions]; space-separated ids for tokenizer-less models."""
    if getattr(model, "tokenizer", None) is None:
        try:
            return torch.tensor([[int(part) for part in prompt.split()]])
        except ValueError:
            raise ValueError(
                "the model has no tokenizer: give prompts as token ids separated by "
                f"spaces, got {prompt!r}"
            ) from None
    prepend_bos = sae.cfg.metadata.prepend_bos
    to_tokens: Callable[..., torch.Tensor] = getattr(model, "to_tokens")  # noqa: B009
    return to_tokens(prompt, prepend_bos=True if prepend_bos is None else prepend_bos)
