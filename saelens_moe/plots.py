"""PNG plots of the metrics in `saelens_moe.metrics` (matplotlib, no display needed).

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas,
so nothing touches pyplot's global state or needs a display.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sae_lens.saes.sae import SAE

from saelens_moe.metrics import (
    DEFAULT_THRESHOLDS,
    ActivationSource,
    ExpertLoad,
    MaxCosines,
    encoder_flops_per_token,
    expert_layout,
    expert_load,
    explained_variance,
    max_cosines,
    omega_per_expert,
)


@dataclass(frozen=True)
class ParetoPoint:
    """One SAE on the cost / quality plane."""

    label: str
    """Legend text, e.g. "scale e=2"."""
    encoder_flops_per_token: float
    """Encoder multiply-adds per token (x axis, log scale)."""
    explained_variance: float
    """Explained variance (y axis)."""


def _new_axes(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, format="png")
    return path


def plot_expert_load(load: ExpertLoad, path: Path | str, title: str = "") -> Path:
    """Bar chart: share of tokens selecting each expert, and choosing it first."""
    figure, axes = _new_axes()
    n_experts = len(load.selected_share)
    positions = torch.arange(n_experts).tolist()
    width = 0.4
    axes.bar(
        [p - width / 2 for p in positions], load.selected_share, width, label="selected"
    )
    axes.bar(
        [p + width / 2 for p in positions],
        load.first_choice_share,
        width,
        label="first choice",
    )
    n_active = sum(load.selected_share)
    axes.axhline(
        n_active / n_experts, color="gray", linestyle="--", label="uniform, selected"
    )
    axes.axhline(
        1 / n_experts, color="gray", linestyle=":", label="uniform, first choice"
    )
    axes.set_xticks(positions if n_experts <= 32 else positions[:: n_experts // 16])
    axes.set_xlabel("expert")
    axes.set_ylabel("share of tokens")
    axes.set_title(
        title
        or f"Expert load (normalised entropy {load.selected_entropy:.3f}, "
        f"{len(load.never_selected)} never selected)"
    )
    axes.legend()
    return _save(figure, path)


def plot_redundancy_histogram(
    cosines: MaxCosines,
    path: Path | str,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    title: str = "Max decoder cosine per latent",
) -> Path:
    """Histogram of each latent's max cosine with another latent, split by expert."""
    figure, axes = _new_axes()
    series = {"all latents": cosines.overall}
    if cosines.intra_expert is not None:
        series["same expert"] = cosines.intra_expert
    if cosines.inter_expert is not None:
        series["other experts"] = cosines.inter_expert
    for label, values in series.items():
        axes.hist(
            values.float().cpu().numpy(),
            bins=50,
            range=(-0.1, 1.0),
            histtype="step",
            label=label,
        )
    for tau in thresholds:
        axes.axvline(tau, color="gray", linestyle=":", linewidth=1)
    axes.set_xlabel("max cosine with another latent's decoder row")
    axes.set_ylabel("latents")
    axes.set_title(title)
    axes.legend()
    return _save(figure, path)


def plot_omega(
    omega: Sequence[float], path: Path | str, title: str = "Feature Scaling omega"
) -> Path:
    """Bar chart of the Feature Scaling strength of each expert."""
    figure, axes = _new_axes()
    positions = list(range(len(omega)))
    axes.bar(positions, list(omega))
    axes.axhline(0.0, color="gray", linewidth=1)
    axes.set_xticks(
        positions if len(positions) <= 32 else positions[:: len(positions) // 16]
    )
    axes.set_xlabel("expert")
    axes.set_ylabel("omega")
    axes.set_title(title)
    return _save(figure, path)


def pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """Points no other point beats on both cost (lower) and quality (higher)."""
    ordered = sorted(
        points, key=lambda p: (p.encoder_flops_per_token, -p.explained_variance)
    )
    front: list[ParetoPoint] = []
    for point in ordered:
        if not front or point.explained_variance > front[-1].explained_variance:
            front.append(point)
    return front


def plot_pareto(
    points: Sequence[ParetoPoint],
    path: Path | str,
    title: str = "Explained variance vs encoder cost",
) -> Path:
    """Explained variance against encoder FLOPs per token, with the Pareto front."""
    figure, axes = _new_axes(7.0, 4.5)
    for point in points:
        axes.scatter(point.encoder_flops_per_token, point.explained_variance, s=36)
        axes.annotate(
            point.label,
            (point.encoder_flops_per_token, point.explained_variance),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    front = pareto_front(points)
    axes.plot(
        [p.encoder_flops_per_token for p in front],
        [p.explained_variance for p in front],
        color="gray",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    axes.set_xscale("log")
    axes.set_xlabel("encoder multiply-adds per token")
    axes.set_ylabel("explained variance")
    axes.set_title(title)
    axes.legend()
    return _save(figure, path)


def save_sae_plots(
    sae: SAE[Any],
    activations: ActivationSource,
    output_dir: Path | str,
    label: str | None = None,
    reference_points: Sequence[ParetoPoint] = (),
    n_batches: int = 10,
) -> dict[str, Path]:
    """Every plot for one trained SAE, written as PNGs into `output_dir`.

    Expert load and omega are drawn only when the SAE has a router / an omega. The
    Pareto plot places this SAE among `reference_points` (e.g. other SAEs' results).
    """
    output_dir = Path(output_dir)
    layout = expert_layout(sae)
    name = label or sae.cfg.architecture()
    paths = {
        "redundancy": plot_redundancy_histogram(
            max_cosines(sae.W_dec, layout.n_experts), output_dir / "redundancy.png"
        )
    }
    if layout.has_router:
        load = expert_load(sae, activations, n_batches)
        paths["expert_load"] = plot_expert_load(load, output_dir / "expert_load.png")
    omega = omega_per_expert(sae)
    if omega is not None:
        paths["omega"] = plot_omega(omega, output_dir / "omega.png")
    own = ParetoPoint(
        name,
        encoder_flops_per_token(layout, sae.cfg.d_in),
        explained_variance(sae, activations, n_batches),
    )
    paths["pareto"] = plot_pareto([*reference_points, own], output_dir / "pareto.png")
    return paths
