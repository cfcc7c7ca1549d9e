"""The throughput benchmark runs end to end at a small size (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark


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
    assert rows[("scale", 16, 2)]["matmul_path"] == "grouped"
    assert rows[("topk", None, None)]["matmul_path"] is None
    assert "| scale | 16 | 2 | grouped |" in result.stdout
    for curve in ("scaling_curve", "scaling_curve_huge_pages"):
        assert [point["d_sae"] for point in report[curve]] == [512, 1024, 2048]
    assert (tmp_path / "throughput_quick_scaling.png").stat().st_size > 0
    assert report["machine"]["device"] == "cpu"
    assert report["repetitions"] == {"candidates": 1, "scaling_curve": 3}


def test_throughput_width_sweep_runs_the_gpu_code_path_on_cpu(tmp_path: Path) -> None:
    """What `--device cuda` runs, here on CPU in bfloat16 at two small widths."""
    script = Path(__file__).parents[2] / "benchmarks" / "throughput.py"
    command = [sys.executable, str(script), "--quick", "--reps", "1"]
    command += ["--widths", "1024", "2048", "--dtype", "bfloat16"]
    subprocess.run(
        [*command, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads((tmp_path / "throughput_cpu_bfloat16.json").read_text())
    assert report["machine"]["dtype"] == "bfloat16"
    assert [width["sizes"]["d_sae"] for width in report["widths"]] == [1024, 2048]
    for width in report["widths"]:
        rows = {row["sae"]: row for row in width["rows"]}
        n_experts = width["sizes"]["d_sae"] // 256
        assert (rows["scale"]["N"], rows["scale"]["e"]) == (n_experts, 3)
        for name in ("topk", "scale", "switch"):
            assert rows[name]["error"] is None, name
            assert rows[name]["step_tok_s"] > 0
        assert rows["scale"]["encode_sparse_tok_s"] > 0
        assert rows["switch"]["matmul_path"] == "grouped"
    assert (
        (tmp_path / "throughput_cpu_bfloat16.md").read_text().startswith("d_sae 1024")
    )


@pytest.mark.parametrize(
    ("dtype", "autocast", "path"),
    [
        ("float32", False, "grouped"),
        ("float32", True, "grouped"),
        ("float64", False, "every_expert"),
        ("float64", True, "grouped"),
    ],
)
def test_throughput_records_the_matmul_path_of_the_compute_dtype(
    dtype: str, autocast: bool, path: str
) -> None:
    throughput = load_benchmark("throughput")
    placement = throughput.Placement("cpu", dtype, autocast)
    sizes = throughput.QUICK
    scale = throughput.build(throughput.Candidate("scale", 16, 2), sizes, placement)
    topk = throughput.build(throughput.Candidate("topk"), sizes, placement)
    assert throughput.matmul_path(scale, placement) == path
    assert throughput.matmul_path(topk, placement) is None
