"""Both architectures on the `meta` device, the suite's stand-in for a GPU.

Like CUDA, meta refuses CPU tensors mixed into `cat`, `stack` and non-scalar ops,
so a tensor the code makes on the CPU by mistake fails here as it would on a GPU.
Unlike CUDA, meta has no autocast and no values: host reads (`.item()`,
`.tolist()`, `.cpu()`, `bool()`) are emulated as the device-to-host copy they are
on a GPU, returning zeros, so the analysis code runs to its end.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx.experimental._config as fx_config
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

from saelens_moe import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
)
from saelens_moe.browse.collect import Batch, Collector
from saelens_moe.metrics import (
    compute_sae_metrics,
    expert_layout,
    feature_dimensionality,
    route_activations,
)
from saelens_moe.router_health import expert_usage_monitor
from saelens_moe.saes.fast import grouped as grouped_matmuls

D_IN, D_SAE, N_EXPERTS, K = 16, 64, 4, 6
META = torch.device("meta")
TRAINING = {
    "scale": (ScaleTrainingSAE, ScaleTrainingSAEConfig),
    "switch": (SwitchTrainingSAE, SwitchTrainingSAEConfig),
}


def training_sae(architecture: str, dtype: str = "float32") -> TrainingSAE[Any]:
    sae_class, config_class = TRAINING[architecture]
    return sae_class(
        config_class(
            d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=K, device="meta", dtype=dtype
        )
    )


def step_input(
    x: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0
) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 1.0},
        dead_neuron_mask=dead,
        n_training_steps=step,
        is_logging_step=True,
    )


@pytest.fixture
def grouped_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the grouped-matmul path run on meta, whose grouped_mm checks as CUDA's does."""
    monkeypatch.setattr(grouped_matmuls, "grouped_mm_handles", lambda *_: True)


def _zeros_like_host(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros(tensor.shape, dtype=tensor.dtype)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A meta tensor read by the host reads as zeros, as a GPU's would read as values."""

    def on_host(name: str, convert: Callable[[torch.Tensor], Any]) -> None:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.is_meta:
                return convert(_zeros_like_host(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    on_host("item", torch.Tensor.item)
    on_host("tolist", torch.Tensor.tolist)
    on_host("cpu", lambda host: host)
    on_host("numpy", torch.Tensor.numpy)
    on_host("__bool__", torch.Tensor.__bool__)
    on_host("__float__", torch.Tensor.__float__)
    on_host("__int__", torch.Tensor.__int__)
    on_host("__index__", torch.Tensor.__index__)


def assert_on_meta(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert tensor.device == META


@pytest.mark.parametrize("architecture", ["scale", "switch"])
@pytest.mark.parametrize("path", ["every_expert", "grouped"])
def test_training_step_and_encoders_run_with_every_tensor_on_meta(
    architecture: str, path: str, request: pytest.FixtureRequest
) -> None:
    dtype = "float32"
    if path == "grouped":
        request.getfixturevalue("grouped_on_meta")
        dtype = "bfloat16"  # meta's grouped_mm accepts what CUDA's fast kernel does
    sae = training_sae(architecture, dtype)
    x = torch.empty(3, 5, D_IN, device="meta", dtype=sae.dtype)
    dead = torch.zeros(D_SAE, dtype=torch.bool, device="meta")

    output = sae.training_forward_pass(step_input(x.flatten(0, 1), dead))
    output.loss.backward()
    code = sae.encode_sparse(x)

    assert_on_meta(output.loss, output.sae_out, *output.losses.values())
    assert_on_meta(*(p.grad for p in sae.parameters() if p.requires_grad))  # pyright: ignore[reportArgumentType]
    assert code.values.shape == code.latents.shape == (3, 5, K)
    assert sae.encode(x).shape == (3, 5, D_SAE)
    assert sae(x).shape == x.shape
    assert_on_meta(code.values, code.latents, sae.encode(x), sae(x))


def test_inference_sae_runs_on_meta() -> None:
    sae = ScaleSAE(
        ScaleSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=K, device="meta")
    )
    x = torch.empty(7, D_IN, device="meta")
    assert sae.encode_sparse(x).values.shape == (7, K)
    assert sae(x).device == META


@pytest.mark.usefixtures("host_reads")
@pytest.mark.filterwarnings("ignore::saelens_moe.router_health.RouterCollapseWarning")
def test_step_metrics_and_router_health_windows_run_on_meta() -> None:
    sae = training_sae("scale")
    expert_usage_monitor(sae, N_EXPERTS, window_steps=2)
    x = torch.empty(32, D_IN, device="meta")
    for step in range(4):
        output = sae.training_forward_pass(step_input(x, step=step))
        metrics = {
            name: value() if callable(value) else value
            for name, value in output.metrics.items()
        }
        assert "moe/load_balance_ratio" in metrics
    usage = expert_usage_monitor(sae, N_EXPERTS).last_usage
    assert usage is not None
    assert usage.last_step == 3


@pytest.mark.usefixtures("host_reads")
@pytest.mark.parametrize("architecture", ["scale", "switch"])
def test_compute_sae_metrics_with_activations_runs_on_meta(architecture: str) -> None:
    sae = training_sae(architecture)
    activations = torch.empty(40, D_IN, device="meta")

    metrics = compute_sae_metrics(sae, activations, n_batches=2)

    assert len(metrics.feature_dimensionality.per_expert) == N_EXPERTS
    assert metrics.expert_load is not None
    assert metrics.expert_load.n_tokens == 40
    assert len(route_activations(sae, activations).experts) == 40


@pytest.mark.usefixtures("host_reads")
def test_feature_dimensionality_weights_experts_by_usage_on_the_decoders_device() -> (
    None
):
    sae = training_sae("scale")
    layout = expert_layout(sae)
    result = feature_dimensionality(sae.W_dec, layout, usage=[0.5, 0.5, 0.5, 0.5])
    assert len(result.per_expert) == N_EXPERTS


@pytest.mark.usefixtures("host_reads")
def test_browser_collection_runs_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    # boolean masks on meta need a size; this switch takes every element as kept
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)
    sae = training_sae("scale")
    collector = Collector(sae, n_examples=3, window=2, n_bins=8, d_vocab=11)
    tokens = torch.randint(0, 11, (2, 6))
    collector.add(Batch(torch.empty(2, 6, D_IN, device="meta"), tokens))
    assert collector.n_tokens == 12
