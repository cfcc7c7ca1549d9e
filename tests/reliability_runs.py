"""Small SAELens training runs shared by the reliability tests (CPU, seconds each)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.training.sae_trainer import SAETrainer

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from tests.helpers import TINY_D_MODEL

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 16
PROMPTS = 8
BATCH_TOKENS = PROMPTS * CONTEXT  # one LLM batch is exactly one training batch
SAE_FIELDS: dict[str, Any] = {
    "d_in": TINY_D_MODEL,
    "d_sae": 64,
    "n_experts": 4,
    "n_active_experts": 2,
    "k": 8,
}


def runner_config(
    output: Path, n_steps: int = 24, sae: dict[str, Any] | None = None, **overrides: Any
) -> LanguageModelSAERunnerConfig[Any]:
    """A runner config whose batches are served in order (no mixing, no shuffle).

    With `activations_mixing_fraction=0` and one LLM batch per training batch,
    SAELens's checkpoint (which records only how far the dataset was read) is
    enough to resume on exactly the batches an uninterrupted run would see.
    """
    fields: dict[str, Any] = {
        "sae": ScaleTrainingSAEConfig(**(SAE_FIELDS | (sae or {}))),
        "model_name": "tiny-gpt2",
        "hook_name": HOOK,
        "dataset_path": "local-tokens",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
        "training_tokens": n_steps * BATCH_TOKENS,
        "train_batch_size_tokens": BATCH_TOKENS,
        "store_batch_size_prompts": PROMPTS,
        "n_batches_in_buffer": PROMPTS,
        "activations_mixing_fraction": 0.0,
        "lr": 3e-3,
        "device": "cpu",
        "logger": LoggingConfig(log_to_wandb=False),
        "output_path": str(output / "output"),
        "checkpoint_path": str(output / "checkpoints"),
        "verbose": False,
        **overrides,
    }
    return LanguageModelSAERunnerConfig(**fields)


def make_trainer(
    output: Path,
    training_sae: ScaleTrainingSAE,
    batches: Iterator[torch.Tensor],
    **overrides: Any,
) -> SAETrainer[Any, Any]:
    """SAELens's trainer fed from `batches`, checkpointing under `output`."""
    cfg = runner_config(output, **overrides).to_sae_trainer_config()
    return SAETrainer(cfg=cfg, sae=training_sae, data_provider=batches)


def activation_batches(
    n_batches: int, seed: int = 0, d_in: int = TINY_D_MODEL
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=generator) / d_in**0.5
    return [
        torch.randn(BATCH_TOKENS, d_in, generator=generator) @ mixing
        for _ in range(n_batches)
    ]


def new_sae(**overrides: Any) -> ScaleTrainingSAE:
    """The runs' Scale SAE, seeded."""
    torch.manual_seed(0)
    return ScaleTrainingSAE(ScaleTrainingSAEConfig(**(SAE_FIELDS | overrides)))
