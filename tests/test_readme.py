"""The README's train -> load -> encode_sparse -> push -> from_pretrained example runs.

Offline, so the example is run as written except for its sizes, device and data:
GPT-2 and OpenWebText become the tiny local model and its tokens (handed to
SAELens's runner as overrides), the Hub is `FakeHub`, and `from_pretrained` reads
what was pushed from an offline Hub cache.
"""

import re
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import sae_lens
import torch
from sae_lens import SAE

from saelens_moe import ScaleSAE
from tests.helpers import (
    TINY_D_MODEL,
    FakeHub,
    build_tiny_gpt2,
    build_token_dataset,
    populate_hub_cache,
)

README = Path(__file__).parents[1] / "README.md"
CONTEXT = 16
OFFLINE_SIZES = {
    "d_in=768": f"d_in={TINY_D_MODEL}",
    "d_sae=24576": "d_sae=128",
    "n_experts=64": "n_experts=8",
    "blocks.8.hook_resid_post": "blocks.1.hook_resid_post",
    "is_dataset_tokenized=False": "is_dataset_tokenized=True",
    "training_tokens=81_920_000": "training_tokens=4096",
    "train_batch_size_tokens=8192": "train_batch_size_tokens=128",
    'device="cuda", output_path': f'device="cpu", context_size={CONTEXT}, output_path',
    'device="cuda")': 'device="cpu")',
}


def readme_example() -> str:
    """The first Python block under "## Use"."""
    use = README.read_text().split("## Use", 1)[1]
    match = re.search(r"```python\n(.*?)```", use, re.DOTALL)
    assert match is not None
    return match.group(1)


def offline(example: str, output: Path) -> str:
    for online, local in OFFLINE_SIZES.items():
        assert online in example, f"the README example no longer says {online}"
        example = example.replace(online, local)
    return example.replace('"output/scale"', repr(str(output)))


def test_the_readme_example_runs_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build_tiny_gpt2()
    tokens = build_token_dataset(n_rows=256, context_size=CONTEXT)

    class LocalRunner(sae_lens.LanguageModelSAETrainingRunner):
        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg, override_dataset=tokens, override_model=model)

    monkeypatch.setattr(sae_lens, "LanguageModelSAETrainingRunner", LocalRunner)
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    example = offline(readme_example(), tmp_path / "output")
    before_load, load = example.split("sae = SAE.from_pretrained(")
    _, cache = model.run_with_cache(
        torch.tensor(tokens["tokens"][:4]), names_filter="blocks.1.hook_resid_post"
    )
    namespace: dict[str, Any] = {"acts": cache["blocks.1.hook_resid_post"]}
    exec(before_load, namespace)  # train, load, encode_sparse, route, push

    values, latents = namespace["values"], namespace["latents"]
    assert values.shape == latents.shape == (4, CONTEXT, 32)
    assert namespace["experts"].shape == (4 * CONTEXT, 2)
    assert "README.md" in hub.files("my-org/my-saes")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    populate_hub_cache(tmp_path / "c", "my-org/my-saes", hub.root / "my-org/my-saes")
    exec("sae = SAE.from_pretrained(" + load, namespace)
    loaded = namespace["sae"]
    assert isinstance(loaded, ScaleSAE)
    local = SAE.load_from_disk(tmp_path / "output")
    x = namespace["acts"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), local(x))
