"""Weights only as safetensors, nothing unpickled by this package, and no Hub
token or other secret from the environment in logs, files, cards or errors."""

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from safetensors import safe_open

import saelens_moe
from saelens_moe.errors import NonFiniteLossError
from saelens_moe.loading import load_sae
from tests.helpers import build_tiny_gpt2, build_token_dataset
from tests.reliability_runs import (
    CONTEXT,
    activation_batches,
    make_trainer,
    new_sae,
    runner_config,
)

FAKE_TOKEN = "hf_FakeTokenPlantedByTheTests0123456789"
FAKE_SECRETS = {
    "HF_TOKEN": FAKE_TOKEN,
    "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN,
    "WANDB_API_KEY": "wandb_fake_secret_0123456789abcdef",
}
UNPICKLING_CALLS = {
    ("torch", "load"),
    ("torch", "save"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("numpy", "load"),
    ("np", "load"),
}
UNPICKLING_MODULES = {"pickle", "dill", "marshal", "joblib", "cloudpickle", "shelve"}


def package_sources() -> list[Path]:
    return sorted(Path(saelens_moe.__file__).parent.rglob("*.py"))


def unsafe_uses(source: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            module = getattr(node, "module", None) or ""
            found += [
                f"{source.name}:{node.lineno} imports {name}"
                for name in [*names, module]
                if name.split(".")[0] in UNPICKLING_MODULES
            ]
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in UNPICKLING_CALLS
        ):
            found.append(
                f"{source.name}:{node.lineno} uses {node.value.id}.{node.attr}"
            )
    return found


def test_package_never_pickles_or_unpickles() -> None:
    """torch.load/save and pickle are SAELens's (trainer_state.pt), never ours."""
    assert package_sources()
    assert [use for path in package_sources() for use in unsafe_uses(path)] == []


def test_saved_weights_are_safetensors(tmp_path: Path) -> None:
    sae = new_sae()
    weights_path, _ = sae.save_model(tmp_path)
    with safe_open(str(weights_path), framework="pt") as file:  # type: ignore[no-untyped-call]
        assert set(file.keys()) == set(sae.state_dict())


@pytest.fixture
def planted_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)


def error_messages(tmp_path: Path) -> list[str]:
    """Run the error paths: bad files, an unknown architecture, a NaN loss."""
    messages: list[str] = []
    folder = tmp_path / "broken"
    new_sae().save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for change in ({"architecture": "unknown"}, {"d_sae": 7}, {"k": "many"}):
        (folder / "cfg.json").write_text(json.dumps(cfg | change))
        with pytest.raises(ValueError) as info:
            load_sae(folder)
        messages.append(str(info.value))
    (folder / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError) as info:
        load_sae(folder)
    messages.append(str(info.value))
    batches = activation_batches(3)
    batches[1][0, 0] = float("inf")
    trainer = make_trainer(tmp_path / "nan", new_sae(), iter(batches), n_steps=3)
    with pytest.raises(NonFiniteLossError) as nan_info:
        trainer.fit()
    messages.append(str(nan_info.value))
    return messages


def model_card(output: Path) -> str:
    from saelens_moe import hub

    trained = hub.read_output_folder(output)
    return hub.build_model_card("someone/moe-saes", {"layer1": trained})


def test_planted_secrets_reach_no_log_file_card_or_error(
    planted_secrets: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    torch.manual_seed(0)
    runner = LanguageModelSAETrainingRunner(
        runner_config(tmp_path / "run", n_steps=4, n_checkpoints=1),
        override_dataset=build_token_dataset(n_rows=128, context_size=CONTEXT),
        override_model=build_tiny_gpt2(),
    )
    runner.run()
    texts = [*error_messages(tmp_path), model_card(tmp_path / "run" / "output")]
    out, err = capfd.readouterr()
    texts += [out, err, caplog.text]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "runner_cfg.json" for p in files)
    for secret in FAKE_SECRETS.values():
        assert not [text for text in texts if secret in text]
        assert [p for p in files if secret.encode() in p.read_bytes()] == []
