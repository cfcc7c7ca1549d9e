"""Detect router collapse and dead experts while a MoE SAE trains.

Every step adds the routed experts of the batch to two per-expert counters on
the device (no host sync). Every `window_steps` steps the counters are read once:
an expert that was never selected in the window is dead, and an expert that was
the first choice of more than `collapse_share(n_experts)` of the window's tokens
has collapsed the router (halfway between a uniform 1 / N and all tokens). The
first such window raises one `RouterCollapseWarning` with the numbers; every
window's figures are offered as `TrainStepOutput.metrics` callables.

`step_metrics` is the one source of per-step router metrics: the window's, plus
the step's expert load, balance ratio and omega, all evaluated only when SAELens
logs. `ExpertLoad` and `ExpertLoadCounter` count routing for `metrics` too.
"""

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

DEFAULT_WINDOW_STEPS = 1000
MetricValue = torch.Tensor | float | int | Callable[[], torch.Tensor | float | int]
"""A `TrainStepOutput.metrics` value; callables are only evaluated on logging steps."""
METRIC_PREFIX = "moe/window_"


class RouterCollapseWarning(UserWarning):
    """One expert takes most tokens, or some experts are never chosen."""


def collapse_share(n_experts: int) -> float:
    """First-choice share above which one expert counts as having taken the router."""
    return (1 + 1 / n_experts) / 2


@dataclass(frozen=True)
class ExpertUsage:
    """Routing statistics over one window of training steps."""

    last_step: int
    """The trainer step that closed the window."""
    n_tokens: int
    """Tokens routed in the window."""
    first_choice_share: tuple[float, ...]
    """Per expert, the share of tokens whose most probable expert it was."""
    never_selected: tuple[int, ...]
    """Experts no token selected in the window."""

    @property
    def top_expert(self) -> int:
        shares = self.first_choice_share
        return max(range(len(shares)), key=shares.__getitem__)

    @property
    def top_share(self) -> float:
        return self.first_choice_share[self.top_expert]

    @property
    def collapsed(self) -> bool:
        n_experts = len(self.first_choice_share)
        return n_experts > 1 and self.top_share > collapse_share(n_experts)

    @property
    def healthy(self) -> bool:
        return not self.collapsed and not self.never_selected

    def describe(self) -> str:
        n_experts = len(self.first_choice_share)
        window = f"in the {self.n_tokens} tokens routed up to step {self.last_step}"
        problems: list[str] = []
        if self.collapsed:
            problems.append(
                f"expert {self.top_expert} was the first choice of "
                f"{self.top_share:.1%} of tokens (uniform: {1 / n_experts:.1%}, "
                f"collapse above {collapse_share(n_experts):.1%})"
            )
        if self.never_selected:
            problems.append(
                f"{len(self.never_selected)} of {n_experts} experts were never "
                f"selected: {list(self.never_selected)}"
            )
        return (
            f"Router collapse {window}: "
            + "; ".join(problems)
            + ". A larger load_balancing_coefficient or a lower learning rate "
            "usually helps. This warning is given once per SAE; see the "
            f"'{METRIC_PREFIX}*' metrics for later windows."
        )


class ExpertUsageMonitor:
    """Per-expert routing counters for one SAE, checked once per window."""

    def __init__(self, n_experts: int, window_steps: int = DEFAULT_WINDOW_STEPS):
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.n_experts = n_experts
        self.window_steps = window_steps
        self.last_usage: ExpertUsage | None = None
        self.warned = False
        self._counts: torch.Tensor | None = None  # [2, n_experts]: first, selected
        self._n_batches = 0

    def record(self, counts: torch.Tensor, step: int) -> None:
        """Add a batch's `routing_counts` [3, n_experts]; close the window if due."""
        self._counts_on(counts.device).add_(counts[:2].detach())
        self._n_batches += 1
        if (step + 1) % self.window_steps == 0:
            self.close_window(step)

    def close_window(self, step: int) -> ExpertUsage | None:
        """Summarise the window, warn once if the router is unhealthy, start afresh."""
        if self._counts is None or self._n_batches == 0:
            return None
        usage = self._summarise(step)
        self._counts.zero_()
        self._n_batches = 0
        self.last_usage = usage
        if not usage.healthy and not self.warned:
            self.warned = True
            warnings.warn(usage.describe(), RouterCollapseWarning, stacklevel=2)
        return usage

    def metrics(self) -> dict[str, MetricValue]:
        """Zero-argument callables over the last closed window (else the open one)."""
        return {
            f"{METRIC_PREFIX}dead_experts": lambda: float(
                len(self._current().never_selected)
            ),
            f"{METRIC_PREFIX}top_expert_share": lambda: self._current().top_share,
        }

    def _current(self) -> ExpertUsage:
        if self.last_usage is not None:
            return self.last_usage
        return self._summarise(-1)

    def _summarise(self, step: int) -> ExpertUsage:
        first, selected = (
            self._counts.tolist()
            if self._counts is not None
            else [[0.0] * self.n_experts] * 2
        )
        n_tokens = round(sum(first))
        return ExpertUsage(
            last_step=step,
            n_tokens=n_tokens,
            first_choice_share=tuple(count / max(n_tokens, 1) for count in first),
            never_selected=tuple(i for i, count in enumerate(selected) if count == 0),
        )

    def _counts_on(self, device: torch.device) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(
                2, self.n_experts, dtype=torch.float64, device=device
            )
        elif self._counts.device != device:
            self._counts = self._counts.to(device)
        return self._counts


_MONITORS: "weakref.WeakKeyDictionary[nn.Module, ExpertUsageMonitor]" = (
    weakref.WeakKeyDictionary()
)


def expert_usage_monitor(
    sae: nn.Module, n_experts: int, window_steps: int | None = None
) -> ExpertUsageMonitor:
    """The SAE's monitor, made on first use; kept outside the module's state."""
    monitor = _MONITORS.get(sae)
    if monitor is None or monitor.n_experts != n_experts:
        monitor = ExpertUsageMonitor(n_experts, window_steps or DEFAULT_WINDOW_STEPS)
        _MONITORS[sae] = monitor
    elif window_steps is not None:
        monitor.window_steps = window_steps
    return monitor


def step_metrics(
    sae: nn.Module, counts: torch.Tensor, omega: torch.Tensor | None, step: int
) -> dict[str, MetricValue]:
    """Record one step's `routing_counts`; its metrics and the window's, as callables."""
    monitor = expert_usage_monitor(sae, counts.shape[-1])
    monitor.record(counts, step)
    return {**routing_metrics(counts, omega), **monitor.metrics()}


def routing_metrics(
    counts: torch.Tensor, omega: torch.Tensor | None, prefix: str = "moe/"
) -> dict[str, Callable[[], float]]:
    """Cheap metrics for `TrainStepOutput.metrics`, as zero-argument callables.

    `counts` is a batch's `routing_counts` [3, n_experts]. SAELens evaluates the
    callables only on logging steps; they share one computation. Keys: expert-load
    entropies, never-selected count, per-expert selected share, the balance ratio
    N * sum_i f_i P_i (1 when balanced; the load-balancing loss divided by
    alpha * d_in) and omega per expert.
    """
    counts = counts.detach()
    n_experts = counts.shape[-1]

    @cache
    def load() -> ExpertLoad:
        counter = ExpertLoadCounter(n_experts)
        counter.add_counts(counts)
        return counter.result()

    def balance_ratio() -> float:
        n_tokens = counts[0].sum()
        return (n_experts * (counts[0] / n_tokens * counts[2] / n_tokens).sum()).item()

    metrics: dict[str, Callable[[], float]] = {
        f"{prefix}expert_load_entropy": lambda: load().selected_entropy,
        f"{prefix}first_choice_entropy": lambda: load().first_choice_entropy,
        f"{prefix}experts_never_selected": lambda: float(len(load().never_selected)),
        f"{prefix}load_balance_ratio": balance_ratio,
    }
    for expert in range(n_experts):
        metrics[f"{prefix}expert_selected_share/{expert}"] = _share_getter(load, expert)
    if omega is not None:
        detached = omega.detach()
        for expert in range(detached.numel()):
            metrics[f"{prefix}omega/{expert}"] = _omega_getter(detached, expert)
    return metrics


def _share_getter(load: Callable[[], "ExpertLoad"], expert: int) -> Callable[[], float]:
    return lambda: load().selected_share[expert]


def _omega_getter(omega: torch.Tensor, expert: int) -> Callable[[], float]:
    def value() -> float:
        return float(omega[expert])

    return value


# ------------------------------------------------------------------------ expert load


def normalized_entropy(distribution: torch.Tensor) -> float:
    """Entropy of a non-negative vector (normalised to sum 1) divided by log(len).

    1 is perfectly uniform, 0 is one-hot; a single entry is trivially balanced (1).
    """
    if distribution.numel() <= 1:
        return 1.0
    total = distribution.sum()
    if total <= 0:
        return 0.0
    p = distribution.double() / total
    entropy = -(p * p.clamp(min=1e-300).log()).sum()
    return (entropy / math.log(distribution.numel())).item()


@dataclass(frozen=True)
class ExpertLoad:
    """How tokens spread over experts."""

    selected_share: list[float]
    """Fraction of tokens for which each expert is among the e selected (sums to e)."""
    first_choice_share: list[float]
    """Fraction of tokens for which each expert is the most probable (sums to 1)."""
    selected_entropy: float
    """Normalised entropy of selected_share: 1 balanced, 0 one expert only."""
    first_choice_entropy: float
    """Normalised entropy of first_choice_share."""
    never_selected: list[int]
    """Experts no token selected."""
    n_tokens: int
    """Tokens counted."""

    def to_dict(self) -> dict[str, Any]:
        """Keys "expert_load/..." with per-expert lists."""
        return {
            "expert_load/selected_share": list(self.selected_share),
            "expert_load/first_choice_share": list(self.first_choice_share),
            "expert_load/selected_entropy": self.selected_entropy,
            "expert_load/first_choice_entropy": self.first_choice_entropy,
            "expert_load/never_selected": list(self.never_selected),
            "expert_load/n_never_selected": len(self.never_selected),
            "expert_load/n_tokens": self.n_tokens,
        }


class ExpertLoadCounter:
    """Accumulates expert selections over batches of routed tokens."""

    def __init__(self, n_experts: int) -> None:
        self.selected = torch.zeros(n_experts, dtype=torch.long)
        self.first_choice = torch.zeros(n_experts, dtype=torch.long)
        self.n_tokens = 0

    def add(self, experts: torch.Tensor) -> None:
        """Count one batch of selections, most probable first. [tokens, e]"""
        n_experts = self.selected.numel()
        experts = experts.detach().reshape(-1, experts.shape[-1]).cpu()
        self.selected += torch.bincount(experts.reshape(-1), minlength=n_experts)
        self.first_choice += torch.bincount(experts[:, 0], minlength=n_experts)
        self.n_tokens += experts.shape[0]

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add `routing_counts` [3, n_experts] (first choice, selected, probability)."""
        first, selected = counts[:2].detach().cpu().round().long()
        self.first_choice += first
        self.selected += selected
        self.n_tokens += int(first.sum())

    def result(self) -> ExpertLoad:
        """The load over every token added so far."""
        n = max(self.n_tokens, 1)
        selected = self.selected.double() / n
        first = self.first_choice.double() / n
        return ExpertLoad(
            selected.tolist(),
            first.tolist(),
            normalized_entropy(self.selected),
            normalized_entropy(self.first_choice),
            (self.selected == 0).nonzero().flatten().tolist(),
            self.n_tokens,
        )
