"""The sparse-step benchmark and the step curve run end to end at small sizes
(no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.benchmarks import BENCHMARKS


def run(script: str, *flags: str) -> str:
    command = [sys.executable, str(BENCHMARKS / script), "--quick", *flags]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_sparse_step_quick_run_writes_touched_shares_fused_and_rows_tables(
    tmp_path: Path,
) -> None:
    run("sparse_step.py", "--reps", "1", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "sparse_step_quick.json").read_text())
    assert [row["d_sae"] for row in report["touched"]] == [1024, 4096]
    for row in report["touched"]:
        for share in ("uniform_input", "zipf_input", "zipf_firing_latents"):
            assert 0 < row[share] <= row["bound_tokens_times_k"] + 1e-9
    assert {row["optimizer"] for row in report["shares"]} == {"saelens", "lazy"}
    assert report["fused"]["max_weight_difference_after_steps"] < 1e-5
    assert "Fused Adam" in (tmp_path / "sparse_step_quick.md").read_text()
    rows = report["rows"]
    assert rows["rows"] == round(0.22 * 4096)
    for name in ("eager_s", "compiled_s", "fused_adam_contiguous_s"):
        assert rows[name] > 0


def test_step_curve_quick_run_times_every_row_beside_the_floor(tmp_path: Path) -> None:
    output = run(
        "throughput.py", "--step-curve", "--reps", "1", "--output-dir", str(tmp_path)
    )
    report = json.loads((tmp_path / "throughput_step_curve_quick.json").read_text())
    assert [point["d_sae"] for point in report["points"]] == [1024, 2048, 4096, 8192]
    for point in report["points"]:
        for row in ("scale", "scale-lazy", "scale-lazy-zipf", "scale-fused", "topk"):
            assert point[f"{row}_step_s"] > 0
        assert point["floor_s"] > 0
        for row in ("scale-lazy", "scale-lazy-zipf"):
            assert 0 < point[f"{row}_touched_share"] <= 1
            assert point[f"{row}_touched_floor_s"] > point["floor_s"]
    assert "lazy / touched floor" in output
