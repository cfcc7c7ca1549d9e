"""The throughput benchmark runs end to end at a small size (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path


def test_throughput_benchmark_quick_run_writes_table_json_and_plot(
    tmp_path: Path,
) -> None:
    script = Path(__file__).parents[2] / "benchmarks" / "throughput.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--reps",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| scale | 16 | 2 |" in result.stdout
    report = json.loads((tmp_path / "throughput_quick.json").read_text())
    rows = {(row["sae"], row["N"], row["e"]): row for row in report["rows"]}
    for key in [
        ("scale", 16, 2),
        ("scale", 4, 2),
        ("switch", 16, 1),
        ("topk", None, None),
    ]:
        assert rows[key]["error"] is None, key
        assert rows[key]["step_tok_s"] > 0
        assert rows[key]["step_transient_gib"] is not None
    assert rows[("scale", 16, 2)]["encode_sparse_tok_s"] > 0
    for curve in ("scaling_curve", "scaling_curve_huge_pages"):
        assert [point["d_sae"] for point in report[curve]] == [512, 1024, 2048]
    assert (tmp_path / "throughput_quick_scaling.png").stat().st_size > 0
    assert report["machine"]["top_k"] in {"compiled kernel", "torch.topk"}
    assert report["machine"]["expert_matmuls"] in {
        "compiled loop over PyTorch's MKL sgemm",
        "torch.mm per expert",
    }
    assert report["repetitions"] == {"candidates": 1, "scaling_curve": 3}
