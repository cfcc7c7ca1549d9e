"""Cache GPT-2's activations once, then train Scale SAEs from the cache.

Step 1 runs SAELens's `CacheActivationsRunner` (the model reads the dataset once
and the hook's activations are written to disk as a Hugging Face dataset);
step 2 trains a Scale SAE with `use_cached_activations=True`, so the language
model is not run again. Useful when many SAEs are trained on the same data one
after another. At the paper's scale the cache holds 81.92M x 768 float32 values,
about 252 GB (126 GB with `--cache_dtype float16`).

    python examples/train_from_cache.py --cache_path activations/gpt2-l8 --n_active_experts 2 --k 32
    python examples/train_from_cache.py --skip_caching --cache_path activations/gpt2-l8 -e 4
    python examples/train_from_cache.py --smoke   # tiny local model, seconds on a CPU
"""

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from sae_lens import (
    CacheActivationsRunner,
    CacheActivationsRunnerConfig,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
)
from sae_lens import cache_activations_runner as saelens_cache_module
from sae_lens.util import str_to_dtype
from train_gpt2_layer8 import (
    PAPER,
    Setting,
    add_common_flags,
    push_if_asked,
    sae_config,
    shared_runner_fields,
    smoke_setting,
)
from transformer_lens import HookedTransformer


def cache_config(
    setting: Setting, args: argparse.Namespace
) -> CacheActivationsRunnerConfig:
    """Activations of `setting.hook_name` for every training token."""
    tokens = setting.steps * setting.batch_tokens
    cache_bytes = tokens * setting.d_in * str_to_dtype(args.cache_dtype).itemsize
    return CacheActivationsRunnerConfig(
        dataset_path=setting.dataset_path,
        model_name=setting.model_name,
        model_batch_size=32,
        hook_name=setting.hook_name,
        d_in=setting.d_in,
        training_tokens=tokens,
        context_size=setting.context_size,
        buffer_size_gb=min(2.0, cache_bytes / 1e9),  # SAELens's shard size cap is 2 GB
        new_cached_activations_path=str(args.cache_path),
        dtype=args.cache_dtype,
        device=args.device,
        streaming=True,
    )


def training_config(
    setting: Setting, args: argparse.Namespace
) -> LanguageModelSAERunnerConfig[Any]:
    """The paper's Scale SAE, trained from the cache instead of the model."""
    return LanguageModelSAERunnerConfig(
        sae=sae_config(
            setting, args.n_active_experts, args.k, args.aux_loss_coefficient
        ),
        hook_name=setting.hook_name,
        use_cached_activations=True,
        cached_activations_path=str(args.cache_path),
        output_path=str(args.output_path),
        **shared_runner_fields(setting, args.device, args.wandb),
    )


@contextmanager
def local_model_for_caching(model: HookedTransformer) -> Iterator[None]:
    """Make CacheActivationsRunner use `model`: unlike the training runners it has
    no `override_model`, so --smoke swaps its `load_model` for the tiny model."""
    with mock.patch.object(saelens_cache_module, "load_model", lambda **_: model):
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_path", type=Path, default=Path("activations/gpt2-l8"))
    parser.add_argument("--cache_dtype", default="float32")
    parser.add_argument(
        "--skip_caching", action="store_true", help="reuse --cache_path"
    )
    parser.add_argument("--n_active_experts", "-e", type=int, default=2)
    parser.add_argument("--k", "-k", type=int, default=32)
    parser.add_argument("--aux_loss_coefficient", type=float, default=0.0)
    parser.add_argument("--output_path", type=Path, default=None)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.output_path is None:
        name = f"gpt2-l8-scale-e{args.n_active_experts}-k{args.k}-from-cache"
        args.output_path = Path("output") / name
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Cache (unless --skip_caching), train, optionally push; returns the SAE folder."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    setting = smoke_setting() if args.smoke else PAPER
    patch: Any = nullcontext()
    overrides: dict[str, Any] = {}
    if args.smoke:
        from saelens_moe.tiny import tiny_model_and_tokens

        model, tokens = tiny_model_and_tokens(setting.context_size)
        patch = local_model_for_caching(model)
        overrides = {"override_model": model, "override_dataset": tokens}
    if not args.skip_caching:
        with patch:
            runner = CacheActivationsRunner(
                cache_config(setting, args),
                override_dataset=overrides.get("override_dataset"),
            )
        runner.run()
    # SAELens's store still opens the dataset (though it reads the cache): pass it too
    LanguageModelSAETrainingRunner(training_config(setting, args), **overrides).run()
    push_if_asked(setting, args)
    print(f"Saved the Scale SAE trained from {args.cache_path} to {args.output_path}")
    return args.output_path


if __name__ == "__main__":
    main()
