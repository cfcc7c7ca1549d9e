"""Guards that turn silent failures into errors that say what is wrong.

- Scale and Switch SAE config fields out of range raise ValueError naming the
  field and its allowed values, when the config is built.
- Config fields SAELens leaves unchecked (dtype, reshape_activations, metadata,
  decoder_init_norm, sizes torch cannot address) raise ValueError naming the field.
- Weights that disagree with their config (missing, unexpected or misshapen
  tensors, NaN or Inf values) raise ValueError naming the tensor, before any of
  them is assigned to the SAE.
- A non-finite training loss raises `NonFiniteLossError` naming the step, before
  SAELens calls `backward()` and the optimizer, so the weights stay finite.
"""

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from sae_lens.saes.sae import SAEConfig, SAEMetadata, TrainingSAEConfig
from sae_lens.util import str_to_dtype

from saelens_moe.errors import NonFiniteLossError

if TYPE_CHECKING:
    from saelens_moe.saes.parallel import Parallel

MAX_ELEMENTS = 2**63 - 1
"""Most elements one torch tensor can hold (its sizes are signed 64-bit)."""
RESHAPE_ACTIVATIONS = ("none", "hook_z")
WEIGHTS_FILE = "sae_weights.safetensors"


# ----------------------------------------------------------------------------- config


def validate_shared_fields(cfg: SAEConfig) -> None:
    """Check the SAEConfig fields SAELens accepts without looking at them."""
    _require_string(cfg.dtype, "dtype", "'float32'")
    _require_string(cfg.device, "device", "'cpu'")
    _require_reshape_activations(cfg)
    _require_metadata(cfg)
    _require_addressable_sizes(cfg)
    if cfg.normalize_activations == "layer_norm" and cfg.d_in < 2:
        raise ValueError(
            f"normalize_activations='layer_norm' needs d_in >= 2, got d_in={cfg.d_in} "
            "(the standard deviation of one value is undefined)"
        )


def validate_training_extras(cfg: TrainingSAEConfig) -> None:
    """decoder_init_norm, and the width the AuxK loss needs."""
    validate_decoder_init_norm(cfg.decoder_init_norm)
    aux_loss_coefficient: object = getattr(cfg, "aux_loss_coefficient", 0)
    if cfg.d_in < 2 and aux_loss_coefficient != 0:
        raise ValueError(
            f"aux_loss_coefficient must be 0 when d_in < 2 (got d_in={cfg.d_in}): "
            "the AuxK loss draws on d_in // 2 dead latents"
        )


def validate_decoder_init_norm(value: object) -> None:
    """None (keep the initial norms) or a finite number > 0."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"decoder_init_norm must be None or a finite number > 0, got {value!r}"
        )


def _require_string(value: object, name: str, example: str) -> None:
    # a torch.dtype or torch.device would build, then make cfg.json unwritable
    # when SAELens saves it at the end of training
    if not isinstance(value, str):
        raise ValueError(
            f"{name} must be a string such as {example}, got {value!r} "
            f"({type(value).__name__})"
        )


def _require_reshape_activations(cfg: SAEConfig) -> None:
    value: object = cfg.reshape_activations
    if not isinstance(value, str) or value not in RESHAPE_ACTIVATIONS:
        raise ValueError(
            f"reshape_activations must be one of {RESHAPE_ACTIVATIONS}, got {value!r}"
        )
    hook_name = cfg.metadata.get("hook_name") if _is_metadata(cfg.metadata) else None
    if (
        value == "hook_z"
        and hook_name is not None
        and not str(hook_name).endswith("_z")
    ):
        raise ValueError(
            "reshape_activations='hook_z' needs a hook whose name ends in '_z', "
            f"but metadata.hook_name is {hook_name!r}"
        )


def _is_metadata(value: object) -> bool:
    return isinstance(value, SAEMetadata)


def _require_metadata(cfg: SAEConfig) -> None:
    """SAEMetadata, or a dict of it with string keys (what SAELens's from_dict passes)."""
    value: object = cfg.metadata
    if _is_metadata(value):
        return
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        items: Mapping[str, Any] = value
        cfg.metadata = SAEMetadata(**items)
        return
    raise ValueError(
        f"metadata must be an SAEMetadata or a dict with string keys, got {value!r}"
    )


def _require_addressable_sizes(cfg: SAEConfig) -> None:
    """Refuse sizes whose parameters would hold more elements than torch can index."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    if d_in * d_sae > MAX_ELEMENTS:
        raise ValueError(
            f"d_in * d_sae ({d_in} * {d_sae}) exceeds {MAX_ELEMENTS}, the most "
            "elements a torch tensor (W_enc) can hold"
        )
    learn_lowpass = getattr(cfg, "feature_scaling", False) and getattr(
        cfg, "learn_lowpass", False
    )
    if learn_lowpass and d_in * d_in > MAX_ELEMENTS:
        raise ValueError(
            f"d_in ({d_in}) is too large for learn_lowpass=True: W_lowpass would hold "
            f"d_in**2 elements, more than the {MAX_ELEMENTS} a torch tensor can hold"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(cfg: object, name: str, low: int, high: int | None = None) -> int:
    value = getattr(cfg, name)
    upper = "" if high is None else f" and <= {high}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer >= {low}{upper}, got {value!r}")
    return value


def _require_bool(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def validate_expert_fields(cfg: Any) -> None:
    """Refuse an impossible expert layout, naming the field and its allowed values."""
    from saelens_moe.saes.moe import EXPERT_WEIGHTINGS  # saes imports this module

    _require_int(cfg, "d_in", 1)
    d_sae = _require_int(cfg, "d_sae", 1)
    n_experts = _require_int(cfg, "n_experts", 1, d_sae)
    if d_sae % n_experts:
        raise ValueError(
            f"d_sae ({d_sae}) must be divisible by n_experts ({n_experts}): "
            "every expert owns d_sae / n_experts latents"
        )
    n_active = _require_int(cfg, "n_active_experts", 1, n_experts)
    _require_int(cfg, "k", 1, n_active * (d_sae // n_experts))
    if cfg.expert_weighting not in EXPERT_WEIGHTINGS:
        raise ValueError(
            f"expert_weighting must be one of {EXPERT_WEIGHTINGS}, "
            f"got {cfg.expert_weighting!r}"
        )
    _require_bool(cfg, "rescale_acts_by_decoder_norm")
    _require_bool(cfg, "apply_b_dec_to_input")
    _validate_placement(cfg)
    validate_shared_fields(cfg)


def _validate_placement(cfg: Any) -> None:
    try:
        str_to_dtype(cfg.dtype)
    except Exception as error:
        raise ValueError(f"dtype must name a torch dtype, got {cfg.dtype!r}") from error
    try:
        torch.device(cfg.device)
    except Exception as error:
        raise ValueError(
            f"device must name a torch device, got {cfg.device!r}"
        ) from error


def validate_training_fields(cfg: Any) -> None:
    """Refuse negative or non-finite loss coefficients and the options AuxK cannot use."""
    for name in ("load_balancing_coefficient", "aux_loss_coefficient"):
        value = getattr(cfg, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    _require_int(cfg, "load_balancing_warm_up_steps", 0)
    window: object = getattr(cfg, "dead_latent_window", None)
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(
            f"dead_latent_window must be None or an integer >= 1, got {window!r}"
        )
    _require_bool(cfg, "feature_scaling")
    _require_bool(cfg, "learn_lowpass")
    from saelens_moe.saes.router_init import ROUTER_INITS  # saes imports this module

    if cfg.router_init not in ROUTER_INITS:
        raise ValueError(
            f"router_init must be one of {ROUTER_INITS}, got {cfg.router_init!r}"
        )
    validate_training_extras(cfg)
    if cfg.aux_loss_coefficient > 0 and cfg.normalize_activations in (
        "constant_norm_rescale",
        "layer_norm",
    ):
        raise ValueError(
            f"normalize_activations={cfg.normalize_activations!r} cannot be used with "
            "the AuxK loss (its residual would be in the wrong space): set "
            "aux_loss_coefficient=0 or normalize_activations to one of 'none', "
            "'expected_average_only_in', 'covariance_whitening'"
        )


# ---------------------------------------------------------------------------- weights


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    source: str = WEIGHTS_FILE,
) -> None:
    """Raise ValueError naming `source` and each tensor that does not fit the config."""
    problems = state_dict_problems(expected, state_dict)
    if problems:
        raise ValueError(
            f"{source} does not fit its config, so nothing was loaded: "
            + "; ".join(problems)
        )


def state_dict_problems(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """Missing, unexpected, misshapen and non-finite tensors, one line each.

    `expected` is the state dict of an SAE built from the config (meta tensors are
    fine: only names and shapes are read).
    """
    return [
        *_key_problems(expected, state_dict),
        *_shape_problems(expected, state_dict),
        *_value_problems(state_dict),
    ]


def _key_problems(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems: list[str] = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    return problems


def _shape_problems(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    return [
        f"{name} has shape {tuple(tensor.shape)}, the config needs "
        f"{tuple(expected[name].shape)}"
        for name, tensor in state_dict.items()
        if name in expected and tensor.shape != expected[name].shape
    ]


def _value_problems(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    problems: list[str] = []
    for name, tensor in state_dict.items():
        if tensor.device.type == "meta" or not tensor.is_floating_point():
            continue
        n_bad = int((~torch.isfinite(tensor)).sum())
        if n_bad:
            problems.append(f"{name} holds {n_bad} NaN or Inf values")
    return problems


# ------------------------------------------------------------------------------- loss


def count_dead_if_loss_finite(
    losses: Mapping[str, torch.Tensor],
    sae_in: torch.Tensor,
    step: int,
    dead_latents: torch.Tensor | None,  # [d_sae] bool
    parallel: "Parallel | None" = None,
) -> int:
    """The step's one host read: raise unless the losses sum to a finite number,
    else return how many latents are dead (0 without a mask).

    With `parallel`, every process raises if any process's loss is not finite, and
    the message names that process's rank. The diagnosis is only computed when the
    check fails.
    """
    loss = sum(losses.values(), torch.zeros((), device=sae_in.device))
    if loss.device.type == "meta":
        return 0
    n_dead = torch.zeros((), dtype=torch.long, device=loss.device)
    if dead_latents is not None:
        n_dead = dead_latents.sum().to(loss.device)
    rank = 0 if parallel is None else parallel.rank
    failed_rank = (~torch.isfinite(loss)).long() * (rank + 1) - 1  # -1: all finite
    status = torch.stack([failed_rank, n_dead])
    if parallel is not None:  # the dead-latent mask is the same on every process
        parallel.max(status)
    failed, dead = status.tolist()
    if failed == rank:
        message = _describe_non_finite(loss, losses, sae_in, step)
        if parallel is not None:
            message = f"rank {rank}: {message}"
        raise NonFiniteLossError(step, message)
    if failed >= 0:
        raise NonFiniteLossError(
            step,
            f"training stopped at step {step}: rank {failed}'s loss is not finite "
            "(its error gives the cause); the weights were not updated.",
        )
    return dead


def _describe_non_finite(
    loss: torch.Tensor,
    losses: Mapping[str, torch.Tensor],
    sae_in: torch.Tensor,
    step: int,
) -> str:
    parts = ", ".join(f"{name}={float(value):.4g}" for name, value in losses.items())
    n_bad_inputs = int((~torch.isfinite(sae_in.detach())).sum())
    cause = (
        f"the input batch holds {n_bad_inputs} NaN or Inf activations"
        if n_bad_inputs
        else "the input batch is finite, so the weights or a loss coefficient "
        "overflowed"
    )
    return (
        f"training stopped at step {step}: the loss is {float(loss)} ({parts}); "
        f"{cause}. The weights were not updated at this step, and checkpoints "
        "already on disk are untouched."
    )
