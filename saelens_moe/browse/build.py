"""`browse`: collect the statistics, shape them into the page's data and write it."""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens.saes.sae import SAE
from transformer_lens import HookedRootModule

from saelens_moe.browse.collect import Batch, Collector, ExpertTokens, sparse_latents
from saelens_moe.browse.page import write_page
from saelens_moe.browse.sources import (
    TokenSource,
    TokenText,
    context_size_of,
    hook_activations,
    model_batches,
    prompt_tokens,
    token_text,
    vector_batches,
)
from saelens_moe.loading import load_sae
from saelens_moe.metrics import expert_layout, omega_per_expert, route_activations

DEFAULT_OUTPUT = Path("browser.html")
LOGIT_BLOCK = 256
"""Latents whose [latents, d_vocab] logits are computed at once."""
Page = dict[str, Any]


@dataclass(frozen=True)
class BrowseConfig:
    """What the browser collects and shows.

    Args:
        n_tokens (int): Tokens (or activation vectors) to read from the source.
        context_size (int | None): Tokens per context; None takes the SAE's
            metadata, else 128.
        batch_tokens (int): Tokens per forward pass through the model and the SAE.
        n_examples (int): Top-activating contexts kept per latent (one per context).
        window (int): Tokens shown on each side of an example's activating token.
        n_bins (int): Bins of each latent's activation histogram (a power of two).
        n_logits (int): Top positive and negative logits shown per latent.
        n_prompt_latents (int): Kept latents shown per prompt token.
        n_expert_tokens (int): Tokens listed per expert.
        latents (tuple[int, ...] | None): Latents that get a page (the prompts'
            latents are added); None gives every latent one.
        title (str | None): Page title; None names the architecture and hook.
        note (str | None): A line shown under the title (e.g. what the data is).
    """

    n_tokens: int = 100_000
    context_size: int | None = None
    batch_tokens: int = 4096
    n_examples: int = 10
    window: int = 8
    n_bins: int = 32
    n_logits: int = 10
    n_prompt_latents: int = 8
    n_expert_tokens: int = 20
    latents: tuple[int, ...] | None = None
    title: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        for name in ("n_tokens", "batch_tokens", "n_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")


class Logits(NamedTuple):
    """The strongest tokens of decoder directions through the unembedding."""

    top_values: torch.Tensor
    """Largest logits. [latents, n]"""
    top_tokens: torch.Tensor
    """Their token ids. [latents, n]"""
    bottom_values: torch.Tensor
    """Smallest (most negative) logits. [latents, n]"""
    bottom_tokens: torch.Tensor
    """Their token ids. [latents, n]"""


class BrowserPage(NamedTuple):
    """What `browse` wrote."""

    path: Path
    """The HTML file."""
    data: dict[str, Any]
    """Everything embedded in it except the latent pages and the vocabulary."""
    latents: list[int]
    """Latents with a page."""


def browse(
    sae: SAE[Any] | str | Path,
    output: str | Path = DEFAULT_OUTPUT,
    *,
    model: HookedRootModule | None = None,
    tokens: TokenSource | None = None,
    activations: torch.Tensor | Iterable[torch.Tensor] | None = None,
    prompts: Sequence[str] = (),
    config: BrowseConfig | None = None,
    text: TokenText | None = None,
) -> BrowserPage:
    """Write the feature browser of `sae` to one self-contained HTML file.

    Args:
        sae: A SAELens SAE, or the folder of a saved one.
        output: The HTML file to write.
        model: The model the SAE reads (a HookedTransformer, or SAELens's
            HookedRootModule); needed with `tokens` and `prompts`.
        tokens: Token ids [contexts, positions], a dataset or a SAELens dataset path.
        activations: Instead of a model and tokens, activation vectors [n, d_in]
            (a tensor or an iterable of batches); examples are then sample indices.
        prompts: Texts for the prompt view (for a tokenizer-less model, token ids
            separated by spaces).
        config: What to collect and show.
        text: Token ids to strings; the model's tokenizer by default.
    """
    config = config or BrowseConfig()
    loaded = load_sae(sae) if isinstance(sae, (str, Path)) else sae
    d_vocab = int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or 0)
    collector = Collector(
        loaded,
        config.n_examples,
        config.window,
        config.n_bins,
        0 if activations is not None else d_vocab,
    )
    views = [_prompt(model, loaded, prompt, config) for prompt in prompts]
    for batch in _batches(loaded, model, tokens, activations, config):
        collector.add(batch)
    return write_browser(
        collector,
        output,
        config,
        views,
        unembedding(model, loaded.cfg.d_in),
        text or token_text(model),
    )


def write_browser(
    collector: Collector,
    output: str | Path,
    config: BrowseConfig,
    views: list[dict[str, Any]],
    W_U: torch.Tensor | None,
    text: TokenText,
) -> BrowserPage:
    """Write what `collector` gathered, the prompt views and the logits through W_U."""
    used = {token for view in views for token in view["tokens"]}
    latents = page_latents(collector.sae.cfg.d_sae, config.latents, views)
    data = page_data(collector, config, views, used)
    path = write_page(
        Path(output),
        data,
        latent_pages(collector, latents, W_U, config, used),
        lambda: {"vocab": _vocabulary(used, text)},
    )
    return BrowserPage(path, data, latents)


def _batches(
    sae: SAE[Any],
    model: HookedRootModule | None,
    tokens: TokenSource | None,
    activations: torch.Tensor | Iterable[torch.Tensor] | None,
    config: BrowseConfig,
) -> Iterator[Batch]:
    if activations is not None:
        if tokens is not None:
            raise ValueError("give either activations or tokens, not both")
        return vector_batches(activations, config.n_tokens, config.batch_tokens)
    if model is None or tokens is None:
        raise ValueError("browse needs a model and tokens, or activation vectors")
    context_size = context_size_of(sae, config.context_size)
    return model_batches(
        model, sae, tokens, config.n_tokens, context_size, config.batch_tokens
    )


def _prompt(
    model: HookedRootModule | None, sae: SAE[Any], prompt: str, config: BrowseConfig
) -> dict[str, Any]:
    if model is None:
        raise ValueError("prompts need the model the SAE reads")
    return prompt_view(model, sae, prompt, config.n_prompt_latents)


@torch.no_grad()
def prompt_view(
    model: HookedRootModule, sae: SAE[Any], prompt: str, n_latents: int
) -> dict[str, Any]:
    """Per token of a prompt: its selected experts (with weights) and kept latents."""
    tokens = prompt_tokens(model, sae, prompt)
    activations = hook_activations(model, sae, tokens)[0].to(sae.device, sae.dtype)
    triples = sparse_latents(sae, activations)
    latents: list[list[list[float]]] = []
    for position in range(tokens.shape[1]):
        mine = triples.token == position
        values, order = triples.value[mine].sort(descending=True)
        latents.append(_pairs(triples.latent[mine][order][:n_latents], values))
    experts = None
    if expert_layout(sae).has_router:
        routing = route_activations(sae, activations)
        experts = [
            _pairs(selected, weights)
            for selected, weights in zip(routing.experts, routing.weights, strict=True)
        ]
    return {
        "text": prompt,
        "tokens": tokens[0].tolist(),
        "latents": latents,
        "n_kept": torch.bincount(triples.token, minlength=tokens.shape[1]).tolist(),
        "experts": experts,
    }


def _pairs(ids: torch.Tensor, values: torch.Tensor) -> list[list[float]]:
    """[[id, value], ...] for the ids given (values beyond them are ignored)."""
    ids = ids.cpu()
    return [
        [int(i), v]
        for i, v in zip(ids.tolist(), rounded(values[: len(ids)].cpu()), strict=True)
    ]


# ------------------------------------------------------------------------- logits


@torch.no_grad()
def decoder_logits(
    W_dec: torch.Tensor,  # [latents, d_in]
    W_U: torch.Tensor,  # [d_in, d_vocab]
    n: int,
) -> Logits:
    """Top and bottom n logits of W_dec[j] @ W_U for each row j."""
    logits = W_dec.to(W_U.device, W_U.dtype) @ W_U  # [latents, d_vocab]
    n = min(n, logits.shape[1])
    top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
    return Logits(top.values, top.indices, bottom.values, bottom.indices)


def unembedding(model: HookedRootModule | None, d_in: int) -> torch.Tensor | None:
    """The model's W_U [d_in, d_vocab] when the SAE's rows live in its input space."""
    W_U = getattr(model, "W_U", None)
    if not isinstance(W_U, torch.Tensor) or W_U.shape[0] != d_in:
        return None
    return W_U


# ---------------------------------------------------------------------- page data


def rounded(values: torch.Tensor, digits: int = 3) -> list[Any]:
    """Values rounded to `digits` significant digits, as (nested) lists of floats."""
    v = values.double()
    magnitude = torch.floor(torch.log10(v.abs().clamp(min=1e-30)))
    scale = torch.pow(10.0, digits - 1 - magnitude)
    return torch.where(v == 0, 0.0, torch.round(v * scale) / scale).tolist()


def page_latents(
    d_sae: int, chosen: Sequence[int] | None, views: Sequence[dict[str, Any]]
) -> list[int]:
    """Latents that get a page: `chosen` (all if None) and every prompt's latents."""
    if chosen is None:
        return list(range(d_sae))
    wanted = set(chosen)
    for view in views:
        wanted.update(int(pair[0]) for token in view["latents"] for pair in token)
    outside = sorted(latent for latent in wanted if not 0 <= latent < d_sae)
    if outside:
        raise ValueError(f"latents {outside} are outside [0, {d_sae})")
    return sorted(wanted)


def page_data(
    collector: Collector,
    config: BrowseConfig,
    views: list[dict[str, Any]],
    used: set[int],
) -> dict[str, Any]:
    """Everything but the latent pages and the vocabulary; adds token ids to `used`."""
    fired = collector.histograms.fired
    return {
        "meta": summary(collector, config),
        "fired": fired.tolist(),
        "mean": rounded(collector.histograms.value_sum / fired.clamp(min=1)),
        "max": rounded(collector.examples.values[:, 0]),
        "experts": expert_data(collector, config.n_expert_tokens, used),
        "prompts": views,
    }


def summary(collector: Collector, config: BrowseConfig) -> dict[str, Any]:
    """What the page's header shows about the SAE and the data."""
    cfg, layout = collector.sae.cfg, collector.layout
    hook = cfg.metadata.hook_name
    return {
        "title": config.title
        or f"{cfg.architecture()} SAE" + (f" · {hook}" if hook else ""),
        "note": config.note,
        "architecture": cfg.architecture(),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": getattr(cfg, "k", None),
        "n_experts": layout.n_experts if layout.has_router else None,
        "n_active_experts": layout.n_active_experts if layout.has_router else None,
        "hook_name": hook,
        "model_name": cfg.metadata.model_name,
        "n_tokens": collector.n_tokens,
        "n_contexts": collector.n_contexts,
        "has_tokens": collector.has_tokens,
        "n_bins": collector.histograms.n_bins,
    }


def expert_data(
    collector: Collector, n_tokens: int, used: set[int]
) -> dict[str, Any] | None:
    """Per expert: load, omega and the tokens routed to it (None for dense SAEs)."""
    experts, layout = collector.experts, collector.layout
    if experts is None:
        return None
    load = experts.load.result()
    return {
        "latents_per_expert": layout.latents_per_expert,
        "selected_share": rounded(torch.tensor(load.selected_share)),
        "first_choice_share": rounded(torch.tensor(load.first_choice_share)),
        "selected_entropy": load.selected_entropy,
        "omega": omega_per_expert(collector.sae),
        "tokens": [
            routed_tokens(experts, expert, n_tokens, used)
            for expert in range(layout.n_experts)
        ],
    }


def routed_tokens(
    experts: ExpertTokens, expert: int, n: int, used: set[int]
) -> dict[str, list[list[float]]]:
    """The expert's most routed tokens and its most specific ones (by share).

    Rows are [token id, times routed here, share of the token's occurrences];
    "specific" only counts tokens seen at least max(5, most frequent / 1000) times.
    """
    counts, totals = experts.counts[expert], experts.token_counts
    if totals.numel() == 0:
        return {"frequent": [], "specific": []}
    share = counts.double() / totals.clamp(min=1)
    common = totals >= max(5, int(totals.max()) // 1000)
    out: dict[str, list[list[float]]] = {}
    for name, score in (
        ("frequent", counts.double()),
        ("specific", torch.where(common, share, 0.0)),
    ):
        top = score.topk(min(n, score.numel())).indices
        top = top[score[top] > 0]
        used.update(top.tolist())
        out[name] = [
            [t, c, s]
            for t, c, s in zip(
                top.tolist(), counts[top].tolist(), rounded(share[top]), strict=True
            )
        ]
    return out


def latent_pages(
    collector: Collector,
    latents: Sequence[int],
    W_U: torch.Tensor | None,
    config: BrowseConfig,
    used: set[int],
) -> Iterator[tuple[int, Page]]:
    """The page of each latent, a block at a time; adds the token ids it shows to `used`."""
    for start in range(0, len(latents), LOGIT_BLOCK):
        block = torch.tensor(latents[start : start + LOGIT_BLOCK], dtype=torch.long)
        pages = block_pages(collector, block, used)
        if W_U is not None:
            W_dec = collector.sae.W_dec[block.to(collector.sae.device)]
            logits = decoder_logits(W_dec, W_U, config.n_logits)
            for page, top, bottom in zip(
                pages, *_logit_rows(logits, used), strict=True
            ):
                page["logits"] = {"top": top, "bottom": bottom}
        yield from zip(block.tolist(), pages, strict=True)


def block_pages(
    collector: Collector, block: torch.Tensor, used: set[int]
) -> list[Page]:
    """Histogram and top examples of each latent in `block` (tensors read once)."""
    histograms, examples = collector.histograms, collector.examples
    tops = torch.exp2(histograms.exponent[block].double()).tolist()
    values = rounded(examples.values[block])
    contexts = examples.context[block].tolist()
    positions = examples.position[block].tolist()
    tokens = examples.window_tokens[block].tolist()
    acts = rounded(examples.window_acts[block])
    pages: list[Page] = []
    for row, counts in enumerate(histograms.counts[block].tolist()):
        while counts and counts[-1] == 0:
            counts.pop()
        found = [slot for slot, context in enumerate(contexts[row]) if context >= 0]
        example_rows = [
            _example(
                values[row][slot],
                contexts[row][slot],
                positions[row][slot],
                tokens[row][slot] if collector.has_tokens else None,
                acts[row][slot],
                used,
            )
            for slot in found
        ]
        pages.append({"hist": counts, "hist_top": tops[row], "examples": example_rows})
    return pages


def _example(
    value: float,
    context: int,
    position: int,
    tokens: list[int] | None,
    acts: list[float],
    used: set[int],
) -> dict[str, Any]:
    """One top example; its window trimmed to the tokens inside the context."""
    example: dict[str, Any] = {"context": context, "position": position, "value": value}
    if tokens is not None:
        inside = [index for index, token in enumerate(tokens) if token >= 0]
        first, last = inside[0], inside[-1] + 1
        example["tokens"] = tokens[first:last]
        example["acts"] = [act or 0 for act in acts[first:last]]  # "0", not "0.0"
        example["centre"] = len(tokens) // 2 - first
        used.update(example["tokens"])
    return example


def _logit_rows(
    logits: Logits, used: set[int]
) -> tuple[list[list[list[float]]], list[list[list[float]]]]:
    """Per latent, [[token, logit], ...] for the top and the bottom logits."""
    rows: list[list[list[list[float]]]] = []
    for tokens, values in (
        (logits.top_tokens, logits.top_values),
        (logits.bottom_tokens, logits.bottom_values),
    ):
        ids = tokens.cpu().tolist()
        for row in ids:
            used.update(row)
        rows.append(
            [
                [[t, v] for t, v in zip(i, r, strict=True)]
                for i, r in zip(ids, rounded(values.cpu()), strict=True)
            ]
        )
    return rows[0], rows[1]


def _vocabulary(used: set[int], text: TokenText) -> dict[str, str]:
    ids = sorted(used)
    return dict(zip(map(str, ids), text(ids), strict=True))
