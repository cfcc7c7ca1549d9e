"""Lazy Adam: a training step that writes only the latents the batch touched.

A Top-K SAE's batch reaches few of a wide dictionary's latents (`saes.sparse_gradients`);
dense Adam still zero-fills, reads and writes every weight, gradient and moment each
step. `LazyAdam` updates W_enc's columns, W_dec's rows and b_enc's entries only for
the latents whose gradient rows the step produced, the way embedding tables are
trained (PyTorch's `SparseAdam`), and the other weights (router, b_dec, omega,
W_lowpass) with PyTorch's Adam.

Unlike `SparseAdam` it ends where dense Adam ends. With a zero gradient dense Adam
still moves a weight, by its decaying momentum, for a few dozen steps; a latent that
waits owes those moves (`Coasting`), and pays them when it is next touched, with its
moments decayed by the steps it waited and the bias correction of the global step;
`LazyAdam.catch_up()` pays every latent's at once (our trainer calls it at each
checkpoint and after the last step). So the weights equal dense Adam's on the same
gradients, up to Adam's eps on the waiting steps. What differs is when waiting
latents move: a forward pass sees them where they last stopped. Measured in
`benchmarks/README.md` ("A step that writes only what the batch touched"): paid
when touched, the moves keep dense Adam's quality; dropped (`SparseAdam`'s way), a
wide dictionary ends with several times the dead latents.

Under Feature Scaling the gradient through each expert's mean column mu_i, which
reaches every latent of the expert, is dropped (omega and W_lowpass keep their exact
gradients).

W_enc is stored by latent (the transpose of a contiguous [d_sae, d_in]), so a
latent's column is one contiguous row, as W_dec's; its moments likewise.

The forward's block sums and decoder norms are updated on the touched rows
(`saes.summaries`) rather than recomputed from the whole dictionary, so beyond the
routed matmul's read of W_enc a step reads and writes only what the batch touched.
With `fused=True` (our trainer's default) the touched rows' moments are updated by
one compiled kernel (`CompiledRows`) instead of a dozen eager passes.
"""

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch.optim import Optimizer
from torch.optim.adam import adam
from typing_extensions import override

from saelens_moe.saes.scale_sae import ScaleTrainingSAE
from saelens_moe.saes.sparse_gradients import (
    EXPERT_ROW_PARAMETERS,
    LatentRows,
    SparseExpertGradients,
    sum_parts,
)
from saelens_moe.saes.summaries import RowUpdateHook


class TouchedGradients(NamedTuple):
    """One step's gradient of the expert weights, on the latents it touched."""

    latents: torch.Tensor
    """The touched latents, sorted. [n]"""
    rows: list[torch.Tensor]
    """Each expert weight's gradient rows at `latents` (zero where that weight got
    none), in the order of the optimizer's latent group. [n, d_in] or [n]"""
    share: float
    """The share of the whole dictionary touched (over every process's experts)."""

    def dense_step(self) -> bool:
        """Whether this step touches nearly every latent: dense Adam runs."""
        return self.share >= DENSE_STEP_FRACTION


class LazyAdam(Optimizer):
    """Adam with lazy per-latent updates of a Scale or Switch SAE's expert weights.

    The SAE's `sparse_gradients` is set to this optimizer's collector, so the fast
    path hands it gradient rows instead of dense gradients. After `backward()`,
    `gather()` puts the step's rows in `touched` (to average or clip them), and
    `step()` updates. `catch_up()` pays what waiting latents owe (module docstring),
    so the weights are dense Adam's: before they are saved or training ends.

    Args:
        sae: The training SAE (its W_enc, W_dec and b_enc are updated lazily).
        lr: Learning rate (SAELens's schedulers set it per step).
        betas: Adam's (beta1, beta2), beta1 < sqrt(beta2) (as Adam's defaults): a
            waiting latent's momentum then fades, so what it owes is finite.
        eps: Adam's epsilon.
        fused: PyTorch's fused Adam for the dense weights and a compiled update of
            the touched rows (`CompiledRows`); None: PyTorch's default Adam and the
            eager row update.
    """

    def __init__(
        self,
        sae: ScaleTrainingSAE,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        named = dict(sae.named_parameters())
        defaults = {"lr": lr, "betas": betas, "eps": eps, "fused": fused}
        self.coasting = Coasting(betas)
        # one group, as SAELens's Adam: a resumed SAELens run loads this state into
        # the trainer it builds first (and ours loads it again)
        super().__init__([{"params": list(named.values())}], defaults)
        self.latent_params = [named[name] for name in EXPERT_ROW_PARAMETERS]
        """W_enc, W_dec and b_enc: updated on touched latents."""
        self.dense_params = [
            p for name, p in named.items() if name not in EXPERT_ROW_PARAMETERS
        ]
        """The router, b_dec, omega, W_lowpass: PyTorch's Adam."""
        self.gradients = SparseExpertGradients()
        self.touched: TouchedGradients | None = None
        """This step's gradient rows, from `gather()` until `step()`."""
        self.last_touched_share: float | None = None
        """The share of the dictionary the last `step()` updated."""
        store_by_latent(named["W_enc"])
        sae.sparse_gradients = self.gradients

    @torch.no_grad()
    def gather(self) -> TouchedGradients:
        """This step's touched latents and rows, from the collector and from any
        dense gradient an expert weight received (which is then cleared)."""
        parameters = self.latent_params
        parts = [
            _with_dense_gradient(self.gradients.take(name), parameter, axis)
            for name, parameter, axis in zip(
                EXPERT_ROW_PARAMETERS, parameters, LATENT_AXES, strict=True
            )
        ]
        shapes = [
            by_latent(p, axis).shape[1:]
            for p, axis in zip(parameters, LATENT_AXES, strict=True)
        ]
        latents, rows = align_rows(parts, shapes, parameters[0])
        n_latents = parameters[1].shape[0]  # W_dec's rows
        self.touched = TouchedGradients(latents, rows, latents.numel() / n_latents)
        return self.touched

    @override
    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Adam on the dense weights; lazy Adam on the touched latents."""
        del closure
        touched = self.touched if self.touched is not None else self.gather()
        group = self.param_groups[0]
        self._dense_step(group)
        clock = self.coasting.begin_step(self.state, self.latent_params[0].device)
        self._latent_step(group, touched, clock)
        self.coasting.end_step(self.state, group["lr"])
        self.last_touched_share = touched.share
        self.touched = None

    @torch.no_grad()
    def catch_up(self) -> None:
        """Every waiting latent makes the moves it owes: the expert weights and
        moments become dense Adam's at this step. The kept block sums and decoder
        norms (`saes.summaries`) are dropped, to be recomputed from the weights."""
        group = self.param_groups[0]
        clock = self.coasting.now(self.state, self.latent_params[0].device)
        for parameter, axis in zip(self.latent_params, LATENT_AXES, strict=True):
            state = self.state[parameter]
            if state:
                weight_and_moments = [
                    by_latent(t, axis) for t in (parameter, *_moments(state))
                ]
                catch_up_rows(weight_and_moments, state["step"], group, clock)
        self.gradients.summaries.forget()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.coasting.own(self.state)

    @override
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.gradients.clear()
        self.touched = None

    def _dense_step(self, group: dict[str, Any]) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for parameter in self.dense_params:
            if parameter.grad is not None:
                params.append(parameter)
                grads.append(parameter.grad)
        if not params:
            return
        states = [self._dense_state(p, group) for p in params]
        _adam(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [state["step"] for state in states],
            group,
        )

    def _dense_state(
        self, parameter: torch.Tensor, group: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        state = self.state[parameter]
        if not state:  # as torch.optim.Adam: the step on the device only when fused
            device = parameter.device if group["fused"] else None
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(parameter)
            state["exp_avg_sq"] = torch.zeros_like(parameter)
        return state

    def _latent_step(
        self, group: dict[str, Any], touched: TouchedGradients, clock: "Clock"
    ) -> None:
        latents = touched.latents
        if latents.numel() == 0:
            return
        hooks = self._summary_updaters(touched.dense_step())
        for parameter, grad, axis, hook in zip(
            self.latent_params, touched.rows, LATENT_AXES, hooks, strict=True
        ):
            state = self._latent_state(parameter, axis)
            lazy_adam_rows(
                LatentRows(latents, grad),
                [by_latent(t, axis) for t in (parameter, *_moments(state))],
                state["step"],
                group,
                clock,
                touched.dense_step(),
                hook,
            )
        W_enc, W_dec, _ = self.latent_params
        self.gradients.summaries.updated(W_enc, W_dec)

    def _summary_updaters(self, dense: bool) -> list[RowUpdateHook | None]:
        """Per latent weight, what keeps the forward's summaries of it current as
        its rows change (`saes.summaries`); a dense step recomputes them instead."""
        summaries = self.gradients.summaries
        if dense:
            summaries.forget()
            return [None] * len(self.latent_params)
        W_enc, W_dec, _ = self.latent_params
        return [
            summaries.encoder_updater(W_enc),
            summaries.decoder_updater(W_dec),
            None,
        ]

    def _latent_state(
        self, parameter: torch.Tensor, axis: int
    ) -> dict[str, torch.Tensor]:
        state = self.state[parameter]
        if not state:  # "step": the global step of each latent's last update
            n_latents = parameter.shape[axis]
            device = parameter.device
            state["step"] = torch.zeros(n_latents, dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(parameter)  # in W_enc's layout
            state["exp_avg_sq"] = torch.zeros_like(parameter)
        return state


DENSE_STEP_FRACTION = 0.9
"""Touched share of the dictionary from which a step runs dense Adam. Measured on
CPU (benchmarks/README.md): at 72% touched the gathered update still beat dense
Adam (0.45 s against 0.57 s at d_sae 98304); near 100% gathering only adds work."""
LATENT_AXES = (1, 0, 0)
"""The latent axis of W_enc [d_in, d_sae], W_dec [d_sae, d_in] and b_enc [d_sae]."""


class Clock(NamedTuple):
    """The global step being taken, and what waiting latents owe at it."""

    step: int
    owed: torch.Tensor
    """owed[s]: the moves, per unit of m / sqrt(v), that a latent last updated at
    step s owes for the steps since (`Coasting`). [> step]"""


class Coasting:
    """Dense Adam's moves of a latent that waits, owed until it is touched again.

    With a zero gradient from step t0 on, dense Adam moves a weight at step s by
    lr_s / bc1_s * beta1^j m / (beta2^(j/2) sqrt(v) / sqrt(bc2_s) + eps), j = s - t0
    (m, v: its moments after t0; bc1_s = 1 - beta1^s, bc2_s = 1 - beta2^s). Beside
    sqrt(v), eps is negligible, so that is m / sqrt(v) * c_s * r^j with
    c_s = lr_s sqrt(bc2_s) / bc1_s and r = beta1 / sqrt(beta2): a latent owes
    m / sqrt(v) times owed[t0] = the sum of c_s r^(s - t0) over the steps it waited.
    Each step adds its c_s to owed[] of the `horizon` steps before it (r^horizon is
    below 2^-40); the sums live in the optimizer's state, for checkpoints.
    """

    KEY = "coasting"
    """The optimizer state's entry: {"step": global step, "owed": float32 sums}."""
    TOLERANCE = 2.0**-40

    def __init__(self, betas: tuple[float, float]) -> None:
        check_betas(betas)
        beta1, beta2 = betas
        self.betas = betas
        ratio = beta1 / math.sqrt(beta2)
        self.horizon = (
            math.ceil(math.log(self.TOLERANCE) / math.log(ratio)) if ratio > 0 else 0
        )
        self.powers = ratio ** torch.arange(self.horizon, 0, -1, dtype=torch.float64)
        """r^horizon ... r^1: what step t adds to owed[t - horizon] ... owed[t - 1]."""

    def now(self, state: dict[Any, Any], device: torch.device) -> Clock:
        """The last step taken, and what is owed at its end."""
        entry = self._entry(state)
        owed = entry["owed"].to(device)
        if owed.numel() <= entry["step"] + 1:  # room for this step and the next
            grown = owed.new_zeros(max(2 * owed.numel(), entry["step"] + 2))
            grown[: owed.numel()] = owed
            owed = grown
        entry["owed"] = owed
        return Clock(entry["step"], owed)

    def begin_step(self, state: dict[Any, Any], device: torch.device) -> Clock:
        """Advance the global step."""
        self._entry(state)["step"] += 1
        return self.now(state, device)

    def _entry(self, state: dict[Any, Any]) -> dict[str, Any]:
        return state.setdefault(self.KEY, {"step": 0, "owed": torch.zeros(1)})

    def end_step(self, state: dict[Any, Any], lr: float) -> None:
        """Owe this step's coasting to the latents it did not touch."""
        beta1, beta2 = self.betas
        entry = state[self.KEY]
        step, owed = entry["step"], entry["owed"]
        c = float(lr) * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        first = max(0, step - self.horizon)
        powers = self.powers[self.horizon - (step - first) :]
        owed[first:step] += (c * powers).to(owed)

    def own(self, state: dict[Any, Any]) -> None:
        """A loaded entry, copied: another optimizer may have loaded the same."""
        entry = state.get(self.KEY)
        if entry is not None:
            state[self.KEY] = {
                "step": int(entry["step"]),
                "owed": entry["owed"].clone(),
            }


def check_betas(betas: tuple[float, float]) -> None:
    """Lazy Adam needs momentum that fades faster than the second moment, or what a
    waiting latent owes never stops growing."""
    beta1, beta2 = betas
    if not 0 <= beta1 < math.sqrt(beta2):
        raise ValueError(
            f"lazy Adam needs 0 <= adam_beta1 < sqrt(adam_beta2), so a waiting "
            f"latent's momentum fades (Adam's defaults 0.9, 0.999 do); got "
            f"adam_beta1={beta1}, adam_beta2={beta2}"
        )


def lazy_adam_rows(
    gradient: LatentRows,
    weight_and_moments: list[torch.Tensor],  # [d_sae, ...] each, by latent
    updated_at: torch.Tensor,  # [d_sae] float32: the step of each latent's last update
    group: dict[str, Any],
    clock: Clock,
    dense: bool = False,
    after_block: RowUpdateHook | None = None,
) -> None:
    """Dense Adam's update at `clock.step` on the gradient's latents only, each first
    making the moves it owes for the steps it waited (`Coasting`).

    Gathers the touched rows, updates them and scatters them back, a block of rows
    at a time, each block then handed to `after_block`. With `dense` (a step
    touching nearly every latent: `TouchedGradients.dense_step`) every latent is
    updated, faster there (and no `after_block` is called).
    """
    if dense:
        _dense_adam_rows(gradient, weight_and_moments, updated_at, group, clock)
        return
    latents, grad = gradient
    last_updates = updated_at.index_select(0, latents)
    updated_at.index_fill_(0, latents, float(clock.step))
    block = _rows_per_block(grad)
    for start in range(0, latents.shape[0], block):
        rows = slice(start, start + block)
        _adam_on_rows(
            LatentRows(latents[rows], grad[rows]),
            weight_and_moments,
            last_updates[rows],
            group,
            clock,
            after_block,
        )


BLOCK_BYTES = 4 * 1024**2
"""Rows of gradient a CPU updates at a time: the update's temporaries then stay in
cache (1.5-2x faster at 100k rows of 768 here); GPUs take every row at once."""
CATCH_UP_BYTES = 256 * 1024**2
"""Rows of a weight `catch_up_rows` moves at a time on any device, so paying every
latent's debt needs temporaries of this size, not of the dictionary's."""


def _rows_per_block(grad: torch.Tensor) -> int:
    if grad.device.type != "cpu":
        return max(1, grad.shape[0])
    return _rows_in(grad, BLOCK_BYTES)


def _rows_in(rows: torch.Tensor, n_bytes: int) -> int:
    row_bytes = rows[:1].numel() * rows.element_size()
    return max(1, n_bytes // max(1, row_bytes))


def _adam_on_rows(
    gradient: LatentRows,
    weight_and_moments: list[torch.Tensor],
    last_updates: torch.Tensor,  # [n]: the step of each row's previous update
    group: dict[str, Any],
    clock: Clock,
    after_block: RowUpdateHook | None = None,
) -> None:
    latents, grad = gradient
    beta1, beta2 = group["betas"]
    decay1, decay2, owed = _waiting(last_updates, group, clock, grad.dim())
    device = grad.device
    block = AdamRows(
        latents,
        grad,
        decay1,
        decay2,
        owed,
        torch.tensor(float(group["lr"]) / (1 - beta1**clock.step), device=device),
        torch.tensor(math.sqrt(1 - beta2**clock.step), device=device),
        beta1,
        beta2,
        group["eps"],
    )
    weight, exp_avg, exp_avg_sq = weight_and_moments
    added = None
    if group["fused"] and COMPILED_ROWS.usable(grad.device):
        added = COMPILED_ROWS(exp_avg, exp_avg_sq, block)
    if added is None:
        added = _adam_rows_eager(exp_avg, exp_avg_sq, block)
    weight.index_add_(0, latents, added)
    if after_block is not None:
        after_block(latents, added)


class AdamRows(NamedTuple):
    """One block of touched rows and what Adam needs to update them."""

    latents: torch.Tensor
    """[n]"""
    grad: torch.Tensor
    """[n, ...]"""
    decay1: torch.Tensor
    """beta1 ^ steps since each row's previous update. [n, 1...]"""
    decay2: torch.Tensor
    """beta2 ^ the same. [n, 1...]"""
    owed: torch.Tensor
    """Each row's coasting moves per unit of m / sqrt(v) (`Coasting`). [n, 1...]"""
    step_size: torch.Tensor
    """lr / bias correction 1 of the global step. []"""
    bias_correction2_sqrt: torch.Tensor
    """[]"""
    beta1: float
    beta2: float
    eps: float


def _waiting(
    last_updates: torch.Tensor, group: dict[str, Any], clock: Clock, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, from the step of its previous update: beta1 and beta2 to the steps
    since (decay1, decay2) and what it owes (`Coasting`). Each [n, 1...]"""
    beta1, beta2 = group["betas"]
    shape = (-1,) + (1,) * (dim - 1)
    waited = (clock.step - last_updates).view(shape)
    owed = clock.owed.index_select(0, last_updates.long()).view(shape)
    return torch.pow(beta1, waited), torch.pow(beta2, waited), owed


def _adam_rows_eager(
    exp_avg: torch.Tensor,  # [d_sae, ...] by latent
    exp_avg_sq: torch.Tensor,
    block: AdamRows,
) -> torch.Tensor:
    """Adam's moments on the block's rows, op by op, and what to add to their
    weights: the moves they owe and this step's. [n, ...]"""
    latents, grad = block.latents, block.grad
    moment1 = exp_avg.index_select(0, latents)
    moment2 = exp_avg_sq.index_select(0, latents)
    coasted = moment1 / moment2.sqrt().add_(block.eps)
    coasted.mul_(block.owed)
    moment1.mul_(block.decay1).add_(grad, alpha=1 - block.beta1)
    moment2.mul_(block.decay2).addcmul_(grad, grad, value=1 - block.beta2)
    exp_avg.index_copy_(0, latents, moment1)
    exp_avg_sq.index_copy_(0, latents, moment2)
    denom = moment2.sqrt_().div_(block.bias_correction2_sqrt).add_(block.eps)
    return moment1.div_(denom).mul_(block.step_size).add_(coasted).neg_()


def _adam_rows_fused(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    block: AdamRows,
) -> torch.Tensor:
    """`_adam_rows_eager` written for the compiler, which makes it one kernel that
    reads and writes each moment row once."""
    latents, grad = block.latents, block.grad
    previous1, previous2 = exp_avg[latents], exp_avg_sq[latents]
    coasted = block.owed * previous1 / (previous2.sqrt() + block.eps)
    moment1 = block.decay1 * previous1 + (1 - block.beta1) * grad
    moment2 = block.decay2 * previous2 + (1 - block.beta2) * grad * grad
    exp_avg[latents] = moment1
    exp_avg_sq[latents] = moment2
    denom = moment2.sqrt() / block.bias_correction2_sqrt + block.eps
    return -(block.step_size * moment1 / denom + coasted)


class CompiledRows:
    """`_adam_rows_fused` under `torch.compile` (one graph for any number of rows), on
    the devices inductor generates kernels for. Where compiling fails (a CPU without
    a working C++ compiler) it warns once and returns None, so the eager update runs.
    """

    DEVICES = ("cpu", "cuda")

    def __init__(self) -> None:
        self.update = torch.compile(_adam_rows_fused, dynamic=True)
        self.failure: str | None = None

    def usable(self, device: torch.device) -> bool:
        return device.type in self.DEVICES and self.failure is None

    def __call__(
        self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, block: AdamRows
    ) -> torch.Tensor | None:
        try:
            return self.update(exp_avg, exp_avg_sq, block)
        except BackendCompilerFailed as error:
            cause = getattr(error, "inner_exception", error)
            self.failure = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
            warnings.warn(
                f"lazy Adam's compiled row update is unavailable ({self.failure}); "
                "updating rows op by op",
                stacklevel=2,
            )
            return None


COMPILED_ROWS = CompiledRows()
"""The compiled row update that `fused=True` uses; eager is the reference."""


def catch_up_rows(
    weight_and_moments: list[torch.Tensor],
    updated_at: torch.Tensor,
    group: dict[str, Any],
    clock: Clock,
) -> None:
    """Every latent last updated before `clock.step` makes the moves it owes and
    decays its moments to that step, as dense Adam with zero gradients would."""
    weight, exp_avg, exp_avg_sq = weight_and_moments
    waiting = (updated_at < clock.step).nonzero().squeeze(1)
    block = _rows_in(weight, CATCH_UP_BYTES)
    for start in range(0, waiting.shape[0], block):
        latents = waiting[start : start + block]
        last_updates = updated_at.index_select(0, latents)
        decay1, decay2, owed = _waiting(last_updates, group, clock, weight.dim())
        moment1 = exp_avg.index_select(0, latents)
        moment2 = exp_avg_sq.index_select(0, latents)
        coasted = moment1 / moment2.sqrt().add_(group["eps"])
        weight.index_add_(0, latents, coasted.mul_(owed).neg_())
        exp_avg.index_copy_(0, latents, moment1.mul_(decay1))
        exp_avg_sq.index_copy_(0, latents, moment2.mul_(decay2))
    updated_at.fill_(float(clock.step))


def _dense_adam_rows(
    gradient: LatentRows,
    weight_and_moments: list[torch.Tensor],
    updated_at: torch.Tensor,
    group: dict[str, Any],
    clock: Clock,
) -> None:
    """Adam over every row, untouched ones with a zero gradient. PyTorch's (fused)
    Adam when every latent was updated at the step before; otherwise the row update
    over all of them, so the waiting ones also make the moves they owe."""
    latents, rows = gradient
    weight, exp_avg, exp_avg_sq = weight_and_moments
    grad = rows.new_zeros(weight.shape).index_copy_(0, latents, rows)
    if bool((updated_at == clock.step - 1).all()):
        device = weight.device if group["fused"] else None
        step = torch.tensor(float(clock.step - 1), device=device)
        _adam([weight], [grad], [exp_avg], [exp_avg_sq], [step], group)
        updated_at.fill_(float(clock.step))
        return
    every = torch.arange(weight.shape[0], device=weight.device)
    lazy_adam_rows(
        LatentRows(every, grad), weight_and_moments, updated_at, group, clock
    )


def _adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    group: dict[str, Any],
) -> None:
    """PyTorch's functional Adam (it advances `steps`), with `group`'s settings."""
    beta1, beta2 = group["betas"]
    adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        fused=group["fused"],
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=0.0,
        eps=group["eps"],
        maximize=False,
    )


def align_rows(
    parts: list[LatentRows | None],
    row_shapes: list[torch.Size],
    like: torch.Tensor,
    latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every part's rows on `latents` (default: the union of theirs), with zero rows
    where a part has none; `latents` must hold every part's. (latents, rows)"""
    if latents is None:
        latents = _union([part.latents for part in parts if part is not None], like)
    rows = []
    for part, shape in zip(parts, row_shapes, strict=True):
        if part is not None and _same(part.latents, latents):
            rows.append(part.rows.to(like.dtype))
            continue
        full = like.new_zeros(latents.shape[0], *shape)
        if part is not None:
            positions = torch.searchsorted(latents, part.latents)
            full.index_copy_(0, positions, part.rows.to(full.dtype))
        rows.append(full)
    return latents, rows


def _same(latents: torch.Tensor, other: torch.Tensor) -> bool:
    return latents.shape == other.shape and bool(torch.equal(latents, other))


def _union(latents: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not latents:
        return torch.zeros(0, dtype=torch.long, device=like.device)
    return torch.cat(latents).unique(sorted=True)


def by_latent(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """`tensor` with its latent axis first: W_enc [d_in, d_sae] as [d_sae, d_in]."""
    return tensor.t() if axis == 1 else tensor


def store_by_latent(W_enc: torch.Tensor) -> None:
    """Store W_enc [d_in, d_sae] as the transpose of a contiguous [d_sae, d_in]."""
    if not W_enc.t().is_contiguous():
        W_enc.data = W_enc.data.t().contiguous().t()


def _moments(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return state["exp_avg"], state["exp_avg_sq"]


def _with_dense_gradient(
    collected: LatentRows | None, parameter: torch.Tensor, axis: int
) -> LatentRows | None:
    """`collected` plus the rows of `parameter.grad` that are not all zero, if the
    weight received a dense gradient (a path that does not collect rows)."""
    grad = parameter.grad
    if grad is None:
        return collected
    parameter.grad = None
    rows = by_latent(grad, axis)
    latents = rows.reshape(rows.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
    dense = LatentRows(latents, rows.index_select(0, latents))
    if collected is None:
        return dense
    return sum_parts([dense, collected])
