import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from torch._dynamo.exc import BackendCompilerFailed

from saelens_moe import lazy_adam
from saelens_moe.lazy_adam import LazyAdam, by_latent
from saelens_moe.saes import scale_sae
from saelens_moe.saes.moe import feature_scaling_anchors
from saelens_moe.saes.scale_sae import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.saes.sparse_gradients import LatentRows
from saelens_moe.trainer import MoESAETrainer

D_IN = 16


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def make_sae(**overrides: Any) -> ScaleTrainingSAE:
    options: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": 64,
        "k": 4,
        "n_experts": 4,
        "n_active_experts": 2,
        "dead_latent_window": None,
    }
    return ScaleTrainingSAE(ScaleTrainingSAEConfig(**{**options, **overrides}))


def trainer_config(batch: torch.Tensor, lr: float = 1e-2) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=10**9,
        train_batch_size_samples=batch.shape[0],
        lr=lr,
        lr_end=lr,
        device="cpu",
    )


def batches(batch: torch.Tensor) -> Iterator[torch.Tensor]:
    while True:
        yield batch


def train(trainer: SAETrainer[Any, Any], batch: torch.Tensor, n_steps: int) -> None:
    for _ in range(n_steps):
        trainer.step(batch)


def every_latent_kept(sae: ScaleTrainingSAE) -> None:
    """k = e * m over all experts with positive pre-activations: every latent fires."""
    with torch.no_grad():
        sae.b_enc.fill_(20.0)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, left), (_, right) in zip(
        a.named_parameters(), b.named_parameters(), strict=True
    ):
        torch.testing.assert_close(left, right, atol=atol, rtol=1e-4, msg=name)


def test_LazyAdam_equals_SAELens_Adam_when_every_latent_is_touched() -> None:
    sae = make_sae(k=32, n_experts=2, n_active_experts=2, feature_scaling=False)
    every_latent_kept(sae)
    reference = copy.deepcopy(sae)
    start = sae.W_dec.detach().clone()
    batch = torch.randn(32, D_IN)
    lazy = MoESAETrainer(
        lazy_adam=True, cfg=trainer_config(batch), sae=sae, data_provider=batches(batch)
    )
    dense = SAETrainer(
        cfg=trainer_config(batch), sae=reference, data_provider=batches(batch)
    )
    train(lazy, batch, 5)
    train(dense, batch, 5)
    assert sae.W_enc.t().is_contiguous()  # stored by latent
    assert (sae.W_dec - start).abs().min(dim=-1).values.min() > 0  # all moved
    assert_same_weights(sae, reference, atol=1e-5)


def test_LazyAdam_with_feature_scaling_drops_only_the_mean_column_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = make_sae(k=32, n_experts=2, n_active_experts=2, feature_scaling=True)
    every_latent_kept(sae)
    with torch.no_grad():
        sae.omega.fill_(0.5)
    reference = copy.deepcopy(sae)
    batch = torch.randn(32, D_IN)
    lazy = MoESAETrainer(
        lazy_adam=True, cfg=trainer_config(batch), sae=sae, data_provider=batches(batch)
    )
    train(lazy, batch, 4)

    def anchors_without_mean_gradient(W_enc: torch.Tensor, *args: Any) -> torch.Tensor:
        return feature_scaling_anchors(W_enc.detach(), *args)

    monkeypatch.setattr(
        scale_sae, "feature_scaling_anchors", anchors_without_mean_gradient
    )
    dense = SAETrainer(
        cfg=trainer_config(batch), sae=reference, data_provider=batches(batch)
    )
    train(dense, batch, 4)
    assert_same_weights(sae, reference, atol=1e-5)


def reference_lazy_adam(
    weights: dict[str, torch.Tensor],  # by latent: [d_sae, ...] each
    grads: list[dict[int, dict[str, torch.Tensor]]],  # per step: latent -> rows
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """Lazy Adam written out latent by latent, in float64."""
    beta1, beta2 = betas
    out = {name: w.double().clone() for name, w in weights.items()}
    m = {name: torch.zeros_like(w) for name, w in out.items()}
    v = {name: torch.zeros_like(w) for name, w in out.items()}
    steps: dict[int, int] = {}
    for step_grads in grads:
        for latent, rows in step_grads.items():
            steps[latent] = steps.get(latent, 0) + 1
            t = steps[latent]
            for name, row in rows.items():
                g = row.double()
                m[name][latent] = beta1 * m[name][latent] + (1 - beta1) * g
                v[name][latent] = beta2 * v[name][latent] + (1 - beta2) * g * g
                m_hat = m[name][latent] / (1 - beta1**t)
                v_hat = v[name][latent] / (1 - beta2**t)
                out[name][latent] -= lr * m_hat / (v_hat.sqrt() + eps)
    return out


def recorded_step(
    touched: Any, names: tuple[str, ...]
) -> dict[int, dict[str, torch.Tensor]]:
    return {
        int(latent): dict(zip(names, (rows[i] for rows in touched.rows), strict=True))
        for i, latent in enumerate(touched.latents)
    }


def every_latent(
    step: dict[int, dict[str, torch.Tensor]], n_latents: int
) -> dict[int, dict[str, torch.Tensor]]:
    """A dense step: every latent updated, untouched ones with zero gradients."""
    zeros = {
        name: torch.zeros_like(row) for name, row in next(iter(step.values())).items()
    }
    return {latent: step.get(latent, zeros) for latent in range(n_latents)}


@pytest.mark.parametrize(
    ("dense_from", "block_bytes", "fused"),
    [
        (1.1, 2**20, None),
        (1.1, 3 * 4 * D_IN, None),
        (1.1, 3 * 4 * D_IN, True),
        (0.0, 2**20, None),
    ],
    ids=["lazy", "lazy_in_blocks_of_3_rows", "compiled_in_blocks_of_3", "dense"],
)
def test_LazyAdam_matches_a_latent_by_latent_reference_on_partial_touches(
    dense_from: float,
    block_bytes: int,
    fused: bool | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lazy_adam, "DENSE_STEP_FRACTION", dense_from)
    monkeypatch.setattr(lazy_adam, "BLOCK_BYTES", block_bytes)
    if fused:  # the compiled update must run, not fall back to the eager one
        monkeypatch.setattr(lazy_adam, "_adam_rows_eager", None)
    sae = make_sae(feature_scaling=False)
    names = ("W_enc", "W_dec", "b_enc")
    start = {
        name: by_latent(getattr(sae, name), int(name == "W_enc")).detach().clone()
        for name in names
    }
    optimizer = LazyAdam(sae, lr=0.05, fused=fused)
    recorded: list[dict[int, dict[str, torch.Tensor]]] = []
    for step in range(4):
        x = torch.randn(3, D_IN)  # 3 tokens * k 4: at most 12 of 64 latents
        loss = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={"load_balancing": 0.0},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        ).loss
        loss.backward()
        touched = optimizer.gather()
        assert 0 < touched.latents.numel() < sae.cfg.d_sae
        recorded.append(recorded_step(touched, names))
        optimizer.step()
        optimizer.zero_grad()
    lazy = dense_from > 1
    if not lazy:
        recorded = [every_latent(step, sae.cfg.d_sae) for step in recorded]
    expected = reference_lazy_adam(start, recorded, lr=0.05)
    ever_touched = set().union(*recorded)
    for name in names:
        actual = by_latent(getattr(sae, name), int(name == "W_enc")).detach()
        torch.testing.assert_close(
            actual.double(), expected[name], atol=1e-6, rtol=1e-5
        )
        untouched = [j for j in range(sae.cfg.d_sae) if j not in ever_touched]
        assert bool(untouched) == lazy
        assert torch.equal(actual[untouched], start[name][untouched])


def test_the_row_update_falls_back_to_eager_once_when_it_cannot_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = lazy_adam.CompiledRows()
    attempts: list[int] = []

    def no_compiler(*args: Any) -> torch.Tensor:
        attempts.append(1)
        missing = RuntimeError("InvalidCxxCompiler: no working C++ compiler")
        raise BackendCompilerFailed(no_compiler, missing, None)

    rows.update = no_compiler
    monkeypatch.setattr(lazy_adam, "COMPILED_ROWS", rows)
    gradient = LatentRows(torch.tensor([2, 7]), torch.randn(2, 4))
    start = torch.randn(10, 4)

    def two_steps(fused: bool | None) -> torch.Tensor:
        weight_and_moments = [start.clone(), torch.zeros(10, 4), torch.zeros(10, 4)]
        steps = torch.zeros(10)
        group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "fused": fused}
        for _ in range(2):
            lazy_adam.lazy_adam_rows(gradient, weight_and_moments, steps, group)
        return weight_and_moments[0]

    with pytest.warns(UserWarning, match="C\\+\\+ compiler.*op by op"):
        fallen_back = two_steps(fused=True)
    assert attempts == [1]  # not tried again
    assert not torch.equal(fallen_back, start)
    torch.testing.assert_close(fallen_back, two_steps(fused=None))


def test_a_dense_step_after_lazy_ones_keeps_each_latents_own_step_count() -> None:
    n_latents, d = 20, 4
    start = torch.randn(n_latents, d)
    weight = start.clone()
    exp_avg, exp_avg_sq = torch.zeros(n_latents, d), torch.zeros(n_latents, d)
    steps = torch.zeros(n_latents)
    group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "fused": None}
    lazy_step = LatentRows(torch.tensor([1, 5]), torch.randn(2, d))
    all_but_7 = torch.tensor([j for j in range(n_latents) if j != 7])  # 95%: dense
    dense_step = LatentRows(all_but_7, torch.randn(n_latents - 1, d))
    history = []
    for gradient in (lazy_step, dense_step):
        dense = gradient.latents.numel() >= 0.9 * n_latents
        moments = [weight, exp_avg, exp_avg_sq]
        lazy_adam.lazy_adam_rows(gradient, moments, steps, group, dense)
        rows = dict(zip(gradient.latents.tolist(), gradient.rows, strict=True))
        history.append({j: {"w": row} for j, row in rows.items()})
    history[1] = every_latent(history[1], n_latents)
    expected = reference_lazy_adam({"w": start}, history, lr=0.1)
    assert steps.tolist() == [1 + (j in (1, 5)) for j in range(n_latents)]
    torch.testing.assert_close(weight.double(), expected["w"], atol=1e-6, rtol=1e-5)


def test_LazyAdam_takes_dense_gradients_from_paths_that_do_not_collect_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from saelens_moe.saes import moe

    sae = make_sae(feature_scaling=False)
    plain = copy.deepcopy(sae)
    x = torch.randn(8, D_IN)
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={"load_balancing": 1.0},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    fast = LazyAdam(sae, lr=0.01)
    sae.training_forward_pass(step_input).loss.backward()
    collected = fast.gather()
    monkeypatch.setattr(scale_sae, "COMPUTE", moe)
    slow = LazyAdam(plain, lr=0.01)
    plain.training_forward_pass(step_input).loss.backward()
    from_dense = slow.gather()
    assert torch.equal(collected.latents, from_dense.latents)
    for ours, theirs in zip(collected.rows, from_dense.rows, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_lazy_adam_trains_a_compiled_forward_pass_as_an_eager_one() -> None:
    """SAELens's compile_sae compiles training_forward_pass; the sparse-gradient
    functions run eagerly inside it (graph breaks), with the same result. Three
    tokens touch at most 12 of the 64 latents: the steps are lazy ones, so the
    forward reuses the block sums and norms they kept."""
    sae = make_sae()
    eager = copy.deepcopy(sae)
    batch = torch.randn(3, D_IN)
    trainers = [
        MoESAETrainer(
            lazy_adam=True,
            cfg=trainer_config(batch),
            sae=s,
            data_provider=batches(batch),
        )
        for s in (sae, eager)
    ]
    sae.training_forward_pass = torch.compile(sae.training_forward_pass)  # pyright: ignore[reportAttributeAccessIssue]
    for trainer in trainers:
        train(trainer, batch, 4)
    optimizer = trainers[0].optimizer
    assert isinstance(optimizer, LazyAdam) and optimizer.last_touched_share is not None
    assert optimizer.last_touched_share < 0.5
    assert_same_weights(sae, eager, atol=1e-6)
