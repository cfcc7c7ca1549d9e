import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE

from saelens_moe import ScaleSAE, SwitchSAE
from saelens_moe.quickstart import QuickstartOutput, main


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("quickstart")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        output = main(["--tiny", "--output-dir", str(out)])
    return {"dir": out, "output": output, "printed": printed.getvalue()}


def test_quickstart_prints_the_table(quickstart: dict[str, Any]) -> None:
    output: QuickstartOutput = quickstart["output"]
    names = [r.name for r in output.benchmark.results]
    assert names == ["topk", "switch", "scale e=2"]
    table = (quickstart["dir"] / "results.md").read_text()
    assert table.strip() in quickstart["printed"]
    for name in names:
        assert f"| {name} |" in table


def test_quickstart_writes_results_and_plots(quickstart: dict[str, Any]) -> None:
    out: Path = quickstart["dir"]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["results"]] == ["topk", "switch", "scale e=2"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in (out / "plots" / "scale_e_2").iterdir()} == {
        "redundancy.png",
        "expert_load.png",
        "omega.png",
        "browser.html",
    }
    assert {p.name for p in (out / "plots" / "topk").iterdir()} == {
        "redundancy.png",
        "browser.html",
    }


def browser_data(page: Path) -> dict[str, Any]:
    text = page.read_text(encoding="utf-8")
    start = text.index('<script type="application/json" id="browser-data">')
    body = text[text.index(">", start) + 1 : text.index("</script>", start)]
    return json.loads(body)


def test_quickstart_writes_a_feature_browser_for_each_sae(
    quickstart: dict[str, Any],
) -> None:
    output: QuickstartOutput = quickstart["output"]
    scale = browser_data(output.plot_dirs["scale e=2"] / "browser.html")
    sae = SAE.load_from_disk(str(output.sae_dirs["scale e=2"]))
    assert scale["meta"]["architecture"] == "scale"
    assert scale["meta"]["n_tokens"] == 8192
    assert not scale["meta"]["has_tokens"]  # synthetic vectors: sample indices
    assert set(scale["pages"]) == {str(j) for j in range(sae.cfg.d_sae)}
    experts = scale["experts"]
    assert len(experts["selected_share"]) == sae.cfg.n_experts
    assert sum(experts["selected_share"]) == pytest.approx(2.0, abs=0.01)
    assert len(experts["omega"]) == sae.cfg.n_experts  # the training SAE's omega
    assert sum(scale["fired"]) == pytest.approx(8192 * 4, rel=0.01)  # L0 4
    top = max(scale["pages"].values(), key=lambda page: len(page["examples"]))
    assert top["examples"] and "tokens" not in top["examples"][0]
    topk = browser_data(output.plot_dirs["topk"] / "browser.html")
    assert topk["experts"] is None


def test_quickstart_saes_load_with_saelens_and_reconstruct(
    quickstart: dict[str, Any],
) -> None:
    output: QuickstartOutput = quickstart["output"]
    loaded = {
        name: SAE.load_from_disk(str(path)) for name, path in output.sae_dirs.items()
    }
    assert isinstance(loaded["scale e=2"], ScaleSAE)
    assert isinstance(loaded["switch"], SwitchSAE)
    assert loaded["topk"].cfg.architecture() == "topk"
    x = torch.randn(16, loaded["topk"].cfg.d_in)
    for sae in loaded.values():
        assert sae(x).shape == x.shape
    for result in output.benchmark.results:
        assert result.explained_variance > 0.2
        assert result.l0 == pytest.approx(4.0)
