import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from safetensors.torch import load_file, save_file

from saelens_moe import (
    ScaleSAE,
    ScaleSAEConfig,
    ScaleTrainingSAE,
    ScaleTrainingSAEConfig,
    SwitchSAE,
    SwitchTrainingSAE,
    SwitchTrainingSAEConfig,
    load_sae,
)
from saelens_moe.saes.moe import EXPERT_WEIGHTINGS, dense_forward
from tests.saes.reference import naive_forward

D_IN, D_SAE, N_EXPERTS = 12, 48, 6


@pytest.fixture(autouse=True)
def seed_and_float64() -> Any:
    """Reference comparisons run in float64, where only reordered sums differ."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_sae(**overrides: Any) -> ScaleTrainingSAE:
    """A Scale SAE whose every parameter is off its initial value, so each one matters."""
    fields: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "n_experts": N_EXPERTS,
        "n_active_experts": 3,
        "k": 10,
        "dtype": "float64",
        "router_init": "random",  # the router is set by hand below
        **overrides,
    }
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(**fields))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "W_lowpass":
                param.add_(0.1 * torch.randn_like(param))
            elif name == "omega":
                param.copy_(torch.linspace(-0.5, 0.8, param.numel()))
            else:
                param.copy_(torch.randn_like(param) * (0.3 if "b_" in name else 1.0))
    return sae


def step_input(x: torch.Tensor, dead: torch.Tensor | None = None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 3.0},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def grads_of(sae: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {
        name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None
    }


FEATURE_SCALING_MODES = [
    {"feature_scaling": False},
    {"feature_scaling": True, "learn_lowpass": False},
    {"feature_scaling": True, "learn_lowpass": True},
]


@pytest.mark.parametrize("expert_weighting", EXPERT_WEIGHTINGS)
@pytest.mark.parametrize(
    "scaling", FEATURE_SCALING_MODES, ids=["no_fs", "fs", "fs_lowpass"]
)
@pytest.mark.parametrize("leading_shape", [(9,), (3, 4)], ids=["2d", "3d"])
def test_ScaleTrainingSAE_matches_naive_reference_outputs_and_gradients(
    expert_weighting: str, scaling: dict[str, bool], leading_shape: tuple[int, ...]
) -> None:
    sae = make_sae(expert_weighting=expert_weighting, **scaling)
    x = torch.randn(*leading_shape, D_IN)
    target = torch.randn(*leading_shape, D_IN)

    feature_acts = sae.encode(x)
    sae_out = sae(x)
    fast_grads = grads_of(sae, ((sae(x) - target) ** 2).sum())

    flat_x = x.reshape(-1, D_IN)
    reference = naive_forward(sae, flat_x)
    reference_grads = grads_of(
        sae, ((reference.sae_out - target.reshape(-1, D_IN)) ** 2).sum()
    )

    torch.testing.assert_close(feature_acts.reshape(-1, D_SAE), reference.feature_acts)
    torch.testing.assert_close(sae_out.reshape(-1, D_IN), reference.sae_out)
    assert fast_grads.keys() == reference_grads.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


@pytest.mark.parametrize("expert_weighting", EXPERT_WEIGHTINGS)
def test_dense_masked_reference_agrees_with_naive_reference(
    expert_weighting: str,
) -> None:
    sae = make_sae(expert_weighting=expert_weighting)
    x = torch.randn(7, D_IN)
    naive, dense = naive_forward(sae, x), dense_forward(sae, x)
    torch.testing.assert_close(dense.feature_acts, naive.feature_acts)
    torch.testing.assert_close(dense.sae_out, naive.sae_out)


def test_ScaleTrainingSAE_training_forward_pass_matches_reference_mse() -> None:
    sae = make_sae()
    x = torch.randn(16, D_IN)
    output = sae.training_forward_pass(step_input(x))
    reference = naive_forward(sae, x)
    torch.testing.assert_close(output.sae_out, reference.sae_out)
    torch.testing.assert_close(output.feature_acts.to_dense(), reference.feature_acts)
    expected_mse = ((reference.sae_out - x) ** 2).sum(-1).mean()
    torch.testing.assert_close(output.losses["mse_loss"], expected_mse)
    total = sum(output.losses.values())
    assert isinstance(total, torch.Tensor)
    torch.testing.assert_close(output.loss, total)


def test_ScaleTrainingSAE_hidden_pre_is_zero_outside_selected_experts() -> None:
    sae = make_sae()
    x = torch.randn(8, D_IN)
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    sparse_hidden_pre = sae.training_forward_pass(step_input(x)).hidden_pre.to_dense()
    torch.testing.assert_close(sparse_hidden_pre, hidden_pre)
    assert torch.isfinite(hidden_pre).all()
    m = D_SAE // N_EXPERTS
    computed_experts = (hidden_pre.view(8, N_EXPERTS, m) != 0).any(dim=-1).sum(dim=-1)
    assert (computed_experts == sae.cfg.n_active_experts).all()


def topk_twin(sae: ScaleTrainingSAE) -> TopKTrainingSAE:
    twin = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=sae.cfg.k,
            aux_loss_coefficient=1.0,
            dtype="float64",
        )
    )
    state = {k: v for k, v in sae.state_dict().items() if k in twin.state_dict()}
    twin.load_state_dict(state)
    return twin


def test_one_expert_without_feature_scaling_equals_sae_lens_topk() -> None:
    sae = make_sae(
        n_experts=1,
        n_active_experts=1,
        feature_scaling=False,
        load_balancing_coefficient=0.0,
    )
    twin = topk_twin(sae)
    x = torch.randn(20, D_IN)
    dead = torch.rand(D_SAE) < 0.5

    ours = sae.training_forward_pass(step_input(x, dead))
    theirs = twin.training_forward_pass(step_input(x, dead))
    torch.testing.assert_close(ours.sae_out, theirs.sae_out)
    torch.testing.assert_close(ours.feature_acts.to_dense(), theirs.feature_acts)
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        torch.testing.assert_close(ours.losses[name], theirs.losses[name], msg=name)
    our_grads = grads_of(sae, ours.loss - ours.losses["load_balancing_loss"])
    their_grads = grads_of(twin, theirs.loss)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, msg=name)


def test_load_balancing_loss_follows_switch_transformer_formula_and_reaches_router() -> (
    None
):
    sae = make_sae()
    x = torch.randn(32, D_IN)
    loss = sae.training_forward_pass(step_input(x)).losses["load_balancing_loss"]

    probs = torch.softmax((x - sae.b_dec) @ sae.W_router + sae.b_router, dim=-1)
    first_choice = torch.bincount(probs.argmax(-1), minlength=N_EXPERTS) / 32
    expected = 3.0 * D_IN * N_EXPERTS * (first_choice * probs.mean(0)).sum()
    torch.testing.assert_close(loss, expected)

    grads = grads_of(sae, loss)
    assert grads["W_router"].abs().sum() > 0
    assert grads["b_router"].abs().sum() > 0


def test_ScaleTrainingSAE_coefficients_are_warmed_up_load_balancing() -> None:
    sae = make_sae(load_balancing_coefficient=0.5, load_balancing_warm_up_steps=7)
    coefficient = sae.get_coefficients()["load_balancing"]
    assert coefficient == (0.5, 7)


def test_ScaleTrainingSAE_loss_falls_on_one_batch() -> None:
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=6)
    )
    x = torch.randn(64, D_IN) * 3
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        output = sae.training_forward_pass(step_input(x))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.losses["mse_loss"].item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "scaling", FEATURE_SCALING_MODES, ids=["no_fs", "fs", "fs_lowpass"]
)
def test_exported_inference_sae_gives_training_outputs(
    tmp_path: Path, scaling: dict[str, bool]
) -> None:
    sae = make_sae(**scaling)
    x = torch.randn(2, 5, D_IN)
    sae.save_inference_model(tmp_path)

    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is ScaleSAE
    assert not hasattr(loaded, "omega")
    assert not hasattr(loaded, "W_lowpass")
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(loaded(x), sae(x))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


@pytest.mark.parametrize(
    "scaling", FEATURE_SCALING_MODES, ids=["no_fs", "fs", "fs_lowpass"]
)
def test_a_training_checkpoint_opens_as_the_inference_sae(
    tmp_path: Path, scaling: dict[str, bool]
) -> None:
    """`save_model` of the training SAE, as SAELens's checkpoints, loads as a ScaleSAE."""
    sae = make_sae(**scaling)
    x = torch.randn(2, 5, D_IN)
    sae.save_model(tmp_path)
    for loaded in (SAE.load_from_disk(tmp_path), load_sae(tmp_path)):
        assert type(loaded) is ScaleSAE
        assert not hasattr(loaded, "omega")
        torch.testing.assert_close(loaded(x), sae(x))
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_a_switch_training_checkpoint_opens_as_the_inference_sae(
    tmp_path: Path,
) -> None:
    sae = SwitchTrainingSAE(SwitchTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3))
    x = torch.randn(7, D_IN, dtype=torch.float32)
    sae.save_model(tmp_path)
    loaded = load_sae(tmp_path)
    assert type(loaded) is SwitchSAE
    torch.testing.assert_close(loaded(x), sae(x))


def test_a_checkpoint_with_a_misshapen_omega_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    sae = make_sae(feature_scaling=True)
    sae.save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    state = load_file(weights)
    save_file(state | {"omega": torch.zeros(3)}, weights)
    for loader in (SAE.load_from_disk, load_sae):
        with pytest.raises(ValueError, match="omega has shape"):
            loader(tmp_path)


def test_training_checkpoint_round_trip_keeps_every_parameter(tmp_path: Path) -> None:
    sae = make_sae()
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert type(loaded) is ScaleTrainingSAE
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_configs_round_trip_through_dicts() -> None:
    training_cfg = ScaleTrainingSAEConfig(
        d_in=8,
        d_sae=32,
        n_experts=4,
        n_active_experts=3,
        k=5,
        expert_weighting="uniform",
    )
    restored = ScaleTrainingSAEConfig.from_dict(training_cfg.to_dict())
    assert restored == training_cfg
    inference_dict = training_cfg.get_inference_sae_cfg_dict()
    inference_cfg = ScaleSAEConfig.from_dict(inference_dict)
    assert type(inference_cfg) is ScaleSAEConfig
    assert (inference_cfg.n_experts, inference_cfg.n_active_experts) == (4, 3)
    assert ScaleSAEConfig.from_dict(inference_cfg.to_dict()) == inference_cfg


def test_defaults_are_valid_at_sae_lens_command_line_sizes() -> None:
    cfg = ScaleTrainingSAEConfig(d_in=512, d_sae=1024)
    assert (cfg.n_experts, cfg.n_active_experts, cfg.k) == (8, 2, 100)
    assert cfg.expert_weighting == "softmax_of_probs"
    assert cfg.feature_scaling and cfg.learn_lowpass
    assert (cfg.load_balancing_coefficient, cfg.load_balancing_warm_up_steps) == (
        3.0,
        0,
    )
    assert cfg.rescale_acts_by_decoder_norm


def test_router_initialisation_is_small_random_with_zero_bias() -> None:
    sae = ScaleTrainingSAE(ScaleTrainingSAEConfig(d_in=64, d_sae=128, n_experts=8, k=4))
    bound = 64**-0.5
    assert sae.W_router.abs().max() <= bound
    assert sae.W_router.std() > bound / 4
    assert (sae.b_router == 0).all()
    assert (sae.omega == 0).all()
    torch.testing.assert_close(sae.W_lowpass, torch.eye(64, dtype=torch.float32))


def test_fold_activation_norm_scaling_factor_covers_the_router() -> None:
    sae = make_sae()
    x = torch.randn(10, D_IN)
    scaling_factor = 0.5
    expected = sae(x * scaling_factor) / scaling_factor
    sae.fold_activation_norm_scaling_factor(scaling_factor)
    torch.testing.assert_close(sae(x), expected)
    assert (sae.omega == 0).all()


def test_inference_fold_activation_norm_scaling_factor_covers_the_router(
    tmp_path: Path,
) -> None:
    make_sae().save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    x = torch.randn(10, D_IN)
    expected = sae(x * 3.0) / 3.0
    sae.fold_activation_norm_scaling_factor(3.0)
    torch.testing.assert_close(sae(x), expected)


def test_fold_W_dec_norm_folds_feature_scaling_first() -> None:
    sae = make_sae()
    x = torch.randn(10, D_IN)
    expected = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x), expected)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    assert (sae.omega == 0).all()


def test_fold_W_dec_norm_is_refused_without_decoder_norm_rescaling() -> None:
    sae = make_sae(rescale_acts_by_decoder_norm=False)
    before = copy.deepcopy(sae.state_dict())
    with pytest.raises(NotImplementedError, match="rescale_acts_by_decoder_norm"):
        sae.fold_W_dec_norm()
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_activation_whitening_keeps_outputs(apply_b_dec_to_input: bool) -> None:
    sae = make_sae(apply_b_dec_to_input=apply_b_dec_to_input)
    mean = torch.randn(D_IN)
    whitening = torch.randn(D_IN, D_IN) / D_IN**0.5 + torch.eye(D_IN)
    unwhitening = torch.linalg.inv(whitening)
    x = torch.randn(10, D_IN)
    expected = sae((x - mean) @ whitening) @ unwhitening + mean
    sae.fold_activation_whitening(mean, whitening, unwhitening)
    torch.testing.assert_close(sae(x), expected, atol=1e-4, rtol=1e-4)


def test_hooks_see_dense_latents_and_their_edits_take_effect() -> None:
    sae = make_sae()
    x = torch.randn(6, D_IN)
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            seen[name] = tensor.detach().clone()
            return tensor

        return hook

    sae.hook_sae_acts_pre.add_hook(record("pre"))
    sae.hook_sae_acts_post.add_hook(record("post"))
    out = sae(x)
    reference = naive_forward(sae, x)
    torch.testing.assert_close(seen["post"], reference.feature_acts)
    torch.testing.assert_close(out, reference.sae_out)
    assert seen["pre"].shape == (6, D_SAE)
    sae.reset_hooks()

    sae.hook_sae_acts_post.add_hook(lambda acts, hook: torch.zeros_like(acts))
    torch.testing.assert_close(sae(x), sae.b_dec.expand(6, D_IN))


REFUSED_CONFIGS = [
    ({"d_sae": 50, "n_experts": 6}, "d_sae"),
    ({"n_experts": 0}, "n_experts"),
    ({"n_experts": 49}, "n_experts"),
    ({"n_experts": 2.0}, "n_experts"),
    ({"n_active_experts": 0}, "n_active_experts"),
    ({"n_active_experts": 7}, "n_active_experts"),
    ({"n_active_experts": True}, "n_active_experts"),
    ({"k": 0}, "k"),
    ({"k": 25, "n_active_experts": 3}, "k"),
    ({"k": "8"}, "k"),
    ({"expert_weighting": "softmax"}, "expert_weighting"),
    ({"load_balancing_coefficient": -0.1}, "load_balancing_coefficient"),
    ({"load_balancing_coefficient": float("nan")}, "load_balancing_coefficient"),
    ({"aux_loss_coefficient": -1.0}, "aux_loss_coefficient"),
    ({"load_balancing_warm_up_steps": -1}, "load_balancing_warm_up_steps"),
    ({"feature_scaling": "yes"}, "feature_scaling"),
    ({"d_in": 0}, "d_in"),
    ({"dtype": "float17"}, "dtype"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations"),
    ({"normalize_activations": "sometimes"}, "normalize_activations"),
    ({"dead_latent_window": 0}, "dead_latent_window"),
    ({"dead_latent_window": 2.5}, "dead_latent_window"),
    ({"dead_latent_window": True}, "dead_latent_window"),
]


@pytest.mark.parametrize(("overrides", "field"), REFUSED_CONFIGS)
def test_ScaleTrainingSAEConfig_refuses_bad_values_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    fields = {"d_in": D_IN, "d_sae": D_SAE, "n_experts": N_EXPERTS, "k": 8, **overrides}
    with pytest.raises(ValueError, match=field):
        ScaleTrainingSAEConfig(**fields)


@pytest.mark.parametrize(("overrides", "field"), REFUSED_CONFIGS[:11])
def test_ScaleSAEConfig_refuses_bad_values_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    fields = {"d_in": D_IN, "d_sae": D_SAE, "n_experts": N_EXPERTS, "k": 8, **overrides}
    with pytest.raises(ValueError, match=field):
        ScaleSAEConfig(**fields)


def test_layer_norm_is_accepted_once_auxk_is_off() -> None:
    cfg = ScaleTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        n_experts=N_EXPERTS,
        k=8,
        normalize_activations="layer_norm",
        aux_loss_coefficient=0.0,
    )
    sae = ScaleTrainingSAE(cfg)
    x = torch.randn(4, D_IN) * 5 + 2
    assert sae.training_forward_pass(step_input(x)).loss.isfinite()


def test_loading_on_the_meta_device_then_assigning_weights(tmp_path: Path) -> None:
    sae = make_sae(dtype="float32")
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path, dtype="float64")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}


def test_encode_sparse_is_encode_without_the_zeros(tmp_path: Path) -> None:
    sae = make_sae()
    x = torch.randn(3, 4, D_IN)
    sae.save_inference_model(tmp_path)
    for model in (sae, SAE.load_from_disk(tmp_path, dtype="float64")):
        assert isinstance(model, ScaleSAE | ScaleTrainingSAE)
        values, latents = model.encode_sparse(x)
        assert values.shape == latents.shape == (3, 4, sae.cfg.k)
        dense = torch.zeros(3, 4, D_SAE).scatter(-1, latents, values)
        torch.testing.assert_close(dense, model.encode(x))
        graph_out = model(x)
        with torch.no_grad():  # the fused path gives the graph path's values
            torch.testing.assert_close(model.encode(x), dense)
            fused_values, _ = model.encode_sparse(x)
            torch.testing.assert_close(
                fused_values.sort(dim=-1).values, values.sort(dim=-1).values
            )
            torch.testing.assert_close(model(x), graph_out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_graph", [True, False])
def test_an_empty_batch_gives_empty_outputs(dtype: str, with_graph: bool) -> None:
    sae = make_sae(dtype=dtype)
    x = torch.empty(0, 3, D_IN, dtype=getattr(torch, dtype), requires_grad=with_graph)
    with torch.set_grad_enabled(with_graph):
        values, latents = sae.encode_sparse(x)
        assert values.shape == latents.shape == (0, 3, sae.cfg.k)
        assert sae.encode(x).shape == (0, 3, D_SAE)
        out = sae(x)
    assert out.shape == x.shape
    if with_graph:
        out.sum().backward()
        assert x.grad is not None
        assert sae.W_enc.grad is not None
        assert not sae.W_enc.grad.any()


def test_auxk_trains_dead_latents_at_their_weighted_scale() -> None:
    """AuxK reconstructs from w * pre, the value a latent competes with in the Top-K."""
    sae = make_sae(expert_weighting="probs", k=2, aux_loss_coefficient=1.0)
    x = torch.randn(16, D_IN)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    loss = sae.training_forward_pass(step_input(x, dead)).losses[
        "auxiliary_reconstruction_loss"
    ]

    reference = naive_forward(sae, x)
    sae_in = x - sae.b_dec
    probs = torch.softmax(sae_in @ sae.W_router + sae.b_router, dim=-1)
    top_probs, selected = probs.topk(sae.cfg.n_active_experts, dim=-1)
    m = D_SAE // N_EXPERTS
    scaled = (sae_in @ _effective_encoder(sae).T + sae.b_enc) * sae.W_dec.norm(dim=-1)
    weight_per_latent = torch.zeros_like(probs).scatter(1, selected, top_probs)
    weighted = scaled * weight_per_latent.repeat_interleave(m, dim=1)
    computed = weight_per_latent.repeat_interleave(m, dim=1) > 0
    k_aux = D_IN // 2
    values, latents = weighted.masked_fill(~computed, float("-inf")).topk(k_aux, dim=-1)
    unit_rows = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    recons = torch.einsum("tk,tkd->td", values, unit_rows[latents])
    residual = x - reference.sae_out
    expected = (recons - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(loss, expected.detach())


def _effective_encoder(sae: ScaleTrainingSAE) -> torch.Tensor:
    """W^ as [d_sae, d_in] rows, Feature Scaling applied."""
    from saelens_moe.saes.moe import fold_feature_scaling

    scaling = sae.feature_scaling_state()
    assert scaling is not None
    return fold_feature_scaling(sae.W_enc, scaling, N_EXPERTS).T


def _dead_step(x: torch.Tensor, step: int) -> TrainStepInput:
    """A step whose trainer mask marks nothing dead (SAELens's window not reached)."""
    return TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 3.0},
        dead_neuron_mask=torch.zeros(D_SAE, dtype=torch.bool),
        n_training_steps=step,
        is_logging_step=False,
    )


def test_latents_fired_are_the_latents_with_a_positive_dense_activation() -> None:
    sae = make_sae(k=4)
    x = torch.randn(5, D_IN)
    fired = sae._latents_fired(sae.encode_sparse(x))  # pyright: ignore[reportPrivateUsage]
    expected = (dense_forward(sae, x).feature_acts > 0).any(dim=0)
    assert torch.equal(fired, expected)
    assert 0 < int(fired.sum()) < D_SAE


@pytest.mark.parametrize("window", [1, 3])
def test_dead_latent_window_counts_steps_without_firing_then_starts_auxk(
    window: int,
) -> None:
    """A latent that has not fired for `window` steps is dead; before that AuxK is 0."""
    sae = make_sae(k=2, aux_loss_coefficient=1.0, dead_latent_window=window)
    x = torch.randn(3, D_IN)
    fired = sae._latents_fired(sae.encode_sparse(x))  # pyright: ignore[reportPrivateUsage]
    aux_losses = []
    for step in range(window + 1):
        output = sae.training_forward_pass(_dead_step(x, step))
        aux_losses.append(output.losses["auxiliary_reconstruction_loss"].item())
        expected_steps = torch.where(fired, 0, step + 1)
        assert torch.equal(sae.steps_since_fired, expected_steps)
    assert aux_losses[:window] == [0.0] * window
    assert aux_losses[window] > 0
    dead = sae._dead_latents(_dead_step(x, window))  # pyright: ignore[reportPrivateUsage]
    assert dead is not None and torch.equal(dead, ~fired)


def test_dead_latent_window_none_uses_only_the_trainers_mask() -> None:
    sae = make_sae(k=2, aux_loss_coefficient=1.0, dead_latent_window=None)
    x = torch.randn(3, D_IN)
    for step in range(3):
        output = sae.training_forward_pass(_dead_step(x, step))
        assert output.losses["auxiliary_reconstruction_loss"].item() == 0.0
    assert sae.steps_since_fired is None
    trainer_mask = torch.zeros(D_SAE, dtype=torch.bool)
    trainer_mask[:5] = True
    dead = sae._dead_latents(step_input(x, trainer_mask))  # pyright: ignore[reportPrivateUsage]
    assert dead is not None and torch.equal(dead, trainer_mask)


def test_dead_latent_window_adds_the_trainers_mask() -> None:
    sae = make_sae(k=2, aux_loss_coefficient=1.0, dead_latent_window=50)
    x = torch.randn(3, D_IN)
    sae.training_forward_pass(_dead_step(x, 0))
    trainer_mask = torch.zeros(D_SAE, dtype=torch.bool)
    trainer_mask[:5] = True
    dead = sae._dead_latents(step_input(x, trainer_mask))  # pyright: ignore[reportPrivateUsage]
    assert dead is not None and torch.equal(dead, trainer_mask)


def test_training_configs_start_decoder_rows_at_unit_norm() -> None:
    """decoder_init_norm defaults to 1.0 (SAELens: 0.1), and W_enc starts as W_dec.T."""
    for config_class in (ScaleTrainingSAEConfig, SwitchTrainingSAEConfig):
        cfg = config_class(d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=4)
        assert cfg.decoder_init_norm == 1.0
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, n_experts=N_EXPERTS, k=4, dtype="float64"
        )
    )
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_ScaleTrainingSAE_balanced_router_logs_loss_alpha_d_in_and_ratio_one() -> None:
    """The logged loss's floor is alpha * d_in; the companion ratio reads 1 there."""
    sae = make_sae(n_active_experts=1, k=4, feature_scaling=False)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_router.zero_()
        sae.W_router.zero_()
        sae.W_router[:N_EXPERTS].copy_(10 * torch.eye(N_EXPERTS))
    x = torch.eye(D_IN)[:N_EXPERTS].repeat(4, 1)  # each expert first for 4 tokens
    output = sae.training_forward_pass(step_input(x))

    alpha = sae.cfg.load_balancing_coefficient
    loss = output.losses["load_balancing_loss"]
    torch.testing.assert_close(loss, torch.tensor(alpha * D_IN))
    ratio = output.metrics["moe/load_balance_ratio"]
    assert callable(ratio)
    assert ratio() == pytest.approx(1.0)
