"""Offline stand-ins for the examples' `--smoke` runs (CI): nothing is downloaded.

They are the test suite's tiny GPT-2-shaped model and random token rows
(`tests/helpers.py`), so `--smoke` needs a checkout of this repository.
"""

import importlib
import sys
from pathlib import Path
from types import ModuleType

from datasets import Dataset
from transformer_lens import HookedTransformer

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_HOOK = "blocks.1.hook_resid_post"
SMOKE_MODEL_NAME = "tiny-gpt2"


def _test_helpers() -> ModuleType:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("tests.helpers")


def smoke_d_in() -> int:
    """Residual width of the tiny model."""
    return _test_helpers().TINY_D_MODEL


def tiny_model_and_tokens(
    context_size: int, n_rows: int = 256
) -> tuple[HookedTransformer, Dataset]:
    """A random 2-layer GPT-2-architecture model and `n_rows` rows of tokens for it."""
    helpers = _test_helpers()
    tokens = helpers.build_token_dataset(n_rows=n_rows, context_size=context_size)
    return helpers.build_tiny_gpt2(), tokens
