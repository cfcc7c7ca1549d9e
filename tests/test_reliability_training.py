"""Training failures that cost researchers hours: non-finite values, resuming,
precision and devices, router collapse."""

import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE

from saelens_moe import ScaleTrainingSAE
from saelens_moe.errors import NonFiniteLossError
from saelens_moe.loading import load_sae
from saelens_moe.router_health import (
    RouterCollapseWarning,
    expert_usage_monitor,
)
from saelens_moe.trainer import MoESAETrainingRunner
from tests.helpers import build_tiny_gpt2, build_token_dataset
from tests.reliability_runs import (
    CONTEXT,
    HOOK,
    activation_batches,
    make_trainer,
    new_sae,
    runner_config,
)


def snapshot(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in sae.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=0, msg=name)


def checkpoint_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("trainer_state.pt"))


# ------------------------------------------------------------------ non-finite


def test_nan_batch_stops_training_at_its_step_before_the_weights_change(
    tmp_path: Path,
) -> None:
    sae = new_sae()
    batches = activation_batches(12)
    batches[7][3, 5] = float("nan")
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def provider() -> Iterator[torch.Tensor]:
        for step, batch in enumerate(batches):
            if step == 7:
                seen["before"] = snapshot(sae)
            yield batch

    trainer = make_trainer(tmp_path, sae, provider(), n_steps=12, n_checkpoints=2)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    assert info.value.step == 7 == trainer.n_training_steps
    assert "training stopped at step 7" in str(info.value)
    assert "1 NaN or Inf activations" in str(info.value)
    assert_same(snapshot(sae), seen["before"])

    [checkpoint] = checkpoint_folders(tmp_path / "checkpoints")
    loaded = load_sae(checkpoint, training=True)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert isinstance(TrainingSAE.load_from_disk(checkpoint), ScaleTrainingSAE)


def test_loss_overflow_stops_training_and_says_the_input_was_finite(
    tmp_path: Path,
) -> None:
    sae = new_sae()

    def provider() -> Iterator[torch.Tensor]:
        for step, batch in enumerate(activation_batches(8)):
            if step == 4:  # weights blow up between steps
                with torch.no_grad():
                    sae.W_dec[:] = 1e38
            yield batch

    trainer = make_trainer(tmp_path, sae, provider(), n_steps=8)
    with pytest.raises(
        NonFiniteLossError, match=r"step 4: the loss is (nan|inf)"
    ) as info:
        trainer.fit()
    assert "the input batch is finite" in str(info.value)


class PoisonAfter:
    """A model hook that turns one activation into NaN on the n-th forward pass."""

    def __init__(self, n_calls: int) -> None:
        self.n_calls = n_calls
        self.calls = 0

    def __call__(self, activation: torch.Tensor, hook: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n_calls:
            activation = activation.clone()
            activation[0, -1, 0] = float("nan")
        return activation


def test_runner_stops_on_nan_activations_and_its_checkpoint_loads(
    tmp_path: Path,
) -> None:
    model = build_tiny_gpt2()
    poison = PoisonAfter(n_calls=10)
    model.add_hook(HOOK, poison)
    runner = LanguageModelSAETrainingRunner(
        runner_config(tmp_path, n_steps=12, n_checkpoints=1),
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=model,
    )
    with pytest.raises(NonFiniteLossError) as info:
        runner.run()
    # one LLM batch per training step, served in order: LLM call 10 is step 9
    assert info.value.step == 9
    assert all(torch.isfinite(p).all() for p in runner.sae.parameters())
    [checkpoint] = checkpoint_folders(Path(runner.cfg.checkpoint_path))
    loaded = load_sae(checkpoint, training=True)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert not (tmp_path / "output").exists()


# ---------------------------------------------------------------------- resume


RUNNERS: dict[str, Callable[..., LanguageModelSAETrainingRunner]] = {
    "saelens": LanguageModelSAETrainingRunner,
    "fused_adam": MoESAETrainingRunner,
    "lazy_adam": partial(MoESAETrainingRunner, lazy_adam=True),
}


def run_to_end(
    tmp_path: Path, model: torch.nn.Module, runner: str = "saelens", **overrides: Any
) -> LanguageModelSAETrainingRunner:
    torch.manual_seed(0)
    training = RUNNERS[runner](
        runner_config(tmp_path, n_steps=10, **overrides),
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=model,
    )
    training.run()
    return training


def test_lazy_adam_runner_refuses_lasting_momentum_before_loading_anything(
    tmp_path: Path,
) -> None:
    """No model or dataset is given: SAELens would fetch them from the Hub."""
    cfg = runner_config(tmp_path, adam_beta1=0.999, adam_beta2=0.99)
    with pytest.raises(ValueError, match=r"adam_beta1=0.999, adam_beta2=0.99"):
        MoESAETrainingRunner(cfg, lazy_adam=True)


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_resumed_run_ends_with_exactly_the_uninterrupted_weights(
    runner: str, tmp_path: Path
) -> None:
    model = build_tiny_gpt2()
    full = run_to_end(tmp_path / "full", model, runner, n_checkpoints=1)
    [checkpoint] = checkpoint_folders(Path(full.cfg.checkpoint_path))
    torch.manual_seed(123)  # a different seed: nothing may depend on the RNG
    resumed = run_to_end(
        tmp_path / "resumed", model, runner, resume_from_checkpoint=str(checkpoint)
    )
    assert_same(snapshot(resumed.sae), snapshot(full.sae))


def test_trainer_resume_restores_optimizer_schedules_and_dead_latent_stats(
    tmp_path: Path,
) -> None:
    """SAETrainer with a step-indexed data provider: bit-identical weights."""
    batches = activation_batches(12)
    kwargs: dict[str, Any] = {
        "n_steps": 12,
        "lr_warm_up_steps": 3,
        "lr_decay_steps": 4,
        "dead_feature_window": 2,
        "sae": {"load_balancing_warm_up_steps": 5},
    }
    full = make_trainer(
        tmp_path / "a", new_sae(), iter(batches), n_checkpoints=1, **kwargs
    )
    full.fit()
    [checkpoint] = checkpoint_folders(tmp_path / "a" / "checkpoints")
    steps_done = int(checkpoint.name) // batches[0].shape[0]

    sae = new_sae(load_balancing_warm_up_steps=5)
    resumed = make_trainer(tmp_path / "b", sae, iter(batches[steps_done:]), **kwargs)
    resumed.load_trainer_state(checkpoint)
    sae.load_weights_from_checkpoint(checkpoint)
    resumed.fit()
    assert_same(snapshot(sae), snapshot(full.sae))


# ---------------------------------------------------------- precision, devices


@pytest.mark.parametrize(
    ("dtype", "autocast"),
    [("float32", False), ("float64", False), ("bfloat16", False), ("float32", True)],
    ids=["float32", "float64", "bfloat16", "bfloat16-autocast"],
)
def test_training_steps_have_finite_loss_in_each_precision(
    tmp_path: Path, dtype: str, autocast: bool
) -> None:
    sae = new_sae(dtype=dtype)
    trainer = make_trainer(tmp_path, sae, iter([]), n_steps=4, autocast=autocast)
    for batch in activation_batches(4):
        output = trainer.step(batch)
        assert torch.isfinite(output.loss), output.losses
        trainer.n_training_steps += 1
    assert all(p.dtype == getattr(torch, dtype) for p in sae.parameters())
    assert all(torch.isfinite(p).all() for p in sae.parameters())


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_inference_under_autocast_matches_with_and_without_a_graph(
    autocast_dtype: torch.dtype,
) -> None:
    sae = new_sae()
    x = next(iter(activation_batches(1)))
    with torch.autocast("cpu", dtype=autocast_dtype):
        graph_acts, graph_out = sae.encode(x), sae(x)
        with torch.no_grad():
            fused_acts, fused_out = sae.encode(x), sae(x)
    assert fused_acts.dtype == graph_acts.dtype
    torch.testing.assert_close(fused_acts, graph_acts.detach())
    torch.testing.assert_close(fused_out, graph_out.detach())


def test_to_moves_router_and_feature_scaling_with_the_rest() -> None:
    sae = new_sae()
    names = {"W_router", "b_router", "omega", "W_lowpass"}
    assert names <= set(dict(sae.named_parameters()))
    sae.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in sae.parameters())
    assert sae.cfg.dtype == "float64"
    sae.to("meta")
    assert all(p.device.type == "meta" for p in sae.parameters())
    assert sae.cfg.device == "meta"


# ------------------------------------------------------------- router health


def collapsed_router(sae: ScaleTrainingSAE) -> None:
    with torch.no_grad():
        sae.W_router.zero_()
        sae.b_router.copy_(torch.tensor([50.0, 25.0, -50.0, -50.0]))


def test_router_collapse_gives_one_warning_with_the_numbers_and_metrics(
    tmp_path: Path,
) -> None:
    sae = new_sae(load_balancing_coefficient=0.0, router_init="random")
    collapsed_router(sae)
    expert_usage_monitor(sae, n_experts=4, window_steps=3)
    trainer = make_trainer(tmp_path, sae, iter([]), n_steps=9, lr=1e-6)
    outputs = []
    with pytest.warns(RouterCollapseWarning) as record:
        for batch in activation_batches(9):
            outputs.append(trainer.step(batch))
            trainer.n_training_steps += 1
    collapse = [w for w in record if issubclass(w.category, RouterCollapseWarning)]
    assert len(collapse) == 1
    message = str(collapse[0].message)
    assert "expert 0 was the first choice of 100.0% of tokens" in message
    assert "2 of 4 experts were never selected: [2, 3]" in message
    metrics = outputs[-1].metrics
    assert metrics["moe/window_dead_experts"]() == 2.0  # type: ignore[operator]
    assert metrics["moe/window_top_expert_share"]() == 1.0  # type: ignore[operator]


def test_healthy_router_gives_no_warning(tmp_path: Path) -> None:
    sae = new_sae()
    expert_usage_monitor(sae, n_experts=4, window_steps=2)
    trainer = make_trainer(tmp_path, sae, iter([]), n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouterCollapseWarning)
        for batch in activation_batches(4):
            trainer.step(batch)
            trainer.n_training_steps += 1
    usage = expert_usage_monitor(sae, n_experts=4).last_usage
    assert usage is not None and usage.healthy
    assert set(sae.state_dict()) == set(new_sae().state_dict())
