"""The domains benchmark: its grid, its tables and its pilot end to end."""

import json
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def domains() -> ModuleType:
    return load_benchmark("synthetic_domains")


def test_ground_truth_has_the_realistic_size(domains: ModuleType) -> None:
    assert domains.SIZE == load_benchmark("synthetic_realistic").REALISTIC
    assert 16 <= domains.DOMAINS.n_domains <= 32
    assert domains.STRENGTHS[0] == 0.0 and len(domains.STRENGTHS) >= 3


def test_grid_has_every_variant_k_and_n_and_three_seeds_at_the_headline(
    domains: ModuleType,
) -> None:
    points = domains.grid_points(domains.GRID)
    per_strength = Counter(p.strength for p in points)
    # seed 0: 4 routed SAEs x 2 K x 2 N + TopK x 2 K; seeds 1, 2: 5 SAEs at (8, 8)
    assert per_strength == dict.fromkeys(domains.STRENGTHS, 18 + 2 * 5)
    topk = [p for p in points if p.variant.name == "topk"]
    assert {p.n_experts for p in topk} == {None}
    headline = [
        p
        for p in points
        if p.strength == 0.5 and (p.k, p.n_experts or 8) == domains.HEADLINE
    ]
    assert Counter(p.variant.name for p in headline) == dict.fromkeys(
        ["topk", "switch", "scale e=2", "scale e=4", "scale e=8"], 3
    )
    keys = [p.key(1) for p in points]
    assert len(set(keys)) == len(keys)


def test_ideas_compare_each_router_init_on_both_ground_truths(
    domains: ModuleType,
) -> None:
    points = domains.grid_points(domains.IDEAS)
    inits = Counter(
        (p.variant.architecture, p.variant.options["router_init"]) for p in points
    )
    assert set(inits) == {
        (architecture, init)
        for architecture in ("switch", "scale")
        for init in ("random", "kmeans")
    }
    assert {p.strength for p in points} == {0.0, max(domains.STRENGTHS)}
    assert {p.seed for p in points} == {0, 1, 2}
    # the grid ran with random routers and keeps them, to stay reproducible
    for variant in domains.GRID.variants:
        assert variant.options.get("router_init", "random") == "random"


def test_command_line_filters_variants_k_n_and_seeds(domains: ModuleType) -> None:
    study = domains.chosen_study(
        domains.parse_args(
            ["--ideas", "--variants", "scale e=2 k-means", "--k", "32", "--extra-seeds"]
        )
    )
    assert [v.name for v in study.variants] == ["scale e=2 k-means"]
    assert (study.k_values, study.extra_seeds) == ((32,), ())
    with pytest.raises(SystemExit, match="unknown"):
        domains.chosen_study(domains.parse_args(["--variants", "scale e=3"]))


def test_shards_split_the_grid_without_overlap(domains: ModuleType) -> None:
    points = domains.grid_points(domains.GRID)
    shards = [points[i::3] for i in range(3)]
    keys = [p.key(1) for shard in shards for p in shard]
    assert sorted(keys, key=repr) == sorted((p.key(1) for p in points), key=repr)


def _entry(name: str, seed: int, nmi: float | None, ev: float) -> dict[str, Any]:
    scores: dict[str, float] = {
        f"live/redundancy/{scope}0.{tau}": 0.0
        for scope in ("", "intra_expert/", "inter_expert/")
        for tau in (8, 9)
    }
    if nmi is not None:
        scores |= {
            "routing/nmi": nmi,
            "routing/chance_nmi": 0.001,
            "latents/domain_purity": None,
            "latents/chance_domain_purity": None,
            "latents/n_matched": 10 * seed,
        }
    return {
        "strength": 0.5,
        "name": name,
        "k": 8,
        "grid_n_experts": None if nmi is None else 8,
        "seed": seed,
        "tokens": 1000,
        "explained_variance": ev,
        "mcc": 0.5,
        "dead_latents": 3,
        "train_seconds": 20.0,
        "scores": scores,
    }


def test_results_table_averages_seeds_and_sets_scores_beside_chance(
    domains: ModuleType,
) -> None:
    entries = [
        _entry("switch", 0, 0.2, 0.5),
        _entry("switch", 1, 0.4, 0.7),
        _entry("topk", 0, None, 0.6),
    ]
    lines = domains.results_table(entries).splitlines()
    assert len(lines) == 4
    topk, switch = lines[2], lines[3]  # TopK first, as in the variant order
    assert topk.startswith("| 0.5 | 8 | - | topk | 1 | 0.600 |")
    assert switch.startswith("| 0.5 | 8 | 8 | switch | 2 | 0.600 ± 0.141 |")
    assert "| 0.300 ± 0.141 (0.001) |" in switch
    assert "| - [5] |" in switch  # no latent matched in seed 0, 10 in seed 1
    assert "| - |" in topk  # no routing for a dense SAE


def test_quick_pilot_runs_end_to_end_and_resumes(
    domains: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    domains.main(["--quick", "--output-dir", str(tmp_path)])
    entries = json.loads((tmp_path / "synthetic_domains_quick.json").read_text())
    assert [(e["strength"], e["name"]) for e in entries] == [
        (s, name) for s in (0.0, 0.9) for name in ("topk", "switch", "scale e=2")
    ]
    for entry in entries:
        scores = entry["scores"]
        assert 0 < entry["explained_variance"] <= 1
        assert 0 < scores["n_live"] <= 64  # fired on the labelled tokens
        assert 0 <= scores["live/redundancy/0.8"] <= 1
        if entry["name"] == "topk":
            assert "routing/nmi" not in scores
        else:
            assert 0 <= scores["routing/nmi"] <= 1
            assert len(scores["routing/purity"]) == 4
    table = (tmp_path / "synthetic_domains_quick.md").read_text()
    assert table.count("| scale e=2 |") == 2
    assert (tmp_path / "synthetic_domains_quick.png").stat().st_size > 0
    assert table.strip() in capsys.readouterr().out
    domains.main(["--quick", "--output-dir", str(tmp_path)])  # nothing left to run
    again = json.loads((tmp_path / "synthetic_domains_quick.json").read_text())
    assert len(again) == len(entries)
