"""The distributed benchmark runs end to end at a small size (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import BENCHMARKS, load_benchmark


def test_distributed_benchmark_quick_run_writes_table_and_json(tmp_path: Path) -> None:
    script = BENCHMARKS / "distributed.py"
    arguments = ["--quick", "--steps", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(script), *arguments],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (tmp_path / "distributed_quick.md").read_text().strip() == (
        result.stdout.strip()
    )
    report = json.loads((tmp_path / "distributed_quick.json").read_text())
    modes = [(row["processes"], row["mode"]) for row in report["measured"]]
    assert modes == [(1, "one process"), (2, "data parallel"), (2, "expert parallel")]
    held = {row["mode"]: row["held_gib_per_process"] for row in report["measured"]}
    # expert parallel holds about half the parameters (the router is replicated)
    assert held["expert parallel"] < 0.6 * held["data parallel"]
    assert held["data parallel"] == pytest.approx(held["one process"])
    assert not (tmp_path / "distributed_scratch").exists()


def test_expert_parallel_memory_on_paper_is_one_eighth_plus_replicas() -> None:
    benchmark = load_benchmark("distributed")
    expert_parallel_on_paper = benchmark.expert_parallel_on_paper
    widest_on_one_gpu = benchmark.widest_on_one_gpu

    for row in expert_parallel_on_paper(n_gpus=8):
        assert row["per_gpu_gib"] == pytest.approx(row["one_gpu_gib"] / 8, rel=0.01)
    # 2 * 768 * d_sae parameters, 16 bytes each (weight, gradient, Adam's two)
    assert widest_on_one_gpu(768) == int(80e9 / (16 * 2 * 768))


def test_lifecycle_quick_run_reports_peak_memory_per_phase(tmp_path: Path) -> None:
    script = BENCHMARKS / "distributed.py"
    arguments = [
        "--lifecycle",
        "--quick",
        "--steps",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    subprocess.run([sys.executable, str(script), *arguments], check=True)
    rows = json.loads((tmp_path / "distributed_lifecycle_quick.json").read_text())
    assert [row["processes"] for row in rows["lifecycle"]] == [1, 2, 4] * 2
    for row in rows["lifecycle"]:
        assert list(row["peaks_gib_per_phase"]) == [
            "init",
            "training",
            "checkpoint",
            "export",
        ]
        assert row["peak_rss_gib_per_process"] > row["baseline_gib"]
    held = [row["state_gib_per_process"] for row in rows["lifecycle"][3:]]
    assert held[1] < 0.6 * held[0] and held[2] < 0.6 * held[1]  # 1/P of the experts
    assert not (tmp_path / "distributed_scratch").exists()
    exports = rows["export_alone"]
    assert [row["d_sae"] for row in exports] == [4096, 16384]
    assert exports[0]["block_mib"] == exports[1]["block_mib"]
    for row in exports:
        assert row["export_peak_rss_mib"]["default"] > 0
        assert row["export_peak_rss_mib"]["fixed_mmap_threshold"] > 0
