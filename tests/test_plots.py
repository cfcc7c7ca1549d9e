from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from saelens_moe import ScaleTrainingSAE, ScaleTrainingSAEConfig
from saelens_moe.metrics import max_cosines
from saelens_moe.plots import (
    ParetoPoint,
    pareto_front,
    plot_expert_load,
    plot_omega,
    plot_pareto,
    plot_redundancy_histogram,
    save_sae_plots,
)
from saelens_moe.router_health import ExpertLoadCounter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def test_plot_expert_load_writes_a_png(tmp_path: Path) -> None:
    counter = ExpertLoadCounter(4)
    counter.add(torch.tensor([[0, 1], [0, 2], [1, 0]]))
    assert_png(plot_expert_load(counter.result(), tmp_path / "load.png"))


def test_plot_redundancy_histogram_writes_a_png(tmp_path: Path) -> None:
    cosines = max_cosines(torch.randn(32, 8), n_experts=4)
    assert_png(plot_redundancy_histogram(cosines, tmp_path / "sub" / "red.png"))


def test_plot_omega_writes_a_png(tmp_path: Path) -> None:
    assert_png(plot_omega([0.1, -0.2, 0.3], tmp_path / "omega.png"))


def test_pareto_front_by_hand() -> None:
    a = ParetoPoint("a", 100, 0.5)
    b = ParetoPoint("b", 200, 0.4)  # costlier and worse than a: dominated
    c = ParetoPoint("c", 300, 0.7)
    d = ParetoPoint("d", 100, 0.3)  # as cheap as a but worse: dominated
    assert pareto_front([c, b, a, d]) == [a, c]


def test_plot_pareto_writes_a_png(tmp_path: Path) -> None:
    points = [ParetoPoint("topk", 1024, 0.8), ParetoPoint("scale", 300, 0.7)]
    assert_png(plot_pareto(points, tmp_path / "pareto.png"))


def test_save_sae_plots_for_a_scale_sae(tmp_path: Path) -> None:
    sae = ScaleTrainingSAE(
        ScaleTrainingSAEConfig(d_in=8, d_sae=32, n_experts=4, n_active_experts=2, k=4)
    )
    paths = save_sae_plots(
        sae,
        torch.randn(256, 8),
        tmp_path,
        reference_points=[ParetoPoint("reference", 256, 0.5)],
    )
    assert set(paths) == {"redundancy", "expert_load", "omega", "pareto"}
    for path in paths.values():
        assert path.parent == tmp_path
        assert_png(path)


def test_save_sae_plots_for_a_topk_sae_skips_expert_plots(tmp_path: Path) -> None:
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    paths = save_sae_plots(sae, torch.randn(64, 8), tmp_path)
    assert set(paths) == {"redundancy", "pareto"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pareto.png",
        "redundancy.png",
    ]
