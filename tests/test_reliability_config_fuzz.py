"""Config fuzzing: every generated config either builds a working SAE or raises a
ValueError naming a field it got wrong; never another exception, never a clamp.

Validity is decided by `violations()`, a reference written from the documented
rules, independently of the package's validation code.
"""

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sae_lens.saes.sae import SAEMetadata, TrainStepInput

import saelens_moe  # noqa: F401  (registers the architectures)
from saelens_moe import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)

MAX_ELEMENTS = 2**63 - 1
DTYPES = ("float32", "float64", "bfloat16", "float16", "torch.float32")
NORMALIZATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
WEIGHTINGS = ("softmax_of_probs", "renormalized", "probs", "uniform")
HUGE = st.sampled_from([2**63, 2**64 + 1, 2**70, 10**30])  # beyond int64 tensor sizes
WRONG_TYPES = st.sampled_from(
    [None, True, False, 2.0, 2.5, "4", [4], {"a": 1}, float("nan"), float("inf")]
)
BAD_FLOATS = st.sampled_from(
    [-1.0, -1e-9, float("nan"), float("inf"), -float("inf"), "1.0", None, True, [1.0]]
)


@dataclass(frozen=True)
class Arch:
    cfg_cls: type
    sae_cls: type
    training: bool
    switch: bool


SCALE_TRAINING = Arch(ScaleTrainingSAEConfig, ScaleTrainingSAE, True, False)
SCALE = Arch(ScaleSAEConfig, ScaleSAE, False, False)
SWITCH_TRAINING = Arch(SwitchTrainingSAEConfig, SwitchTrainingSAE, True, True)
SWITCH = Arch(SwitchSAEConfig, SwitchSAE, False, True)


# ------------------------------------------------------------------ strategies


def small_or_bad_int(low: int, high: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(low, high),
        st.integers(low, high),
        st.integers(-3, 0),
        HUGE,
        st.sampled_from([-(2**70)]),
        WRONG_TYPES,
    )


@st.composite
def layout(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly consistent expert layouts (small), sometimes anything."""
    if not draw(one_in(4)):
        n_experts = draw(st.integers(1, 4))
        per_expert = draw(st.integers(1, 4))
        n_active = draw(st.integers(1, n_experts))
        fields: dict[str, Any] = {
            "d_in": draw(st.integers(1, 6)),
            "d_sae": n_experts * per_expert,
            "n_experts": n_experts,
            "n_active_experts": n_active,
            "k": draw(st.integers(1, n_active * per_expert)),
        }
    else:
        fields = {
            "d_in": draw(small_or_bad_int(1, 6)),
            "d_sae": draw(small_or_bad_int(1, 16)),
            "n_experts": draw(small_or_bad_int(1, 5)),
            "n_active_experts": draw(small_or_bad_int(1, 4)),
            "k": draw(small_or_bad_int(1, 20)),
        }
    if draw(one_in(20)):
        fields[draw(st.sampled_from(sorted(fields)))] = draw(
            st.one_of(HUGE, WRONG_TYPES)
        )
    return fields


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True with probability 1 / n (sampled_from does not favour edge values)."""
    return st.sampled_from([True] + [False] * (n - 1))


def maybe(
    valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Leave the field out (OMIT), give a valid value, or (1 in 30) a bad one."""
    choice = st.sampled_from(["omit"] * 9 + ["valid"] * 20 + ["invalid"])
    return choice.flatmap(
        lambda kind: {
            "omit": st.just(OMIT),
            "valid": valid,
            "invalid": st.one_of(invalid, WRONG_TYPES),
        }[kind]
    )


OMIT = object()

METADATA = st.sampled_from(
    [
        SAEMetadata(),
        SAEMetadata(hook_name="blocks.0.attn.hook_z"),
        SAEMetadata(hook_name="blocks.0.hook_resid_post"),
        {"hook_name": "blocks.0.hook_resid_post"},
        {},
    ]
)
BAD_METADATA = st.sampled_from([None, 5, "meta", [1], {1: "x"}])


def common_fields() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "dtype": maybe(
            st.sampled_from(DTYPES),
            st.sampled_from(["int64", "float", "", torch.float32, 32]),
        ),
        "device": maybe(
            st.just("cpu"),
            st.sampled_from(["gpu0", "", "cpu:x", torch.device("cpu"), 0]),
        ),
        "apply_b_dec_to_input": maybe(st.booleans(), st.sampled_from([0, 1, "True"])),
        "normalize_activations": maybe(
            st.sampled_from(NORMALIZATIONS), st.sampled_from(["", "LayerNorm", 0])
        ),
        "reshape_activations": maybe(
            st.sampled_from(["none", "hook_z"]), st.sampled_from(["foo", "", 0])
        ),
        "metadata": maybe(METADATA, BAD_METADATA),
        "expert_weighting": maybe(
            st.sampled_from(WEIGHTINGS), st.sampled_from(["softmax", "", "Probs"])
        ),
        "rescale_acts_by_decoder_norm": maybe(
            st.booleans(), st.sampled_from([0, 1, "no"])
        ),
    }


def training_fields() -> dict[str, st.SearchStrategy[Any]]:
    coefficient = st.one_of(
        st.floats(0, 10, allow_nan=False), st.integers(0, 10), st.just(-0.0)
    )
    return {
        "feature_scaling": maybe(st.booleans(), st.sampled_from([0, 1, "yes"])),
        "learn_lowpass": maybe(st.booleans(), st.sampled_from([0, 1, "yes"])),
        "load_balancing_coefficient": maybe(coefficient, BAD_FLOATS),
        "aux_loss_coefficient": maybe(coefficient, BAD_FLOATS),
        "load_balancing_warm_up_steps": maybe(
            st.one_of(st.integers(0, 1000), HUGE), st.integers(-5, -1)
        ),
        "decoder_init_norm": maybe(
            st.one_of(st.none(), st.floats(1e-3, 10), st.integers(1, 3)),
            st.sampled_from([0, 0.0, -0.1, float("nan"), float("inf"), "0.1", True]),
        ),
    }


@st.composite
def config_fields(draw: st.DrawFn, arch: Arch) -> dict[str, Any]:
    fields = draw(layout())
    if arch.switch:
        fields["n_active_experts"] = draw(
            st.sampled_from(["omit", "one", "one", "one", "any"]).flatmap(
                lambda kind: {
                    "omit": st.just(OMIT),
                    "one": st.just(1),
                    "any": small_or_bad_int(1, 3),
                }[kind]
            )
        )
        fields["k"] = draw(
            st.integers(1, 4) if not draw(one_in(4)) else small_or_bad_int(1, 8)
        )
    strategies = common_fields() | (training_fields() if arch.training else {})
    for name, strategy in strategies.items():
        fields[name] = draw(strategy)
    if arch.switch and not draw(one_in(4)):
        fields["expert_weighting"] = OMIT  # mostly keep the Switch default
    if arch.switch and arch.training and not draw(one_in(4)):
        fields["feature_scaling"] = OMIT
    return {name: value for name, value in fields.items() if value is not OMIT}


# ------------------------------------------------------------------- reference


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolved(arch: Arch, fields: dict[str, Any]) -> dict[str, Any]:
    """The documented defaults, overridden by the generated fields."""
    defaults: dict[str, Any] = {
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": SAEMetadata(),
        "k": 100,
        "n_experts": 8,
        "n_active_experts": 1 if arch.switch else 2,
        "expert_weighting": "probs" if arch.switch else "softmax_of_probs",
        "rescale_acts_by_decoder_norm": arch.training,
    }
    if arch.training:
        defaults |= {
            "feature_scaling": not arch.switch,
            "learn_lowpass": not arch.switch,
            "load_balancing_coefficient": 3.0,
            "aux_loss_coefficient": 1.0,
            "load_balancing_warm_up_steps": 0,
            "decoder_init_norm": 0.1,
        }
    return defaults | fields


def layout_violations(f: dict[str, Any]) -> list[set[str]]:
    """Every layout rule that fails, as far as the field types let it be checked."""
    names = ("d_in", "d_sae", "n_experts", "n_active_experts", "k")
    ok = {name: is_int(f[name]) for name in names}
    bad = [{name} for name in names if not ok[name]]
    d_in, d_sae, n_experts, n_active, k = (f[name] for name in names)
    if ok["d_in"] and d_in < 1:
        bad.append({"d_in"})
    if ok["d_sae"] and d_sae < 1:
        bad.append({"d_sae"})
    if ok["n_experts"] and ok["d_sae"]:
        if not 1 <= n_experts <= d_sae:
            bad.append({"n_experts", "d_sae"})
        elif d_sae % n_experts:
            bad.append({"d_sae", "n_experts"})
    if ok["n_active_experts"] and ok["n_experts"] and not 1 <= n_active <= n_experts:
        bad.append({"n_active_experts", "n_experts"})
    if all(ok.values()) and n_experts >= 1 and d_sae >= 1:
        if not 1 <= k <= n_active * (d_sae // n_experts):
            bad.append({"k", "n_active_experts", "d_sae", "n_experts"})
        if d_in * d_sae > MAX_ELEMENTS:
            bad.append({"d_in", "d_sae"})
    if bad:  # the first rule the package checks may be any of these
        return [set().union(*bad)]
    return bad


def metadata_hook(metadata: object) -> object:
    if isinstance(metadata, SAEMetadata):
        return metadata.hook_name
    return metadata.get("hook_name") if isinstance(metadata, dict) else None


def common_violations(f: dict[str, Any]) -> list[set[str]]:
    bad: list[set[str]] = []
    if not isinstance(f["dtype"], str) or f["dtype"] not in DTYPES:
        bad.append({"dtype"})
    if f["device"] != "cpu":
        bad.append({"device"})
    for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if not isinstance(f[name], bool):
            bad.append({name})
    if not isinstance(f["normalize_activations"], str) or (
        f["normalize_activations"] not in NORMALIZATIONS
    ):
        bad.append({"normalize_activations"})
    if f["reshape_activations"] not in ("none", "hook_z"):
        bad.append({"reshape_activations"})
    metadata = f["metadata"]
    keys = metadata.keys() if isinstance(metadata, (SAEMetadata, dict)) else [0]
    if not all(isinstance(key, str) for key in keys):
        bad.append({"metadata"})
    elif f["reshape_activations"] == "hook_z":
        hook = metadata_hook(metadata)
        if hook is not None and not str(hook).endswith("_z"):
            bad.append({"reshape_activations", "metadata"})
    if (
        f["normalize_activations"] == "layer_norm"
        and is_int(f["d_in"])
        and f["d_in"] < 2
    ):
        bad.append({"normalize_activations", "d_in"})
    if not isinstance(f["expert_weighting"], str) or (
        f["expert_weighting"] not in WEIGHTINGS
    ):
        bad.append({"expert_weighting"})
    return bad


def training_violations(f: dict[str, Any]) -> list[set[str]]:
    bad: list[set[str]] = []
    for name in ("load_balancing_coefficient", "aux_loss_coefficient"):
        value = f[name]
        if not is_real(value) or not math.isfinite(value) or value < 0:
            bad.append({name})
    warm_up = f["load_balancing_warm_up_steps"]
    if not is_int(warm_up) or warm_up < 0:
        bad.append({"load_balancing_warm_up_steps"})
    for name in ("feature_scaling", "learn_lowpass"):
        if not isinstance(f[name], bool):
            bad.append({name})
    norm = f["decoder_init_norm"]
    if norm is not None and (not is_real(norm) or not math.isfinite(norm) or norm <= 0):
        bad.append({"decoder_init_norm"})
    aux = f["aux_loss_coefficient"]
    if (
        is_real(aux)
        and aux > 0
        and f["normalize_activations"] in ("constant_norm_rescale", "layer_norm")
    ):
        bad.append({"normalize_activations", "aux_loss_coefficient"})
    d_in = f["d_in"]
    if is_int(d_in) and d_in < 2 and is_real(aux) and aux != 0:
        bad.append({"aux_loss_coefficient", "d_in"})
    if (
        f["feature_scaling"] is True
        and f["learn_lowpass"] is True
        and is_int(d_in)
        and d_in * d_in > MAX_ELEMENTS
    ):
        bad.append({"d_in", "learn_lowpass"})
    return bad


def switch_violations(arch: Arch, f: dict[str, Any]) -> list[set[str]]:
    bad: list[set[str]] = []
    if f["n_active_experts"] != 1:
        bad.append({"n_active_experts"})
    if f["expert_weighting"] != "probs":
        bad.append({"expert_weighting"})
    if arch.training and f["feature_scaling"] is not False:
        bad.append({"feature_scaling"})
    return bad


def violations(arch: Arch, fields: dict[str, Any]) -> list[set[str]]:
    f = resolved(arch, fields)
    bad = layout_violations(f) + common_violations(f)
    if arch.training:
        bad += training_violations(f)
    if arch.switch:
        bad += switch_violations(arch, f)
    return bad


# ------------------------------------------------------------------------ check


def check_config(arch: Arch, fields: dict[str, Any]) -> None:
    expected = violations(arch, fields)
    try:
        cfg = arch.cfg_cls(**fields)
    except ValueError as error:
        assert expected, f"valid config refused: {fields!r}: {error}"
        blamed = set().union(*expected)
        assert any(name in str(error) for name in blamed), (
            f"{error!r} names none of {sorted(blamed)}"
        )
        return
    assert not expected, f"accepted {fields!r} despite {expected}"
    check_no_clamp(cfg, fields)
    check_working_sae(arch, cfg)


def check_no_clamp(cfg: Any, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        actual = getattr(cfg, name)
        if name == "metadata":
            assert dict(actual.to_dict()).items() >= dict(value).items()
        elif isinstance(value, float) and math.isnan(value):
            assert isinstance(actual, float) and math.isnan(actual)
        else:
            assert actual == value and type(actual) is type(value), name
    json.dumps(cfg.to_dict())  # SAELens writes cfg.json with json.dump


def check_working_sae(arch: Arch, cfg: Any) -> None:
    sae = arch.sae_cls(cfg)
    shape = (3, 1, cfg.d_in) if cfg.reshape_activations == "hook_z" else (3, cfg.d_in)
    x = torch.randn(shape)
    with torch.no_grad():
        out = sae(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    if arch.training:
        check_training_step(sae, x.reshape(-1, cfg.d_in))


def check_training_step(sae: Any, x: torch.Tensor) -> None:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"load_balancing": sae.cfg.load_balancing_coefficient},
            dead_neuron_mask=torch.ones(sae.cfg.d_sae, dtype=torch.bool),
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    assert torch.isfinite(output.loss)


FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(FUZZ, max_examples=400)
@given(fields=config_fields(SCALE_TRAINING))
def test_fuzzed_ScaleTrainingSAEConfig_builds_or_names_the_field(
    fields: dict[str, Any],
) -> None:
    check_config(SCALE_TRAINING, fields)


@settings(FUZZ, max_examples=300)
@given(fields=config_fields(SCALE))
def test_fuzzed_ScaleSAEConfig_builds_or_names_the_field(
    fields: dict[str, Any],
) -> None:
    check_config(SCALE, fields)


@settings(FUZZ, max_examples=200)
@given(fields=config_fields(SWITCH_TRAINING))
def test_fuzzed_SwitchTrainingSAEConfig_builds_or_names_the_field(
    fields: dict[str, Any],
) -> None:
    check_config(SWITCH_TRAINING, fields)


@settings(FUZZ, max_examples=150)
@given(fields=config_fields(SWITCH))
def test_fuzzed_SwitchSAEConfig_builds_or_names_the_field(
    fields: dict[str, Any],
) -> None:
    check_config(SWITCH, fields)


def test_fuzz_generates_both_valid_and_invalid_configs() -> None:
    """Guard against a strategy drifting to all-invalid (or all-valid) configs."""
    outcomes: list[bool] = []

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(fields=config_fields(SCALE_TRAINING))
    def collect(fields: dict[str, Any]) -> None:
        outcomes.append(not violations(SCALE_TRAINING, fields))

    collect()
    assert 0.15 < sum(outcomes) / len(outcomes) < 0.85
