"""Registers this package's architectures with SAELens when it is imported."""

from typing import Any

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

PACKAGE = "saelens_moe"


def _owned_by_us(entry: tuple[type[Any], type[Any]]) -> bool:
    return all(cls.__module__.split(".")[0] == PACKAGE for cls in entry)


def _register(
    registry: dict[str, Any],
    architecture: str,
    entry: tuple[type[Any], type[Any]],
) -> None:
    """Add or refresh our entry; refuse a key another package already owns."""
    existing = registry.get(architecture)
    if existing is not None and existing != entry and not _owned_by_us(existing):
        owner = ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in existing)
        raise ValueError(
            f"SAELens architecture {architecture!r} is already registered by {owner}; "
            f"{PACKAGE} cannot register its own classes under the same name"
        )
    registry[architecture] = entry


def register_architecture(
    architecture: str,
    inference: tuple[type[Any], type[Any]],
    training: tuple[type[Any], type[Any]],
) -> None:
    """Register inference classes first: training configs look them up when built."""
    _register(SAE_CLASS_REGISTRY, architecture, inference)
    _register(SAE_TRAINING_CLASS_REGISTRY, architecture, training)
