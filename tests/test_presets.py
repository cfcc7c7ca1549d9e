import math

import pytest

from saelens_moe import ScaleTrainingSAEConfig, SwitchTrainingSAEConfig
from saelens_moe.presets import paper_lr, paper_setting


def test_paper_lr_is_the_authors_at_their_width() -> None:
    assert paper_lr(2**14) == pytest.approx(2e-4)
    assert paper_lr(24576) == pytest.approx(1.633e-4, rel=1e-3)
    assert paper_lr(4 * 2**14) == pytest.approx(1e-4)


def test_paper_setting_turns_auxk_off_and_decays_over_the_last_fifth() -> None:
    setting = paper_setting(total_training_steps=10_000, d_sae=24576)
    assert setting.sae["aux_loss_coefficient"] == 0.0
    assert setting.sae["load_balancing_coefficient"] == 3.0
    assert setting.sae["router_init"] == "random"
    assert setting.runner["lr_decay_steps"] == 2_000
    assert setting.runner["lr_warm_up_steps"] == 0
    assert math.isclose(setting.runner["lr"], paper_lr(24576))


@pytest.mark.parametrize(
    "config_class", [ScaleTrainingSAEConfig, SwitchTrainingSAEConfig]
)
def test_paper_setting_builds_valid_training_configs(config_class: type) -> None:
    setting = paper_setting(100, d_sae=64)
    cfg = config_class(d_in=16, d_sae=64, n_experts=4, k=4, **setting.sae)
    assert cfg.aux_loss_coefficient == 0.0
    assert cfg.dead_latent_window is None


def test_paper_setting_runner_fields_exist_on_saelens_runner_configs() -> None:
    from dataclasses import fields

    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.synthetic import SyntheticSAERunnerConfig

    setting = paper_setting(100)
    for runner_config in (LanguageModelSAERunnerConfig, SyntheticSAERunnerConfig):
        names = {f.name for f in fields(runner_config)}
        assert set(setting.runner) <= names


@pytest.mark.parametrize(("steps", "d_sae"), [(0, 64), (10, 0)])
def test_paper_setting_refuses_impossible_sizes(steps: int, d_sae: int) -> None:
    with pytest.raises(ValueError, match=r"total_training_steps|d_sae"):
        paper_setting(steps, d_sae)


def test_paper_setting_on_cuda_trains_under_bfloat16_autocast() -> None:
    from dataclasses import fields

    from sae_lens import LanguageModelSAERunnerConfig

    for device in ("cuda", "cuda:1"):
        runner = paper_setting(100, device=device).runner
        assert runner["autocast"] is True
        assert set(runner) <= {f.name for f in fields(LanguageModelSAERunnerConfig)}
    for device in ("cpu", "mps"):
        assert "autocast" not in paper_setting(100, device=device).runner
