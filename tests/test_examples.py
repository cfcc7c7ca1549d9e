"""The examples' `--smoke` runs (tiny local model, no network) and the paper recipe's config."""

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from sae_lens import SAE

from saelens_moe import ScaleSAE
from saelens_moe.lazy_adam import LazyAdam
from tests.helpers import FakeHub

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def smoke_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe's --smoke output, trained once for the tests that read it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        recipe = example("train_gpt2_layer8", monkeypatch)
        output = tmp_path_factory.mktemp("recipe") / "sae"
        return recipe.main(
            ["--smoke", "-e", "2", "-k", "16", "--output_path", str(output)]
        )


def test_recipe_config_is_the_papers_gpt2_layer8_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = example("train_gpt2_layer8", monkeypatch)
    args = recipe.parse_args(
        ["--n_active_experts", "4", "--k", "32", "--device", "cpu"]
    )
    cfg = recipe.runner_config(recipe.PAPER, args)

    assert (cfg.model_name, cfg.hook_name) == ("gpt2", "blocks.8.hook_resid_post")
    assert cfg.dataset_path == "Skylion007/openwebtext"
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.n_experts) == (768, 24_576, 64)
    assert (cfg.sae.n_active_experts, cfg.sae.k) == (4, 32)
    assert cfg.sae.expert_weighting == "softmax_of_probs"
    assert cfg.sae.feature_scaling is True
    assert cfg.sae.load_balancing_coefficient == 3.0
    assert cfg.sae.aux_loss_coefficient == 0.0
    assert cfg.train_batch_size_tokens == 8_192
    assert cfg.training_tokens == 10_000 * 8_192
    assert cfg.lr == pytest.approx(1.633e-4, rel=1e-3)
    assert (cfg.lr_scheduler_name, cfg.lr_decay_steps) == ("constant", 2_000)
    assert (cfg.adam_beta1, cfg.adam_beta2) == (0.9, 0.999)
    assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens
    assert cfg.autocast is False  # on the CPU


def test_recipe_trains_under_bfloat16_autocast_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = example("train_gpt2_layer8", monkeypatch)
    for device, autocast in [("cuda", True), ("cuda:1", True), ("cpu", False)]:
        fields = recipe.shared_runner_fields(recipe.PAPER, device, wandb=False)
        assert fields["autocast"] is autocast, device


def test_recipe_smoke_trains_a_loadable_scale_sae(smoke_sae: Path) -> None:
    sae = SAE.load_from_disk(str(smoke_sae))

    assert isinstance(sae, ScaleSAE)
    assert (sae.cfg.n_experts, sae.cfg.n_active_experts, sae.cfg.k) == (8, 2, 16)
    runner_cfg = json.loads((smoke_sae / "runner_cfg.json").read_text())
    assert runner_cfg["training_tokens"] == 8 * 64
    assert runner_cfg["lr_decay_steps"] == 1  # int(0.2 * 8 steps)


def test_recipe_smoke_push_uploads_under_hook_and_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    recipe = example("train_gpt2_layer8", monkeypatch)
    recipe.main(["--smoke", "--output_path", str(tmp_path / "sae"), "--push", "org/r"])

    assert "blocks.1.hook_resid_post/scale_e2_k32/cfg.json" in hub.files("org/r")


def test_sweep_smoke_trains_one_scale_sae_per_e_from_one_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = example("sweep", monkeypatch)
    folders = sweep.main(
        ["--smoke", "-e", "2", "8", "-k", "16", "--output_path", str(tmp_path)]
    )

    assert set(folders) == {"scale_e2_k16", "scale_e8_k16"}
    for e in (2, 8):
        sae = SAE.load_from_disk(str(folders[f"scale_e{e}_k16"]))
        assert isinstance(sae, ScaleSAE)
        assert sae.cfg.n_active_experts == e
    assert json.loads((tmp_path / "runner_cfg.json").read_text())["saes"]


def test_train_from_cache_smoke_caches_then_trains_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_cache = example("train_from_cache", monkeypatch)
    cache, output = tmp_path / "cache", tmp_path / "sae"
    from_cache.main(
        [
            "--smoke",
            "-k",
            "16",
            "--cache_path",
            str(cache),
            "--output_path",
            str(output),
        ]
    )

    from datasets import load_from_disk

    cached = load_from_disk(str(cache))
    assert "blocks.1.hook_resid_post" in cached.column_names
    assert len(cached) * 16 == 8 * 64  # every training token cached once
    runner_cfg = json.loads((output / "runner_cfg.json").read_text())
    assert runner_cfg["use_cached_activations"] is True
    assert runner_cfg["cached_activations_path"] == str(cache)
    assert isinstance(SAE.load_from_disk(str(output)), ScaleSAE)


def test_analyze_smoke_shows_routing_and_latents_of_the_selected_experts(
    smoke_sae: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    analyze = example("analyze", monkeypatch)
    png = tmp_path / "routing.png"
    uses = analyze.main(
        ["--smoke", "--sae_path", str(smoke_sae), "--png", str(png), "--device", "cpu"]
    )

    assert png.read_bytes().startswith(b"\x89PNG")
    assert len(uses) == 3
    block_size = 256 // 8
    for use in uses:
        assert use.experts.shape == (8, 2)
        torch.testing.assert_close(use.expert_weights.sum(-1), torch.ones(8))
        for experts, latents, values in zip(
            use.experts, use.latents, use.latent_values, strict=True
        ):
            active = latents[values > 0] // block_size
            assert set(active.tolist()) <= set(experts.tolist())
    out = capsys.readouterr().out
    assert "prompt 2:" in out
    assert "experts" in out


def test_recipe_smoke_trains_with_lazy_adam(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = example("train_gpt2_layer8", monkeypatch)
    trained: list[object] = []
    monkeypatch.setattr(
        recipe.MoESAETrainingRunner,
        "our_trainer",
        _recording(recipe.MoESAETrainingRunner.our_trainer, trained),
    )
    output = recipe.main(["--smoke", "--lazy_adam", "--output_path", str(tmp_path)])

    assert isinstance(SAE.load_from_disk(str(output)), ScaleSAE)
    [trainer] = trained
    assert isinstance(trainer.optimizer, LazyAdam)  # pyright: ignore[reportAttributeAccessIssue]


def _recording(method: Any, into: list[object]) -> Any:
    def record(self: Any, trainer: Any) -> Any:
        ours = method(self, trainer)
        into.append(ours)
        return ours

    return record
