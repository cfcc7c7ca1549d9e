"""Publishing with SAELens's real upload code (only HfApi's network calls faked) and
loading back with SAELens's real `SAE.from_pretrained` from an offline Hub cache."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from sae_lens.saes.topk_sae import (
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

from saelens_moe import ScaleSAE, ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe import hub as hub_module
from saelens_moe.hub import (
    TrainedSAE,
    build_model_card,
    push_to_hub,
    read_output_folder,
    repository_install,
)
from tests.helpers import (
    TINY_D_MODEL,
    FakeHub,
    build_tiny_gpt2,
    build_token_dataset,
    populate_hub_cache,
)

REPO = "test-org/tiny-scale-saes"
SAE_ID = "blocks.0.hook_resid_post"
SECRET = "hf_" + "S3cr3tT0kenNeverPrinted" * 2
UPLOADED = {
    f"{SAE_ID}/cfg.json",
    f"{SAE_ID}/sae_weights.safetensors",
    f"{SAE_ID}/sparsity.safetensors",
    f"{SAE_ID}/runner_cfg.json",
    "README.md",
}


def train_tiny_scale_sae(output: Path, **runner_fields: Any) -> ScaleTrainingSAE:
    """Train a tiny Scale SAE for 16 steps with SAELens's runner; output lands in `output`."""
    torch.manual_seed(0)
    cfg = LanguageModelSAERunnerConfig(
        sae=ScaleTrainingSAEConfig(
            d_in=TINY_D_MODEL, d_sae=64, n_experts=4, n_active_experts=2, k=4
        ),
        model_name="tiny-gpt2",
        hook_name=SAE_ID,
        dataset_path="local-tokens",
        is_dataset_tokenized=True,
        context_size=16,
        training_tokens=2048,
        train_batch_size_tokens=128,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(output),
        checkpoint_path=None,
        verbose=False,
        **runner_fields,
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=build_token_dataset(), override_model=build_tiny_gpt2()
    )
    return runner.run()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ScaleTrainingSAE]:
    output = tmp_path_factory.mktemp("run") / "output"
    return output, train_tiny_scale_sae(output)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return FakeHub.install(monkeypatch, tmp_path / "hub")


def test_push_to_hub_uploads_sae_files_under_sae_id_and_a_model_card(
    trained: tuple[Path, ScaleTrainingSAE], hub: FakeHub
) -> None:
    output, _ = trained
    url = push_to_hub({SAE_ID: output}, REPO, private=True)

    assert url == f"https://huggingface.co/{REPO}"
    assert hub.files(REPO) == UPLOADED
    assert hub.repos == {REPO: True}
    sent = hub.root / REPO / SAE_ID
    assert (sent / "sae_weights.safetensors").read_bytes() == (
        output / "sae_weights.safetensors"
    ).read_bytes()
    card = (hub.root / REPO / "README.md").read_text()
    assert f'SAE.from_pretrained("{REPO}", "{SAE_ID}")' in card


def test_push_to_hub_labels_cfg_json_with_the_plugin_it_needs(
    trained: tuple[Path, ScaleTrainingSAE], hub: FakeHub
) -> None:
    output, _ = trained
    push_to_hub({SAE_ID: output}, REPO)

    sent = json.loads((hub.root / REPO / SAE_ID / "cfg.json").read_text())
    original = json.loads((output / "cfg.json").read_text())
    assert "pip install saelens-moe" in sent["metadata"]["requires"]
    assert "import saelens_moe" in sent["metadata"]["requires"]
    sent["metadata"].pop("requires")
    sent["metadata"].pop("saelens_moe_version")
    assert sent == original


def test_push_to_hub_two_saes_share_one_repo_and_one_card(
    trained: tuple[Path, ScaleTrainingSAE], hub: FakeHub
) -> None:
    output, _ = trained
    push_to_hub({"e2/a": output, "e2/b": output}, REPO)

    files = hub.files(REPO)
    assert {f"e2/{name}/cfg.json" for name in "ab"} <= files
    assert len(files) == 9
    card = (hub.root / REPO / "README.md").read_text()
    assert "## `e2/a`" in card
    assert "## `e2/b`" in card


def test_push_to_hub_never_uploads_or_prints_a_token(
    tmp_path: Path,
    hub: FakeHub,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    output = tmp_path / "output"
    train_tiny_scale_sae(output, model_from_pretrained_kwargs={"token": SECRET})
    assert SECRET in (output / "runner_cfg.json").read_text()

    push_to_hub({SAE_ID: output}, REPO)

    for path in hub.files(REPO):
        assert SECRET.encode() not in (hub.root / REPO / path).read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def test_push_to_hub_error_quoting_the_token_is_reraised_without_it(
    trained: tuple[Path, ScaleTrainingSAE],
    hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def leaky_upload(self: HfApi, **_: Any) -> None:
        raise ValueError(f"401 Unauthorized for Authorization: Bearer {SECRET}")

    monkeypatch.setattr(HfApi, "upload_folder", leaky_upload)
    with pytest.raises(RuntimeError) as error:
        push_to_hub({SAE_ID: trained[0]}, REPO)

    assert "401 Unauthorized" in str(error.value)
    assert SECRET not in str(error.value)
    assert error.value.__cause__ is None
    assert error.value.__suppress_context__


def test_build_model_card_describes_architecture_run_and_metrics(
    trained: tuple[Path, ScaleTrainingSAE],
) -> None:
    output, _ = trained
    card = build_model_card(
        REPO,
        {SAE_ID: read_output_folder(output)},
        {SAE_ID: {"mse": 12.5, "redundancy": {"0.9": 0.0125}}},
    )

    assert card.startswith("---\nlibrary_name: saelens\n")
    for text in (
        "pip install saelens-moe",
        "import saelens_moe",
        "KeyError: 'scale'",
        "https://arxiv.org/abs/2511.05745",
        "Architecture: `scale` (`ScaleSAE`)",
        "| n_experts | 4 |",
        "| n_active_experts | 2 |",
        "| k | 4 |",
        "| expert_weighting | softmax_of_probs |",
        "| feature_scaling (training) | True |",
        "| load_balancing_coefficient (training) | 3 |",
        "| model | tiny-gpt2 |",
        f"| hook | {SAE_ID} |",
        "| training tokens | 2048 |",
        "| steps | 16 |",
        "| mse | 12.5 |",
        "| redundancy.0.9 | 0.0125 |",
        "| l0 (SAELens, end of training) |",
    ):
        assert text in card, text


def test_build_model_card_without_metrics_or_runner_cfg_says_so(
    trained: tuple[Path, ScaleTrainingSAE],
) -> None:
    cfg = read_output_folder(trained[0]).cfg
    for name in ("l0", "num_dead_features"):
        cfg["metadata"].pop(name, None)
    card = build_model_card(
        REPO,
        {SAE_ID: read_output_folder(trained[0])._replace(cfg=cfg, runner_cfg=None)},
    )

    assert "No metrics were recorded for this SAE." in card
    assert "| model | tiny-gpt2 |" in card  # taken from cfg.json's metadata instead


LOAD_SCRIPT = """
import sys, torch
from sae_lens import SAE
repo, sae_id, inputs, outputs = sys.argv[1:]
try:
    SAE.from_pretrained(repo, sae_id)
except KeyError as error:
    print("without import:", repr(error))
import saelens_moe
sae = SAE.from_pretrained(repo, sae_id)
print("loaded:", type(sae).__name__, sae.cfg.metadata.requires)
x = torch.load(inputs)
torch.save({"out": sae(x), "acts": sae.encode(x)}, outputs)
"""


def test_from_pretrained_loads_the_published_sae_offline(
    trained: tuple[Path, ScaleTrainingSAE], hub: FakeHub, tmp_path: Path
) -> None:
    output, training_sae = trained
    push_to_hub({SAE_ID: output}, REPO)
    cache = tmp_path / "hf_cache"
    populate_hub_cache(cache, REPO, hub.root / REPO)
    x = torch.randn(3, 5, TINY_D_MODEL)
    torch.save(x, tmp_path / "x.pt")

    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            REPO,
            SAE_ID,
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without import: KeyError('scale')" in result.stdout
    assert "loaded: ScaleSAE This SAE needs the saelens-moe plugin" in result.stdout
    loaded = torch.load(tmp_path / "y.pt")
    published = SAE.load_from_disk(str(output))
    assert isinstance(published, ScaleSAE)
    with torch.no_grad():
        torch.testing.assert_close(loaded["out"], published(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded["acts"], published.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded["out"], training_sae(x))


def topk_cfg() -> dict[str, Any]:
    """cfg.json of a SAELens TopK SAE, as SAELens's synthetic runner leaves it."""
    return TopKSAEConfig(d_in=8, d_sae=16, k=2).to_dict()


def test_model_card_says_how_to_install_today_and_once_published(
    trained: tuple[Path, ScaleTrainingSAE],
) -> None:
    card = build_model_card(REPO, {SAE_ID: read_output_folder(trained[0])})
    lines = card.splitlines()

    published = lines.index("pip install saelens-moe")
    assert "once saelens-moe is published on PyPI (not yet)" in lines[published - 1]
    assert repository_install() in lines[published - 2]
    assert "# today, from " in lines[published - 3]
    assert "saelens-moe repository" in lines[published - 3]
    assert "import saelens_moe" in card
    assert "The `scale` SAEs here need the saelens-moe plugin" in card
    assert "SAELens alone" not in card  # every SAE here needs it


def test_model_card_of_saelens_architectures_only_does_not_require_the_plugin() -> None:
    card = build_model_card(REPO, {"topk": TrainedSAE(topk_cfg(), None)})

    assert "load with SAELens alone" in card
    assert "import saelens_moe" not in card
    assert "pip install saelens-moe" not in card
    assert "Architecture: `topk`." in card


def test_model_card_of_mixed_architectures_names_which_need_the_plugin(
    trained: tuple[Path, ScaleTrainingSAE],
) -> None:
    card = build_model_card(
        REPO,
        {"moe": read_output_folder(trained[0]), "topk": TrainedSAE(topk_cfg(), None)},
    )
    assert "The `scale` SAEs here need the saelens-moe plugin" in card
    assert "every other SAE here loads with SAELens alone" in card
    assert "- `topk` (SAELens)" in card
    assert "- `scale` (saelens-moe)" in card


def test_model_card_prints_no_empty_table_for_a_synthetic_runner_folder() -> None:
    card = build_model_card(REPO, {"topk": TrainedSAE(topk_cfg(), None)})

    assert "### Training run" not in card
    lines = card.splitlines()
    for index, line in enumerate(lines):
        if line == "| --- | --- |":
            assert lines[index + 1].startswith("| "), "a table with no rows"
    assert "No metrics were recorded for this SAE." in card


def test_push_to_hub_labels_only_plugin_architectures(
    tmp_path: Path, hub: FakeHub
) -> None:
    folder = tmp_path / "topk"
    TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2)).save_inference_model(
        str(folder)
    )
    push_to_hub({"topk": folder}, REPO)

    sent = json.loads((hub.root / REPO / "topk" / "cfg.json").read_text())
    assert "requires" not in sent["metadata"]
    card = (hub.root / REPO / "README.md").read_text()
    assert "import saelens_moe" not in card


def test_repository_install_is_one_pip_command() -> None:
    command = repository_install()
    assert command.startswith("pip install ")
    assert "saelens-moe" in command


def test_repository_install_uses_the_repository_url_once_the_metadata_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://example.org/owner/saelens-moe"
    monkeypatch.setattr(hub_module, "_repository_url", lambda: url)
    assert repository_install() == f'pip install "saelens-moe @ git+{url}"'
    card = build_model_card(REPO, {SAE_ID: TrainedSAE({"architecture": "scale"}, None)})
    assert f'pip install "saelens-moe @ git+{url}"' in card
