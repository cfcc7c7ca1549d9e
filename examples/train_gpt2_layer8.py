"""The Scale SAE paper's GPT-2 setting (arXiv 2511.05745), trained through SAELens.

GPT-2 small, `blocks.8.hook_resid_post`, OpenWebText; d_sae 24,576 = 64 experts x
384 latents; e (`--n_active_experts`) and K (`--k`) from the command line;
10,000 steps x 8,192 tokens (81.92M tokens); Adam with lr 2e-4 / sqrt(24576 / 2**14)
= 1.63e-4, gradient clipping at 1.0 (SAELens's default) and a linear decay to 0
over the last 20% of steps; no AuxK loss, as in the paper. Unlike the paper
(20-token contexts, padding kept), contexts are SAELens's usual 128 tokens. On
CUDA the SAE trains under SAELens's bfloat16 autocast (`autocast=True`), so the
expert matmuls take PyTorch's fast grouped kernel on an H100.

    pip install ./saelens-moe   # a clone of this repository (not yet on PyPI)
    python examples/train_gpt2_layer8.py --n_active_experts 2 --k 32
    python examples/train_gpt2_layer8.py --n_active_experts 4 --k 32 --push org/repo
    python examples/train_gpt2_layer8.py --smoke   # tiny local model, seconds on a CPU

Expected cost (an estimate from FLOP counts, not a measurement):
- tokens: 81.92M through GPT-2 up to layer 8 (SAELens stops the forward there).
- FLOPs: ~1.3e8 per token for GPT-2 blocks 0-8, so ~1.1e16 for the model; the
  SAE adds ~3 x 2 x (d*N + e*m*d + K*d) per token, ~4e14 at e=2 and ~2.4e15 at
  e=16, because only the e routed experts are computed.
- time on one A100/H100: the FLOPs alone are minutes; streaming and tokenising
  OpenWebText and the fp32 model forward dominate, so plan on roughly 1-2 hours.
- memory: ~0.6 GB for the SAE with its gradients and Adam state, plus GPT-2 and
  a 32k-token activation buffer (0.1 GB): fits any 16 GB GPU.

What the paper reported (reconstruction MSE, summed over d, mean over tokens;
from the authors' figure data):

    K     Scale e=2  Scale e=4  Scale e=8  Switch   TopK (768 wide)
    8     2359.5     2556.6     2668.2     2908.5   3083.8
    32    1303.8     1344.4     1446.1     2076.5   2240.8
    128   825.8      846.9      882.0      1446.7   1437.1
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LoggingConfig,
)

from saelens_moe import ScaleTrainingSAEConfig
from saelens_moe.hub import push_to_hub
from saelens_moe.presets import paper_lr
from saelens_moe.trainer import MoESAETrainingRunner


class Setting(NamedTuple):
    """Model, data and sizes of one training run."""

    model_name: str
    hook_name: str
    dataset_path: str
    d_in: int
    d_sae: int
    n_experts: int
    steps: int
    batch_tokens: int
    context_size: int
    n_batches_in_buffer: int


PAPER = Setting(
    model_name="gpt2",
    hook_name="blocks.8.hook_resid_post",
    dataset_path="Skylion007/openwebtext",
    d_in=768,
    d_sae=24_576,
    n_experts=64,
    steps=10_000,
    batch_tokens=8_192,
    context_size=128,
    n_batches_in_buffer=256,
)
DECAY_FRACTION = 0.2


def smoke_setting() -> Setting:
    """The paper's recipe shrunk to the tiny local model: 8 steps of 64 tokens."""
    from saelens_moe.tiny import TINY_D_MODEL, TINY_HOOK, TINY_MODEL_NAME

    return Setting(
        model_name=TINY_MODEL_NAME,
        hook_name=TINY_HOOK,
        dataset_path="local-random-tokens",
        d_in=TINY_D_MODEL,
        d_sae=256,
        n_experts=8,
        steps=8,
        batch_tokens=64,
        context_size=16,
        n_batches_in_buffer=8,
    )


def sae_config(
    setting: Setting, n_active_experts: int, k: int, aux_loss_coefficient: float
) -> ScaleTrainingSAEConfig:
    """A Scale SAE with the paper's defaults (softmax_of_probs, Feature Scaling, alpha 3)."""
    return ScaleTrainingSAEConfig(
        d_in=setting.d_in,
        d_sae=setting.d_sae,
        n_experts=setting.n_experts,
        n_active_experts=n_active_experts,
        k=k,
        aux_loss_coefficient=aux_loss_coefficient,
    )


def shared_runner_fields(setting: Setting, device: str, wandb: bool) -> dict[str, Any]:
    """Fields common to SAELens's single- and multi-SAE runner configs."""
    return {
        "model_name": setting.model_name,
        "dataset_path": setting.dataset_path,
        "streaming": True,
        "context_size": setting.context_size,
        "training_tokens": setting.steps * setting.batch_tokens,
        "train_batch_size_tokens": setting.batch_tokens,
        "n_batches_in_buffer": setting.n_batches_in_buffer,
        "store_batch_size_prompts": 32,
        "lr": paper_lr(setting.d_sae),
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "lr_scheduler_name": "constant",
        "lr_decay_steps": int(DECAY_FRACTION * setting.steps),
        "device": device,
        # bfloat16 matmuls: on CUDA the only dtype PyTorch's fast grouped kernel takes
        "autocast": torch.device(device).type == "cuda",
        "logger": LoggingConfig(log_to_wandb=wandb, wandb_project="saelens-moe"),
        "checkpoint_path": None,
    }


def runner_config(
    setting: Setting, args: argparse.Namespace
) -> LanguageModelSAERunnerConfig[ScaleTrainingSAEConfig]:
    """SAELens runner config for one Scale SAE in `setting`."""
    return LanguageModelSAERunnerConfig(
        sae=sae_config(
            setting, args.n_active_experts, args.k, args.aux_loss_coefficient
        ),
        hook_name=setting.hook_name,
        is_dataset_tokenized=False,
        output_path=str(args.output_path),
        **shared_runner_fields(setting, args.device, args.wandb),
    )


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every example shares: device, seed, logging, publishing, smoke."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    parser.add_argument("--push", metavar="REPO_ID", help="upload to this Hub repo")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny local model and random tokens instead of GPT-2 and OpenWebText",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_active_experts", "-e", type=int, default=2, help="e")
    parser.add_argument("--k", "-k", type=int, default=32, help="K, latents per token")
    parser.add_argument(
        "--aux_loss_coefficient",
        type=float,
        default=0.0,
        help="AuxK weight; the paper uses none (0)",
    )
    parser.add_argument("--output_path", type=Path, default=None)
    parser.add_argument(
        "--lazy_adam",
        action="store_true",
        help="update only the latents each step touched (pays from ~1e5 latents)",
    )
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.output_path is None:
        args.output_path = Path(
            f"output/gpt2-l8-scale-e{args.n_active_experts}-k{args.k}"
        )
    return args


def local_overrides(setting: Setting, smoke: bool) -> dict[str, Any]:
    """The runner's override_model/override_dataset: the tiny local ones for --smoke."""
    if not smoke:
        return {}
    from saelens_moe.tiny import tiny_model_and_tokens

    model, tokens = tiny_model_and_tokens(setting.context_size)
    return {"override_model": model, "override_dataset": tokens}


def push_if_asked(setting: Setting, args: argparse.Namespace) -> None:
    """Upload the trained SAE to `--push`, under the hook name and e, K."""
    if args.push:
        sae_id = f"{setting.hook_name}/scale_e{args.n_active_experts}_k{args.k}"
        print("Uploaded to", push_to_hub({sae_id: args.output_path}, args.push))


def main(argv: Sequence[str] | None = None) -> Path:
    """Train one Scale SAE in the paper's setting (or its smoke version); returns its folder."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    setting = smoke_setting() if args.smoke else PAPER
    overrides = local_overrides(setting, args.smoke)
    cfg = runner_config(setting, args)
    MoESAETrainingRunner(cfg, lazy_adam=args.lazy_adam, **overrides).run()
    push_if_asked(setting, args)
    print(f"Saved the Scale SAE to {args.output_path}")
    return args.output_path


if __name__ == "__main__":
    main()
