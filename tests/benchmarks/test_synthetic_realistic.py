import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from saelens_moe.ground_truth import SIZES, Variant, run_benchmark
from tests.benchmarks.test_synthetic import load_script

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "synthetic_realistic.py"


def load_realistic() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synthetic_realistic", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_realistic_size_is_the_one_synthetic_py_offers() -> None:
    realistic = load_realistic().REALISTIC
    assert load_script().BENCHMARK_SIZES["realistic"] == realistic
    assert realistic.num_features >= 1536
    assert realistic.d_sae >= 1536
    assert realistic.n_experts >= 8


def test_replayed_stream_trains_exactly_as_the_live_generator() -> None:
    variants = [Variant("topk", "topk"), Variant("scale", "scale", {"k": 4})]
    live = run_benchmark(variants, SIZES["tiny"], seed=3)
    replayed = run_benchmark(variants, SIZES["tiny"], seed=3, replay=True)
    assert [r.explained_variance for r in live.results] == [
        r.explained_variance for r in replayed.results
    ]


def test_redundancy_breakdown_by_hand() -> None:
    """Latents 0 and 1 duplicate (one live, one dead); 2 and 3 in expert 1 point apart."""
    W_dec = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    )
    live = torch.tensor([True, False, True, True])
    out = load_realistic().redundancy_breakdown(W_dec, 2, live)
    assert out["n_live"] == 3
    assert out["raw/all/0.8"] == 0.5  # latents 0 and 1
    assert out["raw/live/0.8"] == 0.0  # no live latent has a live duplicate
    assert out["raw/intra/0.8"] == 0.5
    assert out["raw/inter/0.8"] == 0.0
    assert out["pairs/live-dead/0.8"] == 0.5
    assert out["pairs/live-live/0.8"] == 0.0
    # high-pass: expert 0's rows minus their mean point in opposite directions
    assert out["highpass/all/0.8"] == 0.0


def test_improvement_table_sets_ours_beside_the_authors() -> None:
    module = load_realistic()
    entries = [
        {
            "name": "switch",
            "k": 8,
            "explained_variance": 0.5,
            "redundancy_08": 0.2,
            "redundancy_09": 0.1,
        },
        {
            "name": "scale e=2",
            "k": 8,
            "explained_variance": 0.75,
            "redundancy_08": 0.02,
            "redundancy_09": 0.01,
        },
    ]
    table = module.improvement_table(entries)
    row = next(line for line in table.splitlines() if line.startswith("| 8 | 2 |"))
    # ours: FVU 0.25 vs 0.5 and redundancy 0.01 vs 0.1; authors: 2359.5 vs 2908.5, 0.00346 vs 0.0493
    assert row == "| 8 | 2 | +50% | +19% | +90% | +93% | +90% |"
