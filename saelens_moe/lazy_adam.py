"""Lazy Adam: a training step that writes only the latents the batch touched.

A Top-K SAE's batch reaches few of a wide dictionary's latents (`saes.sparse_gradients`);
dense Adam still zero-fills, reads and writes every weight, gradient and moment each
step. `LazyAdam` updates W_enc's columns, W_dec's rows and b_enc's entries only for
the latents whose gradient rows the step produced, the way embedding tables are
trained (PyTorch's `SparseAdam`). Each latent keeps its own step count, so the moments
and bias correction of an untouched latent wait until it is touched again; with every
latent touched every step the update is dense Adam's. The other weights (router,
b_dec, omega, W_lowpass) take PyTorch's Adam.

Two approximations, both measured in `benchmarks/README.md` ("A step that writes only
what the batch touched"): an untouched latent does not coast on its momentum as with
dense Adam, and under Feature Scaling the gradient through each expert's mean column
mu_i, which reaches every latent of the expert, is dropped (omega and W_lowpass keep
their exact gradients).

W_enc is stored by latent (the transpose of a contiguous [d_sae, d_in]), so a
latent's column is one contiguous row, as W_dec's; its moments likewise.

The forward's block sums and decoder norms are updated on the touched rows
(`saes.summaries`) rather than recomputed from the whole dictionary, so beyond the
routed matmul's read of W_enc a step reads and writes only what the batch touched.
With `fused=True` (our trainer's default) the touched rows' moments are updated by
one compiled kernel (`CompiledRows`) instead of a dozen eager passes.
"""

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
    `step()` updates.

    Args:
        sae: The training SAE (its W_enc, W_dec and b_enc are updated lazily).
        lr: Learning rate (SAELens's schedulers set it per step).
        betas: Adam's (beta1, beta2).
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
        self._latent_step(group, touched)
        self.last_touched_share = touched.share
        self.touched = None

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

    def _latent_step(self, group: dict[str, Any], touched: TouchedGradients) -> None:
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
        if not state:
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


def lazy_adam_rows(
    gradient: LatentRows,
    weight_and_moments: list[torch.Tensor],  # [d_sae, ...] each, by latent
    steps: torch.Tensor,  # [d_sae] float32, each latent's own step count
    group: dict[str, Any],
    dense: bool = False,
    after_block: RowUpdateHook | None = None,
) -> None:
    """PyTorch's Adam update, on the gradient's latents only, with per-latent steps.

    Gathers the touched rows, updates them and scatters them back, a block of rows
    at a time, each block then handed to `after_block`. With `dense` (a step
    touching nearly every latent: `TouchedGradients.dense_step`) it runs dense Adam
    instead, faster there (and calls no `after_block`).
    """
    if dense:
        _dense_adam_rows(gradient, weight_and_moments, steps, group)
        return
    latents, grad = gradient
    latent_steps = steps.index_select(0, latents).add_(1)
    steps.index_copy_(0, latents, latent_steps)
    block = _rows_per_block(grad)
    for start in range(0, latents.shape[0], block):
        rows = slice(start, start + block)
        _adam_on_rows(
            LatentRows(latents[rows], grad[rows]),
            weight_and_moments,
            latent_steps[rows],
            group,
            after_block,
        )


BLOCK_BYTES = 4 * 1024**2
"""Rows of gradient a CPU updates at a time: the update's temporaries then stay in
cache (1.5-2x faster at 100k rows of 768 here); GPUs take every row at once."""


def _rows_per_block(grad: torch.Tensor) -> int:
    if grad.device.type != "cpu":
        return max(1, grad.shape[0])
    row_bytes = grad[:1].numel() * grad.element_size()
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def _adam_on_rows(
    gradient: LatentRows,
    weight_and_moments: list[torch.Tensor],
    latent_steps: torch.Tensor,  # [n], already advanced
    group: dict[str, Any],
    after_block: RowUpdateHook | None = None,
) -> None:
    latents, grad = gradient
    beta1, beta2 = group["betas"]
    shape = (-1,) + (1,) * (grad.dim() - 1)
    block = AdamRows(
        latents,
        grad,
        (group["lr"] / (1 - beta1**latent_steps)).view(shape),
        (1 - beta2**latent_steps).sqrt_().view(shape),
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
    step_size: torch.Tensor
    """lr / bias correction 1, per row. [n, 1...]"""
    bias_correction2_sqrt: torch.Tensor
    """[n, 1...]"""
    beta1: float
    beta2: float
    eps: float


def _adam_rows_eager(
    exp_avg: torch.Tensor,  # [d_sae, ...] by latent
    exp_avg_sq: torch.Tensor,
    block: AdamRows,
) -> torch.Tensor:
    """Adam's moments on the block's rows, op by op, and what to add to their
    weights. [n, ...]"""
    latents, grad = block.latents, block.grad
    moment1 = exp_avg.index_select(0, latents).lerp_(grad, 1 - block.beta1)
    moment2 = exp_avg_sq.index_select(0, latents).mul_(block.beta2)
    moment2.addcmul_(grad, grad, value=1 - block.beta2)
    exp_avg.index_copy_(0, latents, moment1)
    exp_avg_sq.index_copy_(0, latents, moment2)
    denom = moment2.sqrt_().div_(block.bias_correction2_sqrt).add_(block.eps)
    return moment1.div_(denom).mul_(block.step_size).neg_()


def _adam_rows_fused(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    block: AdamRows,
) -> torch.Tensor:
    """`_adam_rows_eager` written for the compiler, which makes it one kernel that
    reads and writes each moment row once."""
    latents, grad = block.latents, block.grad
    moment1 = torch.lerp(exp_avg[latents], grad, 1 - block.beta1)
    moment2 = exp_avg_sq[latents] * block.beta2 + (1 - block.beta2) * grad * grad
    exp_avg[latents] = moment1
    exp_avg_sq[latents] = moment2
    denom = moment2.sqrt() / block.bias_correction2_sqrt + block.eps
    return -block.step_size * moment1 / denom


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


def _dense_adam_rows(
    gradient: LatentRows,
    weight_and_moments: list[torch.Tensor],
    steps: torch.Tensor,
    group: dict[str, Any],
) -> None:
    """Adam over every row, untouched ones with a zero gradient (their moments decay
    and they move by their momentum, as with dense Adam); every latent's step
    advances. PyTorch's (fused) Adam when all latents share one step count."""
    latents, rows = gradient
    weight, exp_avg, exp_avg_sq = weight_and_moments
    grad = rows.new_zeros(weight.shape).index_copy_(0, latents, rows)
    if bool(steps.min() == steps.max()):
        fused = group["fused"]
        step = steps[0].clone() if fused else torch.tensor(float(steps[0]))
        _adam([weight], [grad], [exp_avg], [exp_avg_sq], [step], group)
        steps.add_(1)
        return
    steps.add_(1)
    beta1, beta2 = group["betas"]
    shape = (-1,) + (1,) * (grad.dim() - 1)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = group["lr"] / (1 - beta1**steps)
    bias_correction2_sqrt = (1 - beta2**steps).sqrt_()
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt.view(shape))
    denom.add_(group["eps"])
    weight.addcdiv_(exp_avg * step_size.view(shape), denom, value=-1)


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
