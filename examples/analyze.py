"""Which experts and latents a Scale SAE uses, token by token, spliced into the model.

Loads a Scale (or Switch) SAE, attaches it to a HookedSAETransformer at its hook,
runs a few prompts, and shows for each token the experts the router selected
(with their weights) and the strongest latents, in the terminal and as a PNG.

    python examples/analyze.py --release org/repo --sae_id blocks.8.hook_resid_post/scale_e2_k32
    python examples/analyze.py --sae_path output/gpt2-l8-scale-e2-k32 --prompts "Hello world"
    python examples/analyze.py --sae_path output/smoke --smoke   # tiny local model, no network
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sae_lens import SAE, HookedSAETransformer

import saelens_moe  # noqa: F401  (registers "scale" and "switch" before loading)
from saelens_moe.saes.moe import route

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905 Einstein published four papers on physics.",
    "def add(a, b):\n    return a + b",
)


class TokenUse(NamedTuple):
    """What one prompt's tokens used inside the SAE."""

    tokens: list[str]
    """The prompt's tokens as text. [ctx]"""
    experts: torch.Tensor
    """Selected experts per token, most probable first. [ctx, n_active_experts]"""
    expert_weights: torch.Tensor
    """Weight of each selected expert. [ctx, n_active_experts]"""
    latents: torch.Tensor
    """Strongest latents per token. [ctx, top_n]"""
    latent_values: torch.Tensor
    """Their activations. [ctx, top_n]"""


def load_sae(args: argparse.Namespace) -> SAE[Any]:
    if args.sae_path is not None:
        return SAE.load_from_disk(str(args.sae_path), device=args.device)
    return SAE.from_pretrained(args.release, args.sae_id, device=args.device)


def load_model(args: argparse.Namespace, sae: SAE[Any]) -> HookedSAETransformer:
    if args.smoke:
        from saelens_moe.tiny import tiny_model_and_tokens

        tiny, _ = tiny_model_and_tokens(context_size=1, n_rows=1)
        model = HookedSAETransformer(tiny.cfg)
        model.load_state_dict(tiny.state_dict())
        return model.to(args.device)
    kwargs = sae.cfg.metadata.model_from_pretrained_kwargs or {}
    return HookedSAETransformer.from_pretrained_no_processing(
        sae.cfg.metadata.model_name, device=args.device, **kwargs
    )


def prompt_tokens(
    args: argparse.Namespace, model: HookedSAETransformer
) -> list[torch.Tensor]:
    """Token ids of each prompt ([1, ctx]); fixed random ids for the tokenizer-less smoke model."""
    if args.smoke:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(
            1, model.cfg.d_vocab, (len(args.prompts), 8), generator=generator
        )
        return [row[None].to(args.device) for row in ids]
    return [model.to_tokens(prompt) for prompt in args.prompts]


def token_use(
    model: HookedSAETransformer, sae: SAE[Any], tokens: torch.Tensor, top_n: int
) -> TokenUse:
    """Run the model with the SAE spliced in and read routing and latents per token."""
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        sae_in = sae.process_sae_in(cache[f"{hook}.hook_sae_input"][0])
        routing = route(
            sae_in,
            sae.W_router,
            sae.b_router,
            sae.cfg.n_active_experts,
            sae.cfg.expert_weighting,
        )
        values, latents = cache[f"{hook}.hook_sae_acts_post"][0].topk(top_n, dim=-1)
    text = (
        [str(t) for t in tokens[0].tolist()]
        if model.tokenizer is None
        else model.to_str_tokens(tokens[0])
    )
    return TokenUse(
        list(map(str, text)), routing.experts, routing.weights, latents, values
    )


def describe(use: TokenUse, block_size: int) -> str:
    """One line per token: selected experts with weights, then the top latents."""
    lines = []
    for position, token in enumerate(use.tokens):
        experts = ", ".join(
            f"{int(e)} ({float(w):.2f})"
            for e, w in zip(
                use.experts[position], use.expert_weights[position], strict=True
            )
        )
        latents = ", ".join(
            f"{int(j)}@e{int(j) // block_size} {float(v):.2f}"
            for j, v in zip(
                use.latents[position], use.latent_values[position], strict=True
            )
            if v > 0
        )
        lines.append(f"  {token!r:>14}  experts {experts:<24} latents {latents}")
    return "\n".join(lines)


def plot(uses: Sequence[TokenUse], n_experts: int, path: Path) -> None:
    """Heatmap per prompt: tokens x experts, coloured by the selected experts' weights."""
    fig, axes = plt.subplots(
        len(uses),
        1,
        figsize=(max(6, n_experts * 0.25), 2 + 2.5 * len(uses)),
        squeeze=False,
    )
    for index, (use, ax) in enumerate(zip(uses, axes[:, 0], strict=True)):
        weights = torch.zeros(len(use.tokens), n_experts)
        weights.scatter_(1, use.experts.cpu(), use.expert_weights.float().cpu())
        image = ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(use.tokens)), labels=use.tokens, fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"prompt {index}: router weight of the selected experts")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sae_path", type=Path, help="a local SAE folder")
    source.add_argument("--release", help="Hub repo id (with --sae_id)")
    parser.add_argument("--sae_id")
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--top_n", type=int, default=5, help="latents shown per token")
    parser.add_argument("--png", type=Path, default=Path("expert_routing.png"))
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny local model (no network); needs --sae_path",
    )
    args = parser.parse_args(argv)
    if args.release is not None and args.sae_id is None:
        parser.error("--release needs --sae_id")
    return args


def main(argv: Sequence[str] | None = None) -> list[TokenUse]:
    """Print and plot expert and latent use for each prompt; returns what was shown."""
    args = parse_args(argv)
    sae = load_sae(args)
    model = load_model(args, sae)
    uses = [
        token_use(model, sae, tokens, args.top_n)
        for tokens in prompt_tokens(args, model)
    ]
    block_size = sae.cfg.d_sae // sae.cfg.n_experts
    for index, use in enumerate(uses):
        print(f"prompt {index}:\n{describe(use, block_size)}")
    plot(uses, sae.cfg.n_experts, args.png)
    print(f"Saved the routing heatmap to {args.png}")
    return uses


if __name__ == "__main__":
    main()
