"""The floors benchmark runs end to end at a small size (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_floors_benchmark_quick_run_writes_consistent_table_and_json(
    tmp_path: Path,
) -> None:
    script = Path(__file__).parents[2] / "benchmarks" / "floors.py"
    arguments = ["--quick", "--reps", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(script), *arguments],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| **these parts together** |" in result.stdout
    assert (tmp_path / "floors_quick.md").read_text().strip() == result.stdout.strip()
    report = json.loads((tmp_path / "floors_quick.json").read_text())

    dense = report["dense_encode"]
    ms = dense["ms"]
    assert (dense["n_experts"], dense["n_active_experts"]) == (16, 2)
    for place in ("fresh", "mapped"):
        floor = ms["scale_encode_sparse"] + ms[f"write_{place}"]
        assert dense["floor_ms"][place] == pytest.approx(floor)
        assert dense["best_speedup"][place] == pytest.approx(ms["topk_encode"] / floor)
    assert dense["budget_ms_for_20x"] == pytest.approx(ms["topk_encode"] / 20)

    scaling = report["scaling"]
    small, large = scaling["d_sae"]
    assert (small, large) == (1024, 2048)
    assert list(scaling["growth_ms"]) == [
        "router_matmuls",
        "expert_matmuls",
        "decoder_gradient",
        "weight_reads",
    ]
    for part, growth in scaling["growth_ms"].items():
        times = scaling["ms"][f"{part}@{large}"], scaling["ms"][f"{part}@{small}"]
        assert min(times) > 0
        assert growth == pytest.approx(times[0] - times[1])
    assert scaling["floor_growth_ms"] == pytest.approx(
        sum(scaling["growth_ms"].values())
    )
    assert set(scaling["page_faults_per_step"]) == {str(small), str(large)}
    assert "Page faults in one forward+backward:" in result.stdout
    step_small = scaling["ms"][f"forward_backward@{small}"]
    assert scaling["allowed_growth_ms"] == pytest.approx(0.2 * step_small)
    assert scaling["measured_ratio"] == pytest.approx(
        scaling["ms"][f"forward_backward@{large}"] / step_small
    )
