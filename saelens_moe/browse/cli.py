"""`python -m saelens_moe.browse`: the feature browser from the command line."""

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.load_model import load_model
from sae_lens.saes.sae import SAE, SAEMetadata
from transformer_lens import HookedRootModule

from saelens_moe.browse.build import DEFAULT_OUTPUT, BrowseConfig, BrowserPage, browse
from saelens_moe.browse.sources import TokenSource, context_size_of, pseudo_words
from saelens_moe.loading import load_sae

SMOKE_NOTE = (
    "Smoke run: a tiny randomly initialised model and Scale SAE on random tokens, "
    "shown as stand-in pseudo-words; the patterns mean nothing."
)


def parse_latents(spec: str) -> tuple[int, ...]:
    """'0-9,42' -> (0, 1, ..., 9, 42)."""
    latents: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        latents.extend(range(int(first), int(last or first) + 1))
    return tuple(latents)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options, named as SAELens names them."""
    parser = argparse.ArgumentParser(
        prog="python -m saelens_moe.browse",
        description="Write a self-contained HTML feature browser for an SAELens SAE.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sae_path", type=Path, help="a saved SAE folder")
    source.add_argument(
        "--release", help="Hub repo id or SAELens release (with --sae_id)"
    )
    parser.add_argument("--sae_id", help="SAE id within the release")
    parser.add_argument("--model_name", help="default: the SAE's metadata")
    parser.add_argument(
        "--dataset_path",
        help="dataset to read tokens from (default: the SAE's metadata)",
    )
    defaults = BrowseConfig()
    parser.add_argument("--n_tokens", type=int, default=defaults.n_tokens)
    parser.add_argument("--context_size", type=int, help="default: the SAE's metadata")
    parser.add_argument("--batch_tokens", type=int, default=defaults.batch_tokens)
    parser.add_argument("--n_examples", type=int, default=defaults.n_examples)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument(
        "--latents", type=parse_latents, help="pages only for these, e.g. 0-99,1234"
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help="a prompt to show (repeatable)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--title", help="page title")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny local model on random tokens (no network); a random Scale "
        "SAE unless --sae_path names one",
    )
    args = parser.parse_args(argv)
    if args.release is not None and args.sae_id is None:
        parser.error("--release needs --sae_id")
    if not args.smoke and args.sae_path is None and args.release is None:
        parser.error("give --sae_path, --release with --sae_id, or --smoke")
    return args


def smoke_sae(device: str = "cpu") -> SAE[Any]:
    """A randomly initialised Scale SAE at the tiny model's hook."""
    from saelens_moe.saes.scale_sae import ScaleSAE, ScaleSAEConfig
    from saelens_moe.tiny import TINY_D_MODEL, TINY_HOOK, TINY_MODEL_NAME

    torch.manual_seed(0)
    metadata = SAEMetadata(
        hook_name=TINY_HOOK,
        model_name=TINY_MODEL_NAME,
        context_size=32,
        prepend_bos=True,
    )
    cfg = ScaleSAEConfig(
        d_in=TINY_D_MODEL,
        d_sae=256,
        n_experts=8,
        n_active_experts=2,
        k=8,
        device=device,
        metadata=metadata,
    )
    return ScaleSAE(cfg)


def load_browse_sae(args: argparse.Namespace) -> SAE[Any]:
    """The SAE named on the command line (the smoke SAE if none is)."""
    if args.sae_path is not None:
        return load_sae(args.sae_path, device=args.device)
    if args.release is not None:
        return SAE.from_pretrained(args.release, args.sae_id, device=args.device)
    return smoke_sae(args.device)


def smoke_inputs(
    args: argparse.Namespace, sae: SAE[Any]
) -> tuple[HookedRootModule, TokenSource, list[str]]:
    """The tiny model, random token rows, and the prompts (two random ones by default)."""
    from saelens_moe.tiny import TINY_VOCAB, build_tiny_gpt2, build_token_dataset

    context_size = context_size_of(sae, args.context_size)
    n_rows = math.ceil(args.n_tokens / context_size)
    dataset = build_token_dataset(n_rows=n_rows, context_size=context_size)
    generator = torch.Generator().manual_seed(1)
    random_prompts = torch.randint(1, TINY_VOCAB, (2, 12), generator=generator)
    prompts = args.prompt or [
        " ".join(map(str, row)) for row in random_prompts.tolist()
    ]
    return build_tiny_gpt2().to(args.device), dataset, prompts


def model_and_tokens(
    args: argparse.Namespace, sae: SAE[Any]
) -> tuple[HookedRootModule, TokenSource]:
    """The model the SAE reads and its dataset, as named by its metadata or flags."""
    metadata = sae.cfg.metadata
    model_name = args.model_name or metadata.model_name
    dataset = args.dataset_path or metadata.dataset_path
    if model_name is None or dataset is None:
        raise SystemExit(
            "the SAE's metadata names no model or dataset: give "
            "--model_name and --dataset_path"
        )
    model = load_model(
        metadata.model_class_name or "HookedTransformer",
        model_name,
        device=args.device,
        model_from_pretrained_kwargs=metadata.model_from_pretrained_kwargs,
    )
    return model, dataset


def main(argv: Sequence[str] | None = None) -> BrowserPage:
    """Build the browser from the command line and say where it went."""
    args = parse_args(argv)
    sae = load_browse_sae(args)
    if args.smoke:
        model, tokens, prompts = smoke_inputs(args, sae)
    else:
        (model, tokens), prompts = model_and_tokens(args, sae), args.prompt
    config = BrowseConfig(
        n_tokens=args.n_tokens,
        context_size=args.context_size,
        batch_tokens=args.batch_tokens,
        n_examples=args.n_examples,
        window=args.window,
        latents=args.latents,
        title=args.title,
        note=SMOKE_NOTE if args.smoke else None,
    )
    page = browse(
        sae,
        args.output,
        model=model,
        tokens=tokens,
        prompts=prompts,
        config=config,
        text=pseudo_words if args.smoke else None,
    )
    size = page.path.stat().st_size / 2**20
    print(
        f"Wrote {page.path} ({len(page.latents)} latent pages, "
        f"{page.data['meta']['n_tokens']} tokens, {size:.1f} MiB)"
    )
    return page
