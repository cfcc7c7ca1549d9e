"""Load a saved SAE after checking its files, so a bad file gives a clear error.

`load_sae(folder)` reads `cfg.json` and the `sae_weights.safetensors` header,
builds the SAE on the meta device and compares names and shapes, all before
SAELens's `SAE.load_from_disk` reads a byte of weights. Every error is an
`SAELoadError` (a ValueError) naming the file and what is wrong; on an error no
SAE is returned, and nothing is half-loaded. Weights are only ever read as
safetensors: nothing here unpickles.
"""

import copy
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE
from safetensors import SafetensorError, safe_open

from saelens_moe.checks import state_dict_problems
from saelens_moe.errors import SAELoadError

PLUGIN_NOTE = (
    "`import saelens_moe` registers 'scale' and 'switch'; other plugin "
    "architectures need their package imported before loading"
)


def load_sae(
    path: str | Path,
    device: str = "cpu",
    dtype: str | None = None,
    training: bool = False,
) -> SAE[Any]:
    """Check an SAE folder, then load it with SAELens's `load_from_disk`.

    Args:
        path: Folder holding `cfg.json` and `sae_weights.safetensors`.
        device: Device to load onto.
        dtype: Dtype to load as; the config's when None.
        training: Load the training class (`TrainingSAE.load_from_disk`), as for a
            training checkpoint.
    """
    folder = Path(path)
    check_sae_folder(folder, training=training)
    loader = TrainingSAE if training else SAE
    return loader.load_from_disk(folder, device=device, dtype=dtype)


def check_sae_folder(path: str | Path, training: bool = False) -> SAEConfig:
    """Raise SAELoadError naming the file unless the folder holds a loadable SAE."""
    folder = Path(path)
    if not folder.is_dir():
        raise SAELoadError(folder, "no such folder")
    cfg_path = folder / SAE_CFG_FILENAME
    cfg = build_config(cfg_path, read_config(cfg_path), training)
    check_weights_file(folder / SAE_WEIGHTS_FILENAME, cfg, training)
    return cfg


def read_config(cfg_path: Path) -> dict[str, Any]:
    """Parse cfg.json into a dict, with SAELens's defaults for pre-6.0 configs."""
    if not cfg_path.is_file():
        raise SAELoadError(cfg_path, "missing: an SAE folder needs its cfg.json")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SAELoadError(cfg_path, f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise SAELoadError(
            cfg_path, f"must hold a JSON object, found {type(raw).__name__}"
        )
    config: dict[str, Any] = raw
    try:
        return handle_config_defaulting(config)
    except Exception as error:  # SAELens's version parsing and renames
        raise SAELoadError(cfg_path, f"unreadable config ({error})") from None


def known_architectures(training: bool = False) -> list[str]:
    registry = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
    return sorted(registry)


def config_class(cfg_path: Path, cfg_dict: dict[str, Any], training: bool) -> type:
    """The registered config class for cfg.json's architecture."""
    architecture = cfg_dict.get("architecture")
    registry = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
    if not isinstance(architecture, str) or architecture not in registry:
        raise SAELoadError(
            cfg_path,
            f"architecture {architecture!r} is not registered with SAELens; known "
            f"architectures: {', '.join(known_architectures(training))}. "
            f"{PLUGIN_NOTE}",
        )
    return registry[architecture][1]


def build_config(
    cfg_path: Path, cfg_dict: dict[str, Any], training: bool = False
) -> SAEConfig:
    """Build the config as SAELens will, turning its errors into ones naming the file."""
    cls = config_class(cfg_path, cfg_dict, training)
    missing = [
        field.name
        for field in fields(cls)
        if field.default is MISSING
        and field.default_factory is MISSING
        and field.name not in cfg_dict
    ]
    if missing:
        raise SAELoadError(cfg_path, f"missing required fields {missing}")
    try:
        cfg: SAEConfig = cls.from_dict(cfg_dict)
    except (ValueError, TypeError) as error:
        raise SAELoadError(cfg_path, f"invalid config: {error}") from None
    return cfg


def check_weights_file(weights_path: Path, cfg: SAEConfig, training: bool) -> None:
    """Read only the safetensors header and compare names and shapes with the config."""
    if not weights_path.is_file():
        raise SAELoadError(weights_path, "missing: an SAE folder needs its weights")
    shapes = _header_shapes(weights_path)
    sae = _meta_sae(cfg, training)
    try:  # what SAELens does with the file's tensors first (e.g. fold training-only ones)
        sae.process_state_dict_for_loading(shapes)
    except ValueError as error:
        raise SAELoadError(weights_path, str(error)) from None
    problems = state_dict_problems(dict(sae.state_dict()), shapes)
    if problems:
        raise SAELoadError(
            weights_path,
            "does not fit cfg.json, so nothing was loaded: " + "; ".join(problems),
        )


def _header_shapes(weights_path: Path) -> dict[str, torch.Tensor]:
    """Tensor names and shapes from the header, as meta tensors (no data read)."""
    try:
        with safe_open(str(weights_path), framework="pt") as file:  # type: ignore[no-untyped-call]
            return {
                name: torch.empty(file.get_slice(name).get_shape(), device="meta")
                for name in file.keys()  # noqa: SIM118
            }
    except (SafetensorError, OSError) as error:
        raise SAELoadError(
            weights_path,
            f"not a readable safetensors file (truncated, or another format such as "
            f"a pickle; only safetensors is read): {error}",
        ) from None


def _meta_sae(cfg: SAEConfig, training: bool) -> SAE[Any]:
    """The SAE the config implies, built on the meta device (no memory)."""
    registry = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
    sae_cls = registry[cfg.architecture()][0]
    meta_cfg = copy.copy(cfg)
    meta_cfg.device = "meta"
    return sae_cls(meta_cfg)
