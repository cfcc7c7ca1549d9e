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


EPS = 1e-12
"""Adam's eps in the comparisons with dense Adam: what a waiting latent owes
neglects eps beside sqrt(v), and some gradient entries here are 6e-6, whose moves
in the first steps (when dense Adam's eps weighs 1 / sqrt(1 - beta2^s) less) would
come out 5% short with eps 1e-8."""


def dense_adam_reference(
    weights: dict[str, torch.Tensor],  # by latent: [d_sae, ...] each
    grads: list[dict[int, dict[str, torch.Tensor]]],  # per step: latent -> rows
    lr: float,
    eps: float = EPS,
) -> dict[str, torch.Tensor]:
    """PyTorch's Adam in float64 on the same gradient rows, zero for every latent
    a step did not touch: what lazy Adam must end at once caught up."""
    out = {name: torch.nn.Parameter(w.double().clone()) for name, w in weights.items()}
    adam = torch.optim.Adam(out.values(), lr=lr, eps=eps)
    for step_grads in grads:
        for name, weight in out.items():
            weight.grad = torch.zeros_like(weight)
            for latent, rows in step_grads.items():
                weight.grad[latent] = rows[name].double()
        adam.step()
    return {name: weight.detach() for name, weight in out.items()}


def recorded_step(
    touched: Any, names: tuple[str, ...]
) -> dict[int, dict[str, torch.Tensor]]:
    return {
        int(latent): dict(zip(names, (rows[i] for rows in touched.rows), strict=True))
        for i, latent in enumerate(touched.latents)
    }


@pytest.mark.parametrize(
    ("dense_from", "block_bytes", "fused", "catch_up_at"),
    [
        (1.1, 2**20, None, None),
        (1.1, 3 * 4 * D_IN, None, None),
        (1.1, 3 * 4 * D_IN, True, None),
        (1.1, 2**20, None, 2),
        (0.0, 2**20, None, None),
    ],
    ids=[
        "lazy",
        "lazy_in_blocks_of_3_rows",
        "compiled_in_blocks_of_3",
        "caught_up_midway",
        "dense",
    ],
)
def test_LazyAdam_caught_up_equals_dense_Adam_on_partial_touches(
    dense_from: float,
    block_bytes: int,
    fused: bool | None,
    catch_up_at: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six steps of 3 tokens (at most 12 of 64 latents each); then every latent
    pays what it owes and the weights are dense Adam's on the same gradients."""
    monkeypatch.setattr(lazy_adam, "DENSE_STEP_FRACTION", dense_from)
    monkeypatch.setattr(lazy_adam, "BLOCK_BYTES", block_bytes)
    if fused:  # the compiled update must run, not fall back to the eager one
        monkeypatch.setattr(lazy_adam, "_adam_rows_eager", None)
    sae = make_sae(feature_scaling=False)
    names = ("W_enc", "W_dec", "b_enc")

    def by_latents() -> dict[str, torch.Tensor]:
        return {
            name: by_latent(getattr(sae, name), int(name == "W_enc")).detach().clone()
            for name in names
        }

    start = by_latents()
    optimizer = LazyAdam(sae, lr=0.05, eps=EPS, fused=fused)
    recorded: list[dict[int, dict[str, torch.Tensor]]] = []
    for step in range(6):
        x = torch.randn(3, D_IN)
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
        if step == catch_up_at:
            optimizer.catch_up()
    before = by_latents()
    optimizer.catch_up()
    after = by_latents()
    expected = dense_adam_reference(start, recorded, lr=0.05)
    ever_touched = set().union(*recorded)
    never = [j for j in range(sae.cfg.d_sae) if j not in ever_touched]
    waiting = [j for j in ever_touched if j not in recorded[-1]]
    assert never and waiting
    for name in names:
        torch.testing.assert_close(
            after[name].double(), expected[name], atol=1e-6, rtol=1e-5
        )
        assert torch.equal(after[name][never], start[name][never])
        assert torch.equal(
            after[name][list(recorded[-1])], before[name][list(recorded[-1])]
        )
        moved = (after[name][waiting] - before[name][waiting]).abs().amax()
        assert bool(moved > 0) == (dense_from > 1)  # dense steps owe nothing


def take_steps(
    gradients: list[LatentRows],
    weight: torch.Tensor,
    fused: bool | None = None,
    lr: float = 0.1,
) -> torch.Tensor:
    """`lazy_adam_rows` on a weight by latent, one step per gradient (dense where it
    touches 90% of the rows), every latent caught up at the end."""
    weight_and_moments = [weight, torch.zeros_like(weight), torch.zeros_like(weight)]
    updated_at = torch.zeros(weight.shape[0])
    group = {"lr": lr, "betas": (0.9, 0.999), "eps": EPS, "fused": fused}
    coasting, state = lazy_adam.Coasting(group["betas"]), {}
    for gradient in gradients:
        dense = gradient.latents.numel() >= 0.9 * weight.shape[0]
        clock = coasting.begin_step(state, weight.device)
        lazy_adam.lazy_adam_rows(
            gradient, weight_and_moments, updated_at, group, clock, dense
        )
        coasting.end_step(state, lr)
    clock = coasting.now(state, weight.device)
    lazy_adam.catch_up_rows(weight_and_moments, updated_at, group, clock)
    return weight


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
    with pytest.warns(UserWarning, match="C\\+\\+ compiler.*op by op"):
        fallen_back = take_steps([gradient, gradient], start.clone(), fused=True)
    assert attempts == [1]  # not tried again
    assert not torch.equal(fallen_back, start)
    torch.testing.assert_close(fallen_back, take_steps([gradient] * 2, start.clone()))


def test_a_dense_step_after_lazy_ones_pays_what_the_waiting_latents_owe() -> None:
    n_latents, d = 20, 4
    start = torch.randn(n_latents, d)
    lazy_step = LatentRows(torch.tensor([1, 5]), torch.randn(2, d))
    all_but_7 = torch.tensor([j for j in range(n_latents) if j != 7])  # 95%: dense
    dense_step = LatentRows(all_but_7, torch.randn(n_latents - 1, d))
    steps = [lazy_step, lazy_step, dense_step, lazy_step]
    weight = take_steps(steps, start.clone())
    history = [
        {j: {"w": row} for j, row in zip(g.latents.tolist(), g.rows, strict=True)}
        for g in steps
    ]
    expected = dense_adam_reference({"w": start}, history, lr=0.1)
    torch.testing.assert_close(weight.double(), expected["w"], atol=1e-6, rtol=1e-5)


def test_what_a_waiting_latent_owes_is_dense_Adams_momentum_moves() -> None:
    """owed[t0] against the sum written out, with the lr changing every step."""
    betas = (0.9, 0.999)
    coasting, state = lazy_adam.Coasting(betas), {}
    lrs = [0.1 / (1 + s) for s in range(1, 41)]
    for lr in lrs:
        coasting.begin_step(state, torch.device("cpu"))
        coasting.end_step(state, lr)
    owed = coasting.now(state, torch.device("cpu")).owed
    ratio = betas[0] / betas[1] ** 0.5

    def c(s: int) -> float:
        return lrs[s - 1] * (1 - betas[1] ** s) ** 0.5 / (1 - betas[0] ** s)

    for t0 in (0, 1, 17, 39, 40):
        expected = sum(c(s) * ratio ** (s - t0) for s in range(t0 + 1, 41))
        assert float(owed[t0]) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_lazy_adam_refuses_momentum_that_outlasts_the_second_moment() -> None:
    with pytest.raises(ValueError, match=r"adam_beta1 < sqrt\(adam_beta2\).*0.99"):
        LazyAdam(make_sae(), lr=0.01, betas=(0.99, 0.9))


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


def test_fit_ends_with_every_latent_caught_up() -> None:
    """Five steps of 3 fresh tokens: latents touched earlier wait at the last step,
    and `fit()` returns with every latent's debt paid."""
    sae = make_sae()
    batch = torch.randn(3, D_IN)
    cfg = trainer_config(batch)
    cfg.total_training_samples = 5 * batch.shape[0]

    def fresh_batches() -> Iterator[torch.Tensor]:
        while True:
            yield torch.randn(3, D_IN)

    trainer = MoESAETrainer(
        lazy_adam=True, cfg=cfg, sae=sae, data_provider=fresh_batches()
    )
    trainer.fit()
    optimizer = trainer.optimizer
    assert isinstance(optimizer, LazyAdam) and optimizer.last_touched_share is not None
    assert optimizer.coasting.now(optimizer.state, sae.device).step == 5
    ever_updated = optimizer.state[sae.W_dec]["exp_avg_sq"].ne(0).any(dim=-1).sum()
    assert ever_updated > optimizer.last_touched_share * sae.cfg.d_sae  # some waited
    for parameter in optimizer.latent_params:
        assert torch.all(optimizer.state[parameter]["step"] == 5)
