"""Offline stand-ins for GPT-2 and its training text: nothing here touches the network.

A randomly initialised model with GPT-2's architecture (learned positional
embeddings, LayerNorm, gelu_new) at toy size, and rows of random token ids for
it. The examples' `--smoke` runs and the test suite train on these.
"""

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

TINY_D_MODEL = 32
TINY_VOCAB = 200
TINY_MODEL_NAME = "tiny-gpt2"
TINY_HOOK = "blocks.1.hook_resid_post"


def build_tiny_gpt2(seed: int = 0, n_layers: int = 2) -> HookedTransformer:
    """A randomly initialised model with GPT-2's architecture at toy size."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=TINY_D_MODEL,
        d_head=8,
        n_heads=4,
        d_mlp=4 * TINY_D_MODEL,
        d_vocab=TINY_VOCAB,
        n_ctx=64,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        tokenizer_name=None,
        model_name=TINY_MODEL_NAME,
        seed=seed,
    )
    return HookedTransformer(cfg)


def build_token_dataset(
    n_rows: int = 256, context_size: int = 16, seed: int = 0
) -> Dataset:
    """A pre-tokenized in-memory dataset with a `tokens` column."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, TINY_VOCAB, (n_rows, context_size), generator=generator)
    return Dataset.from_dict({"tokens": tokens.tolist()})


def tiny_model_and_tokens(
    context_size: int, n_rows: int = 256
) -> tuple[HookedTransformer, Dataset]:
    """The tiny model and `n_rows` rows of `context_size` tokens for it."""
    return build_tiny_gpt2(), build_token_dataset(
        n_rows=n_rows, context_size=context_size
    )
