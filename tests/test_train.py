"""The `saelens_moe.train` command line: SAELens's parser with our architectures and `--push`."""

import subprocess
import sys
from pathlib import Path

import pytest
from sae_lens import SAE

from saelens_moe import (
    ScaleSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchTrainingSAEConfig,
)
from saelens_moe.train import parse_args, run, split_args
from tests.helpers import TINY_D_MODEL, FakeHub, build_tiny_gpt2, build_token_dataset

HOOK = "blocks.0.hook_resid_post"


def test_parse_args_builds_a_scale_config_from_plugin_and_saelens_flags() -> None:
    cfg, publish = parse_args(
        [
            "--architecture", "scale",
            "--d_in", "64", "--d_sae", "256", "-k", "8",
            "--n_experts", "16", "--n_active_experts", "4",
            "--expert_weighting", "renormalized",
            "--nofeature_scaling",
            "--load_balancing_coefficient", "0.5",
            "--lr", "1e-4", "--hook_name", "blocks.3.hook_resid_post",
            "--push", "org/repo",
        ]
    )  # fmt: skip

    assert isinstance(cfg.sae, ScaleTrainingSAEConfig)
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k) == (64, 256, 8)
    assert (cfg.sae.n_experts, cfg.sae.n_active_experts) == (16, 4)
    assert cfg.sae.expert_weighting == "renormalized"
    assert cfg.sae.feature_scaling is False
    assert cfg.sae.load_balancing_coefficient == 0.5
    assert cfg.lr == 1e-4
    assert cfg.hook_name == "blocks.3.hook_resid_post"
    assert publish.push == "org/repo"
    assert publish.push_sae_id is None


def test_parse_args_builds_a_switch_config() -> None:
    cfg, publish = parse_args(
        ["--architecture", "switch", "--n_experts", "4", "-k", "8"]
    )

    assert isinstance(cfg.sae, SwitchTrainingSAEConfig)
    assert cfg.sae.n_active_experts == 1
    assert cfg.sae.n_experts == 4
    assert publish.push is None


def test_parse_args_refuses_an_impossible_expert_layout() -> None:
    with pytest.raises(ValueError, match="n_active_experts"):
        parse_args(
            ["--architecture", "scale", "--n_experts", "4", "--n_active_experts", "5"]
        )


def test_parse_args_takes_the_optimizer_flags() -> None:
    _, defaults = parse_args(["--architecture", "scale"])
    _, lazy = parse_args(["--architecture", "switch", "--lazy_adam", "--no_fused_adam"])

    assert (defaults.lazy_adam, defaults.fused_adam) == (False, True)
    assert (lazy.lazy_adam, lazy.fused_adam) == (True, False)


def test_parse_args_refuses_lazy_adam_for_other_architectures() -> None:
    with pytest.raises(ValueError, match="--lazy_adam needs --architecture scale"):
        parse_args(["--architecture", "topk", "--lazy_adam"])


def test_parse_args_refuses_lazy_adam_with_lasting_momentum() -> None:
    betas = ["--adam_beta1", "0.999", "--adam_beta2", "0.99"]
    with pytest.raises(ValueError, match=r"adam_beta1 < sqrt\(adam_beta2\)"):
        parse_args(["--architecture", "scale", "--lazy_adam", *betas])
    _, dense = parse_args(["--architecture", "scale", *betas])  # dense Adam takes them
    assert not dense.lazy_adam


def test_split_args_leaves_saelens_flags_alone() -> None:
    publish, rest = split_args(
        ["--push", "org/r", "--sae", "scale", "--push_sae_id", "x", "--push_private"]
    )

    assert publish[:3] == ("org/r", "x", True)
    assert publish.expert_parallel is False
    assert rest == ["--sae", "scale"]


def test_help_lists_architectures_plugin_fields_and_push(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--architecture", "scale", "--help"])

    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--push REPO_ID" in text
    choices = text.split("--architecture {")[1].split("}")[0].split(",")
    assert {"scale", "switch", "standard", "topk", "jumprelu"} <= set(choices)
    for flag in (
        "--n_experts",
        "--n_active_experts",
        "--expert_weighting",
        "--feature_scaling",
    ):
        assert flag in text
    assert "Number of experts N" in text  # from the config docstring


def test_run_trains_the_tiny_model_and_pushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    output = run(
        [
            "--architecture", "switch",
            "--d_in", str(TINY_D_MODEL), "--d_sae", "64", "--n_experts", "4", "-k", "4",
            "--hook_name", HOOK, "--context_size", "16",
            "--training_tokens", "1024", "--train_batch_size_tokens", "128",
            "--store_batch_size_prompts", "8", "--n_batches_in_buffer", "16",
            "--nolog_to_wandb", "--checkpoint_path", str(tmp_path / "ckpt"),
            "--output_path", str(tmp_path / "output"),
            "--push", "org/switch-saes", "--push_sae_id", "switch/layer0",
        ],
        override_model=build_tiny_gpt2(),
        override_dataset=build_token_dataset(),
    )  # fmt: skip

    assert output == tmp_path / "output"
    assert isinstance(SAE.load_from_disk(str(output)), SwitchSAE)
    assert "switch/layer0/sae_weights.safetensors" in hub.files("org/switch-saes")
    assert "README.md" in hub.files("org/switch-saes")


def test_run_scale_without_push_writes_a_loadable_sae(tmp_path: Path) -> None:
    output = run(
        [
            "--architecture", "scale",
            "--d_in", str(TINY_D_MODEL), "--d_sae", "64", "--n_experts", "4",
            "--n_active_experts", "2", "-k", "4",
            "--hook_name", HOOK, "--context_size", "16",
            "--training_tokens", "512", "--train_batch_size_tokens", "128",
            "--store_batch_size_prompts", "8", "--n_batches_in_buffer", "16",
            "--nolog_to_wandb", "--checkpoint_path", str(tmp_path / "ckpt"),
            "--output_path", str(tmp_path / "output"),
        ],
        override_model=build_tiny_gpt2(),
        override_dataset=build_token_dataset(),
    )  # fmt: skip

    assert output is not None
    assert isinstance(SAE.load_from_disk(str(output)), ScaleSAE)


@pytest.mark.parametrize(
    "command",
    [
        [str(Path(sys.executable).parent / "saelens-moe-train")],
        [sys.executable, "-m", "saelens_moe.train"],
    ],
    ids=["console-script", "python-m"],
)
def test_entry_points_show_help_with_the_plugin_architectures(
    command: list[str],
) -> None:
    result = subprocess.run(
        [*command, "--architecture", "scale", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "--push REPO_ID" in result.stdout
    assert "scale,switch" in result.stdout
    assert "--n_active_experts" in result.stdout
