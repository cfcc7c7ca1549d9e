"""Bad SAE files give errors naming the file and the problem, and load nothing."""

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import SAE, TrainingSAE
from safetensors.torch import load_file, save_file

from saelens_moe import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
)
from saelens_moe.errors import SAELoadError
from saelens_moe.loading import check_sae_folder, load_sae

FIELDS: dict[str, Any] = {
    "d_in": 6,
    "d_sae": 12,
    "n_experts": 3,
    "n_active_experts": 2,
    "k": 4,
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    sae = ScaleSAE(ScaleSAEConfig(**FIELDS))
    sae.save_model(tmp_path / "sae")
    return tmp_path / "sae"


def edit_cfg(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def load_error(folder: Path) -> str:
    with pytest.raises(SAELoadError) as info:
        load_sae(folder)
    return str(info.value)


def test_load_sae_loads_a_good_folder_with_the_same_outputs(folder: Path) -> None:
    sae = load_sae(folder)
    assert isinstance(sae, ScaleSAE)
    reference = SAE.load_from_disk(folder)
    x = torch.randn(5, FIELDS["d_in"])
    torch.testing.assert_close(sae(x), reference(x))


def test_cfg_json_missing_a_required_field_is_named(folder: Path) -> None:
    edit_cfg(folder, d_in=None)
    message = load_error(folder)
    assert "cfg.json" in message and "d_in" in message


def test_cfg_json_with_an_invalid_field_is_named(folder: Path) -> None:
    edit_cfg(folder, n_experts=5)
    message = load_error(folder)
    assert "cfg.json" in message and "n_experts" in message


def test_cfg_json_that_is_not_json_is_named(folder: Path) -> None:
    text = (folder / "cfg.json").read_text()
    (folder / "cfg.json").write_text(text[: len(text) // 2])
    message = load_error(folder)
    assert "cfg.json" in message and "not valid JSON" in message


def test_missing_cfg_json_is_named(folder: Path) -> None:
    (folder / "cfg.json").unlink()
    assert "cfg.json: missing" in load_error(folder)


def test_unknown_architecture_lists_the_known_ones(folder: Path) -> None:
    edit_cfg(folder, architecture="mixture_of_wizards")
    message = load_error(folder)
    assert "cfg.json" in message and "'mixture_of_wizards'" in message
    assert "scale" in message and "switch" in message and "topk" in message
    assert "import saelens_moe" in message


def test_weights_whose_shapes_disagree_with_the_config_are_named(folder: Path) -> None:
    edit_cfg(folder, d_sae=24, n_experts=3)
    message = load_error(folder)
    assert "sae_weights.safetensors" in message
    assert "W_enc has shape (6, 12), the config needs (6, 24)" in message


def test_weights_missing_a_tensor_are_named(folder: Path) -> None:
    weights = load_file(folder / "sae_weights.safetensors")
    weights.pop("W_router")
    save_file(weights, folder / "sae_weights.safetensors")
    message = load_error(folder)
    assert "sae_weights.safetensors" in message and "W_router" in message


def test_truncated_weights_file_is_named(folder: Path) -> None:
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    message = load_error(folder)
    assert "sae_weights.safetensors" in message
    assert "not a readable safetensors file" in message


def test_missing_weights_file_is_named(folder: Path) -> None:
    (folder / "sae_weights.safetensors").unlink()
    assert "sae_weights.safetensors: missing" in load_error(folder)


class _Payload:
    """Unpickling this would create a marker file: proof that nothing unpickles."""

    marker: Path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_posing_as_weights_is_refused_without_unpickling(
    folder: Path, tmp_path: Path
) -> None:
    payload = _Payload()
    payload.marker = tmp_path / "unpickled"
    (folder / "sae_weights.safetensors").write_bytes(pickle.dumps(payload))
    message = load_error(folder)
    assert "not a readable safetensors file" in message
    assert not payload.marker.exists()


def test_sae_lens_loader_names_misshapen_tensors_through_our_hook(folder: Path) -> None:
    """Loading with SAELens directly (no pre-check) still names the tensor."""
    weights = load_file(folder / "sae_weights.safetensors")
    weights["b_router"] = torch.zeros(7)
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(
        ValueError, match=r"sae_weights\.safetensors.*b_router has shape \(7,\)"
    ):
        SAE.load_from_disk(folder)


def test_non_finite_weights_are_refused_naming_the_tensor(folder: Path) -> None:
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_dec"][0, 0] = float("nan")
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="W_dec holds 1 NaN or Inf values"):
        SAE.load_from_disk(folder)


def test_a_failed_checkpoint_load_leaves_the_training_sae_untouched(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS))
    sae.save_model(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "sae_weights.safetensors")
    weights = {name: tensor + 1 for name, tensor in weights.items()}
    weights["omega"] = torch.zeros(4)  # one bad tensor among good ones
    save_file(weights, tmp_path / "ckpt" / "sae_weights.safetensors")
    before = {name: p.clone() for name, p in sae.state_dict().items()}
    with pytest.raises(ValueError, match="omega"):
        sae.load_weights_from_checkpoint(tmp_path / "ckpt")
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_training_checkpoint_folder_checks_and_loads_as_training_class(
    tmp_path: Path,
) -> None:
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**FIELDS))
    sae.save_model(tmp_path / "ckpt")
    check_sae_folder(tmp_path / "ckpt", training=True)
    loaded = load_sae(tmp_path / "ckpt", training=True)
    assert isinstance(loaded, TrainingSAE)
    assert set(loaded.state_dict()) == set(sae.state_dict())
