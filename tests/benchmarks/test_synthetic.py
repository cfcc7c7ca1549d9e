import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from saelens_moe.ground_truth import SIZES, Variant, run_benchmark, sae_config
from tests.benchmarks import load_benchmark


def load_script() -> ModuleType:
    return load_benchmark("synthetic")


def standard_variants() -> list[Variant]:
    return load_script().standard_variants()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    studies = load_script().main(["--size", "tiny", "--output-dir", str(out)])
    return {"dir": out / "tiny" / "standard", "runs": studies["standard"]}


def test_benchmark_variants_share_width_l0_and_tokens() -> None:
    size = SIZES["tiny"]
    configs = [sae_config(v, size) for v in standard_variants()]
    assert {c.d_sae for c in configs} == {size.d_sae}
    assert {c.k for c in configs} == {size.k}
    assert [c.architecture() for c in configs] == [
        "topk",
        "batchtopk",
        "switch",
        "scale",
        "scale",
        "scale",
        "scale",
    ]
    ablation_no_fs, ablation_one_expert = configs[5], configs[6]
    assert ablation_no_fs.feature_scaling is False
    assert ablation_no_fs.n_active_experts == 2
    assert ablation_one_expert.n_experts == 1
    assert ablation_one_expert.feature_scaling is True


def test_benchmark_reports_every_variant_and_metric(tiny_run: dict[str, Any]) -> None:
    (run,) = tiny_run["runs"]
    assert [r.name for r in run.results] == [v.name for v in standard_variants()]
    by_name = {r.name: r for r in run.results}
    size = SIZES["tiny"]
    d_in, m = size.hidden_dim, size.d_sae // size.n_experts
    assert by_name["topk"].encoder_flops_per_token == d_in * size.d_sae
    assert by_name["switch"].encoder_flops_per_token == d_in * size.n_experts + m * d_in
    assert (
        by_name["scale e=4"].encoder_flops_per_token
        == d_in * size.n_experts + 4 * m * d_in
    )
    assert by_name["topk"].expert_load_entropy is None
    assert by_name["topk"].purity is None
    for name in ("switch", "scale e=2", "scale e=4", "scale e=2 no FS"):
        result = by_name[name]
        assert result.expert_load_entropy is not None
        assert 0 <= result.expert_load_entropy <= 1
        assert result.purity is not None and 0 < result.purity <= 1
    for result in run.results:
        assert 0 <= result.mcc <= 1
        assert 0 <= result.redundancy_09 <= result.redundancy_08 <= 1
        assert result.train_seconds > 0


def test_benchmark_writes_table_json_and_pareto(tiny_run: dict[str, Any]) -> None:
    seed_dir: Path = tiny_run["dir"] / "seed_0"
    table = (seed_dir / "results.md").read_text()
    assert table.count("\n") == 2 + len(standard_variants())
    results = json.loads((seed_dir / "results.json").read_text())
    assert results["size"]["name"] == "tiny"
    first = results["results"][0]
    for key in (
        "explained_variance",
        "mcc",
        "uniqueness",
        "redundancy_08",
        "redundancy_09",
        "dead_latents",
        "expert_load_entropy",
        "encoder_flops_per_token",
        "train_seconds",
    ):
        assert key in first
    assert (seed_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "scale e=2" in (tiny_run["dir"] / "summary.md").read_text()


def test_benchmark_is_deterministic_given_the_seed(tiny_run: dict[str, Any]) -> None:
    (run,) = tiny_run["runs"]
    again = run_benchmark([Variant("switch", "switch")], SIZES["tiny"], seed=0)
    first = next(r for r in run.results if r.name == "switch")
    assert again.results[0].explained_variance == first.explained_variance
    assert again.results[0].mcc == first.mcc


def test_load_balancing_override_touches_only_moe_variants() -> None:
    variants = load_script().with_load_balancing(standard_variants(), 0.01)
    for variant in variants:
        coefficient = variant.options.get("load_balancing_coefficient")
        if variant.architecture in ("scale", "switch"):
            assert coefficient == 0.01
            assert sae_config(variant, SIZES["tiny"]).load_balancing_coefficient == 0.01
        else:
            assert coefficient is None
