"""A Scale SAE trained, evaluated, saved, reloaded and spliced by SAELens's own code."""

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TrainingSAE,
)
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from safetensors.torch import load_file, save_file

from saelens_moe import ScaleSAE, ScaleTrainingSAE, ScaleTrainingSAEConfig, load_sae
from tests.helpers import TINY_D_MODEL, build_tiny_gpt2, build_token_dataset

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 16


def runner_config(output: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    fields: dict[str, Any] = {
        "sae": ScaleTrainingSAEConfig(
            d_in=TINY_D_MODEL, d_sae=128, n_experts=8, n_active_experts=2, k=8
        ),
        "model_name": "tiny-gpt2",
        "hook_name": HOOK,
        "dataset_path": "local-tokens",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
        "training_tokens": 24_000,
        "train_batch_size_tokens": 128,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 16,
        "lr": 3e-3,
        "device": "cpu",
        "logger": LoggingConfig(log_to_wandb=False),
        "output_path": str(output / "output"),
        "checkpoint_path": str(output / "checkpoints"),
        "verbose": False,
        **overrides,
    }
    return LanguageModelSAERunnerConfig(**fields)


def held_out_activations(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.tensor(
        build_token_dataset(n_rows=16, context_size=CONTEXT, seed=99)["tokens"]
    )
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)  # type: ignore[operator]
    return cache[HOOK].reshape(-1, TINY_D_MODEL)


def mse(sae: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return ((sae(x) - x) ** 2).sum(-1).mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("runner")
    model = build_tiny_gpt2()
    runner = LanguageModelSAETrainingRunner(
        runner_config(tmp, n_checkpoints=1),
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=model,
    )
    initial = copy.deepcopy(runner.sae)
    sae = runner.run()
    return {
        "model": model,
        "sae": sae,
        "initial": initial,
        "runner": runner,
        "tmp": tmp,
    }


def test_runner_trains_a_scale_sae_and_reconstruction_improves(
    trained: dict[str, Any],
) -> None:
    x = held_out_activations(trained["model"])
    assert isinstance(trained["sae"], ScaleTrainingSAE)
    assert mse(trained["sae"], x) < 0.5 * mse(trained["initial"], x)


def test_sae_lens_evals_report_explained_variance(trained: dict[str, Any]) -> None:
    model, sae = trained["model"], trained["sae"]
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=build_token_dataset(n_rows=64, context_size=CONTEXT, seed=5),
        context_size=CONTEXT,
        streaming=False,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        train_batch_size_tokens=128,
    )
    metrics, _ = run_evals(
        sae=sae,
        activation_store=store,
        model=model,
        activation_scaler=ActivationScaler(),
        eval_config=EvalConfig(
            batch_size_prompts=8,
            n_eval_reconstruction_batches=0,
            n_eval_sparsity_variance_batches=2,
            compute_ce_loss=False,
            compute_variance_metrics=True,
            compute_sparsity_metrics=True,
            compute_l2_norms=True,
        ),
    )
    assert metrics["reconstruction_quality"]["explained_variance"] > 0.5
    assert metrics["sparsity"]["l0"] == pytest.approx(8, abs=0.5)


LOAD_IN_FRESH_PROCESS = """
import sys
import saelens_moe
from safetensors.torch import load_file, save_file
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
x = load_file(sys.argv[2])["x"]
save_file({"out": sae(x).detach()}, sys.argv[3])
print(type(sae).__name__)
"""


def test_output_folder_loads_in_a_fresh_process(trained: dict[str, Any]) -> None:
    tmp: Path = trained["tmp"]
    x = held_out_activations(trained["model"])
    save_file({"x": x.contiguous()}, tmp / "x.safetensors")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_FRESH_PROCESS,
            str(tmp / "output"),
            str(tmp / "x.safetensors"),
            str(tmp / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "ScaleSAE"
    expected = trained["sae"](x).detach()
    torch.testing.assert_close(load_file(tmp / "out.safetensors")["out"], expected)


def test_loaded_sae_splices_into_hooked_sae_transformer(
    trained: dict[str, Any],
) -> None:
    model = trained["model"]
    spliced = HookedSAETransformer(model.cfg)
    spliced.load_state_dict(model.state_dict())
    sae = SAE.load_from_disk(Path(trained["tmp"]) / "output")
    assert isinstance(sae, ScaleSAE)
    tokens = torch.tensor(
        build_token_dataset(n_rows=2, context_size=CONTEXT, seed=3)["tokens"]
    )
    clean_logits = spliced(tokens)

    spliced.add_sae(sae)
    logits, cache = spliced.run_with_cache(tokens)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (2, CONTEXT, 128)
    assert ((acts != 0).sum(-1) <= 8).all()
    assert not torch.allclose(logits, clean_logits)
    spliced.reset_saes()

    spliced.add_sae(sae, use_error_term=True)
    torch.testing.assert_close(spliced(tokens), clean_logits, atol=1e-4, rtol=1e-4)


def test_training_resumes_from_a_checkpoint(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    checkpoints = sorted(Path(trained["runner"].cfg.checkpoint_path).iterdir())
    assert checkpoints, "the first run should have written a checkpoint"
    resumed = LanguageModelSAETrainingRunner(
        runner_config(tmp_path, resume_from_checkpoint=str(checkpoints[0])),
        override_dataset=build_token_dataset(n_rows=512, context_size=CONTEXT),
        override_model=trained["model"],
    )
    sae = resumed.run()
    x = held_out_activations(trained["model"])
    assert mse(sae, x) < 0.5 * mse(trained["initial"], x)
    assert (tmp_path / "output" / "cfg.json").exists()


def test_a_runner_checkpoint_opens_as_an_inference_sae(trained: dict[str, Any]) -> None:
    """SAELens writes checkpoints of the training SAE; they open as a ScaleSAE."""
    checkpoint_root = Path(trained["runner"].cfg.checkpoint_path)
    folders = sorted({cfg.parent for cfg in checkpoint_root.rglob("cfg.json")})
    assert folders, "the run should have written a checkpoint"
    training = TrainingSAE.load_from_disk(folders[0])
    assert isinstance(training, ScaleTrainingSAE)
    assert training.cfg.feature_scaling and training.cfg.learn_lowpass
    x = held_out_activations(trained["model"])
    with torch.no_grad():
        expected = training(x)
        for inference in (SAE.load_from_disk(folders[0]), load_sae(folders[0])):
            assert isinstance(inference, ScaleSAE)
            torch.testing.assert_close(inference(x), expected)
