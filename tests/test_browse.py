"""The feature browser: streaming statistics against dense references, the page's
data against the SAE, and the page itself in headless Chromium (rendering, script
errors, links, screenshots kept under tests/artifacts/)."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from matplotlib.image import imread
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from saelens_moe.browse import BrowseConfig, BrowserPage, browse, collect, main
from saelens_moe.browse.cli import smoke_sae
from saelens_moe.browse.collect import (
    LatentHistograms,
    LatentTriples,
    TopExamples,
    sparse_latents,
)
from saelens_moe.browse.sources import hook_activations, pseudo_words
from saelens_moe.metrics import expert_load
from saelens_moe.tiny import TINY_D_MODEL, TINY_HOOK, TINY_MODEL_NAME
from tests.helpers import build_tiny_gpt2, populate_hub_cache

ARTIFACTS = Path(__file__).parent / "artifacts"
CONTEXT = 32
N_CONTEXTS = 24
PROMPTS = ("5 17 42 99 3 150 8 61", "120 7 7 7 33")
ROUNDING = 5e-3
"""Largest relative error of the page's numbers, rounded to 3 significant digits."""


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> Any:
    return build_tiny_gpt2()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(1, 200, (N_CONTEXTS, CONTEXT), generator=generator)


@pytest.fixture(scope="module")
def scale_sae() -> SAE[Any]:
    return smoke_sae()


@pytest.fixture(scope="module")
def topk_sae() -> SAE[Any]:
    torch.manual_seed(1)
    metadata = SAEMetadata(hook_name=TINY_HOOK, model_name=TINY_MODEL_NAME)
    return TopKSAE(TopKSAEConfig(d_in=TINY_D_MODEL, d_sae=96, k=6, metadata=metadata))


def build(
    sae: SAE[Any], model: Any, tokens: torch.Tensor, path: Path, **config: Any
) -> BrowserPage:
    settings: dict[str, Any] = {
        "n_tokens": tokens.numel(),
        "context_size": CONTEXT,
        "batch_tokens": 4 * CONTEXT,  # six batches: merging across batches is tested
        "n_examples": 4,
        "window": 3,
        **config,
    }
    return browse(
        sae,
        path,
        model=model,
        tokens=tokens,
        prompts=PROMPTS,
        config=BrowseConfig(**settings),
        text=pseudo_words,
    )


@pytest.fixture(scope="module")
def scale_page(
    tmp_path_factory: pytest.TempPathFactory,
    scale_sae: SAE[Any],
    model: Any,
    tokens: torch.Tensor,
) -> BrowserPage:
    return build(scale_sae, model, tokens, tmp_path_factory.mktemp("b") / "scale.html")


def embedded(page: BrowserPage) -> dict[str, Any]:
    """The JSON the page embeds, read back from the file."""
    text = page.path.read_text(encoding="utf-8")
    match = re.search(
        r'<script type="application/json" id="browser-data">(.*?)</script>',
        text,
        re.S,
    )
    assert match is not None
    return json.loads(match.group(1))


def dense_acts(sae: SAE[Any], model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Reference: SAELens's dense encode of every token. [contexts, positions, d_sae]"""
    with torch.no_grad():
        return sae.encode(hook_activations(model, sae, tokens))


# ------------------------------------------------------------ streaming statistics


def reference_examples(
    acts: torch.Tensor, latent: int, n: int
) -> list[tuple[float, int, int]]:
    """(value, context, position) of the latent's n best contexts, by brute force."""
    best, position = acts[:, :, latent].max(dim=1)  # per context
    order = best.argsort(descending=True)
    return [
        (float(best[c]), int(c), int(position[c])) for c in order[:n] if best[c] > 0
    ]


def test_TopExamples_merge_batches_into_each_latents_best_contexts() -> None:
    generator = torch.Generator().manual_seed(0)
    contexts, positions, d_sae, n, window = 30, 7, 12, 4, 2
    acts = torch.rand(contexts, positions, d_sae, generator=generator)
    acts[acts < 0.8] = 0  # sparse; latent 11 never fires
    acts[:, :, 11] = 0
    tokens = torch.randint(0, 50, (contexts, positions), generator=generator)
    examples = TopExamples(d_sae, n, window)
    for first in range(0, contexts, 4):
        batch = acts[first : first + 4].flatten(0, 1)
        token, latent = batch.nonzero(as_tuple=True)
        triples = LatentTriples(token, latent, batch[token, latent])
        examples.add(triples, positions, tokens[first : first + 4], first)

    for latent in range(d_sae):
        expected = reference_examples(acts, latent, n)
        found = int((examples.context[latent] >= 0).sum())
        got = [
            (
                float(examples.values[latent, s]),
                int(examples.context[latent, s]),
                int(examples.position[latent, s]),
            )
            for s in range(found)
        ]
        assert got == expected, latent
        for slot, (_, context, position) in enumerate(expected):
            for offset in range(-window, window + 1):
                where = position + offset
                inside = 0 <= where < positions
                token = examples.window_tokens[latent, slot, offset + window]
                act = examples.window_acts[latent, slot, offset + window]
                assert int(token) == (int(tokens[context, where]) if inside else -1)
                assert float(act) == (
                    float(acts[context, where, latent]) if inside else 0
                )
    assert int((examples.context[11] >= 0).sum()) == 0


def test_LatentHistograms_count_exactly_over_a_range_that_doubles() -> None:
    generator = torch.Generator().manual_seed(1)
    d_sae, n_bins = 5, 16
    histograms = LatentHistograms(d_sae, n_bins)
    batches = []
    for scale in (0.6, 1.1, 2.5, 4.5, 20.0, 0.5):  # the range doubles 1, 1, 1, 2 times
        latent = torch.randint(0, d_sae - 1, (200,), generator=generator)
        value = torch.rand(200, generator=generator) * scale + 1e-3
        batches.append((latent, value))
        histograms.add(LatentTriples(torch.zeros_like(latent), latent, value))

    latent = torch.cat([b[0] for b in batches])
    value = torch.cat([b[1] for b in batches])
    for j in range(d_sae):
        mine = value[latent == j]
        top = 2.0 ** int(histograms.exponent[j])
        if mine.numel() == 0:
            assert int(histograms.counts[j].sum()) == 0
            continue
        assert top / 2 <= float(mine.max()) < top  # the tightest power of two
        expected = torch.histc(mine.double(), bins=n_bins, min=0, max=top).long()
        assert histograms.counts[j].tolist() == expected.tolist()
        assert float(histograms.value_sum[j]) == pytest.approx(float(mine.sum()))


@pytest.mark.parametrize("which", ["scale", "topk"])
def test_sparse_latents_equal_the_saes_dense_encode(
    which: str,
    scale_sae: SAE[Any],
    topk_sae: SAE[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = scale_sae if which == "scale" else topk_sae
    monkeypatch.setattr(collect, "DENSE_CHUNK_BYTES", 4 * sae.cfg.d_sae * 7)
    x = torch.randn(50, TINY_D_MODEL)
    triples = sparse_latents(sae, x)
    dense = torch.zeros(50, sae.cfg.d_sae)
    dense[triples.token, triples.latent] = triples.value
    with torch.no_grad():
        torch.testing.assert_close(dense, sae.encode(x))


# ----------------------------------------------------------------- the page's data


def test_browse_data_matches_the_saes_encode_over_every_token(
    scale_page: BrowserPage,
    scale_sae: SAE[Any],
    model: Any,
    tokens: torch.Tensor,
) -> None:
    data = embedded(scale_page)
    acts = dense_acts(scale_sae, model, tokens)
    assert data["fired"] == (acts > 0).flatten(0, 1).sum(0).tolist()
    assert data["meta"]["n_tokens"] == tokens.numel()
    assert set(data["pages"]) == {str(j) for j in range(scale_sae.cfg.d_sae)}
    for latent in (0, 37, 200, int((acts > 0).sum((0, 1)).argmax())):
        page = data["pages"][str(latent)]
        expected = reference_examples(acts, latent, 4)
        got = [(e["context"], e["position"]) for e in page["examples"]]
        assert got == [(c, p) for _, c, p in expected]
        for example, (value, context, position) in zip(
            page["examples"], expected, strict=True
        ):
            assert example["value"] == pytest.approx(value, rel=ROUNDING)
            centre = example["centre"]
            assert example["tokens"][centre] == int(tokens[context, position])
            assert example["acts"][centre] == pytest.approx(value, rel=ROUNDING)
        assert sum(page["hist"]) == int((acts[:, :, latent] > 0).sum())


def test_browse_expert_views_match_the_routers_load(
    scale_page: BrowserPage,
    scale_sae: SAE[Any],
    model: Any,
    tokens: torch.Tensor,
) -> None:
    experts = embedded(scale_page)["experts"]
    load = expert_load(scale_sae, hook_activations(model, scale_sae, tokens))
    assert experts["selected_share"] == pytest.approx(load.selected_share, rel=ROUNDING)
    assert experts["latents_per_expert"] == 256 // 8
    assert len(experts["tokens"]) == 8
    routed = sum(count for _, count, _ in experts["tokens"][0]["frequent"])
    assert 0 < routed <= load.selected_share[0] * tokens.numel() + 0.5


def test_browse_logits_are_the_decoder_rows_through_the_unembedding(
    scale_page: BrowserPage, scale_sae: SAE[Any], model: Any
) -> None:
    pages = embedded(scale_page)["pages"]
    logits = scale_sae.W_dec.detach() @ model.W_U.detach()
    for latent in (3, 100):
        page = pages[str(latent)]["logits"]
        assert [t for t, _ in page["top"]] == logits[latent].topk(10).indices.tolist()
        bottom = logits[latent].topk(10, largest=False).indices.tolist()
        assert [t for t, _ in page["bottom"]] == bottom


def test_browse_prompt_view_lists_each_tokens_experts_and_kept_latents(
    scale_page: BrowserPage, scale_sae: SAE[Any], model: Any
) -> None:
    prompt = embedded(scale_page)["prompts"][1]
    ids = [int(t) for t in PROMPTS[1].split()]
    assert prompt["tokens"] == ids
    acts = dense_acts(scale_sae, model, torch.tensor([ids]))[0]
    for position, kept in enumerate(prompt["latents"]):
        values, latents = acts[position].topk(8)
        assert [j for j, _ in kept] == latents[values > 0].tolist()
        assert len(prompt["experts"][position]) == 2
    assert prompt["n_kept"] == (acts > 0).sum(-1).tolist()


def test_browse_works_for_a_saelens_topk_sae_without_expert_views(
    tmp_path: Path, topk_sae: SAE[Any], model: Any, tokens: torch.Tensor
) -> None:
    page = build(topk_sae, model, tokens, tmp_path / "topk.html", latents=(0, 1))
    data = embedded(page)
    assert data["experts"] is None
    assert data["prompts"][0]["experts"] is None
    prompt_latents = {j for p in data["prompts"] for t in p["latents"] for j, _ in t}
    assert set(page.latents) == {0, 1} | prompt_latents
    assert set(data["pages"]) == {str(j) for j in page.latents}
    acts = dense_acts(topk_sae, model, tokens)
    assert data["fired"] == (acts > 0).flatten(0, 1).sum(0).tolist()


def test_browse_over_bare_activation_vectors_shows_sample_indices(
    tmp_path: Path, scale_sae: SAE[Any]
) -> None:
    vectors = torch.randn(300, TINY_D_MODEL)
    page = browse(
        scale_sae,
        tmp_path / "vectors.html",
        activations=vectors,
        config=BrowseConfig(n_tokens=250, batch_tokens=64, n_examples=3),
    )
    data = embedded(page)
    assert data["meta"]["n_tokens"] == 250
    assert not data["meta"]["has_tokens"]
    with torch.no_grad():
        acts = scale_sae.encode(vectors[:250])
    for latent in (0, 50):
        values, samples = acts[:, latent].topk(3)
        got = [e["context"] for e in data["pages"][str(latent)]["examples"]]
        assert got == samples[values > 0].tolist()
        assert "tokens" not in data["pages"][str(latent)]["examples"][0]


def test_page_is_self_contained(scale_page: BrowserPage) -> None:
    text = scale_page.path.read_text(encoding="utf-8")
    code = re.sub(r'<script type="application/json".*?</script>', "", text, flags=re.S)
    for needle in ("<link", " src=", "url(", "@import", "fetch(", "XMLHttpRequest"):
        assert needle not in code
    assert set(re.findall(r"https?://[^\s\"']+", code)) <= {
        "http://www.w3.org/2000/svg"
    }


# --------------------------------------------------------------- in a real browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path is not None:
            return path
    if os.environ.get("SAELENS_MOE_REQUIRE_BROWSER"):
        pytest.fail("no chromium on PATH (apt-get install chromium)")
    pytest.skip("no chromium on PATH (apt-get install chromium)")


def run_chromium(
    url: str, tmp_path: Path, *flags: str, budget_ms: int = 5000
) -> tuple[str, str]:
    """Load `url` headless; its DOM after the scripts ran, and the console log."""
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--virtual-time-budget={budget_ms}",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def console_errors(log: str) -> list[str]:
    return [
        line for line in log.splitlines() if "CONSOLE" in line and "Uncaught" in line
    ]


def body_attributes(dom: str) -> dict[str, str]:
    match = re.search(r"<body([^>]*)>", dom)
    assert match is not None, dom[:2000]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))


def render(page: Path, view: str, tmp_path: Path) -> str:
    """The DOM of one view, after checking it rendered with no script error."""
    dom, log = run_chromium(f"{page.as_uri()}#{view}", tmp_path, "--dump-dom")
    body = body_attributes(dom)
    assert console_errors(log) == []
    assert body.get("data-errors") == "0", re.search(r'id="errors"[^<]*<', dom)
    assert body.get("data-rendered") == "ok"
    assert body.get("data-view") == view
    assert f'id="{view}"' in dom
    return dom


def test_page_renders_latent_expert_prompt_and_overview_views_in_chromium(
    scale_page: BrowserPage, tmp_path: Path
) -> None:
    data = embedded(scale_page)
    latent = max(range(len(data["max"])), key=data["max"].__getitem__)
    page = data["pages"][str(latent)]

    dom = render(scale_page.path, f"latent-{latent}", tmp_path)
    assert f"Latent {latent}" in dom
    assert dom.count('class="example"') == len(page["examples"]) == 4
    assert dom.count('class="bar"') == len(page["hist"])
    assert dom.count('class="logit"') == 20
    expert = latent // 32
    assert f'href="#expert-{expert}"' in dom

    dom = render(scale_page.path, f"expert-{expert}", tmp_path)
    assert f"Expert {expert}" in dom
    assert "omega" in dom
    assert dom.count('href="#latent-') >= 32  # each of its latents, by density

    dom = render(scale_page.path, "overview", tmp_path)
    assert dom.count('href="#expert-') >= 8  # one bar per expert
    assert 'href="#prompt-1"' in dom


HARNESS = """<script>
// test harness, appended to a copy of the page: follow every link of a prompt view
window.addEventListener("load", async () => {
  const tick = () => new Promise((done) => setTimeout(done, 50));
  location.hash = "#prompt-0";
  await tick();
  const hrefs = [...new Set([...document.querySelectorAll("#main a")]
    .map((a) => a.getAttribute("href")))];
  const results = [];
  const first = document.querySelector('#main a[href^="#latent-"]');
  first.click();
  await tick();
  results.push({href: first.getAttribute("href"), view: document.body.dataset.view,
    found: document.getElementById(first.getAttribute("href").slice(1)) !== null});
  for (const href of hrefs) {
    location.hash = "#prompt-0";
    await tick();
    location.hash = href;
    await tick();
    results.push({href, view: document.body.dataset.view,
      rendered: document.body.dataset.rendered,
      found: document.getElementById(href.slice(1)) !== null,
      title: document.querySelector("#main h2").textContent});
  }
  const out = document.createElement("pre");
  out.id = "harness";
  out.textContent = JSON.stringify(results);
  document.body.append(out);
});
</script>
</body>"""


def test_prompt_view_links_open_their_latent_and_expert_views(
    scale_page: BrowserPage, tmp_path: Path
) -> None:
    harnessed = tmp_path / "harnessed.html"
    text = scale_page.path.read_text(encoding="utf-8")
    harnessed.write_text(text.replace("</body>", HARNESS), encoding="utf-8")
    dom, log = run_chromium(harnessed.as_uri(), tmp_path, "--dump-dom", budget_ms=20000)
    assert console_errors(log) == []
    assert body_attributes(dom).get("data-errors") == "0"
    match = re.search(r'<pre id="harness">(.*?)</pre>', dom, re.S)
    assert match is not None, "the harness did not finish"
    results = json.loads(html.unescape(match.group(1)))

    clicked, followed = results[0], results[1:]
    assert clicked["found"] and clicked["view"] == clicked["href"][1:]
    prompt = embedded(scale_page)["prompts"][0]
    latents = {j for token in prompt["latents"] for j, _ in token}
    experts = {e for token in prompt["experts"] for e, _ in token}
    assert {r["href"] for r in followed} == {f"#latent-{j}" for j in latents} | {
        f"#expert-{e}" for e in experts
    }
    for result in followed:
        target = result["href"][1:]
        assert result["found"] and result["rendered"] == "ok", result
        assert result["view"] == target
        kind, number = target.split("-")
        assert result["title"].startswith(f"{kind.capitalize()} {number}")


def test_chromium_check_catches_a_script_error(
    scale_page: BrowserPage, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.html"
    text = scale_page.path.read_text(encoding="utf-8")
    broken.write_text(text.replace('"hist":', '"hist_gone":', 1), encoding="utf-8")
    dom, _ = run_chromium(f"{broken.as_uri()}#latent-0", tmp_path, "--dump-dom")
    body = body_attributes(dom)
    assert body.get("data-rendered") == "error"
    assert body.get("data-errors") == "1"
    assert "Script errors:" in dom
    with pytest.raises(AssertionError):
        render(broken, "latent-0", tmp_path)


def screenshot(page: Path, view: str, tmp_path: Path, name: str) -> Path:
    """A 1280 x 900 screenshot of one view, copied to tests/artifacts/<name>."""
    path = tmp_path / name
    run_chromium(
        f"{page.as_uri()}#{view}",
        tmp_path,
        f"--screenshot={path}",
        "--window-size=1280,900",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def test_screenshots_show_a_rendered_page(
    scale_page: BrowserPage, tmp_path: Path
) -> None:
    data = embedded(scale_page)
    latent = max(range(len(data["max"])), key=data["max"].__getitem__)
    for view, name in (
        (f"latent-{latent}", "browser_latent.png"),
        ("expert-0", "browser_expert.png"),
        ("prompt-0", "browser_prompt.png"),
    ):
        pixels = imread(screenshot(scale_page.path, view, tmp_path, name))
        assert pixels.shape[:2] == (900, 1280)
        header = pixels[5:40, 400:900, :3]  # the dark title bar
        assert float(header.mean()) < 0.2
        body = pixels[200:800, 80:1200, :3]
        assert float(body.std()) > 0.05  # not a blank page


# ------------------------------------------------------------------ command line


def test_cli_smoke_writes_the_page_with_the_prompts_given(tmp_path: Path) -> None:
    output = tmp_path / "smoke.html"
    page = main(
        ["--smoke", "--n_tokens", "256", "--output", str(output), "--prompt", "4 5 6"]
    )
    data = embedded(page)
    assert page.path == output
    assert data["meta"]["n_tokens"] == 256
    assert [p["tokens"] for p in data["prompts"]] == [[4, 5, 6]]
    assert data["vocab"]["4"] == " ru"  # pseudo-words stand in for token strings
    assert "Smoke run" in data["meta"]["note"]


def test_cli_reads_a_saved_sae_and_a_hub_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sae_id = f"{TINY_HOOK}/scale"
    smoke_sae().save_model(tmp_path / "repo" / sae_id)
    common = ["--smoke", "--n_tokens", "64", "--latents", "0-4", "--prompt", "1 2"]
    from_folder = main(
        [
            "--sae_path",
            str(tmp_path / "repo" / sae_id),
            "--output",
            str(tmp_path / "a.html"),
            *common,
        ]
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    populate_hub_cache(tmp_path / "c", "org/saes", tmp_path / "repo")
    from_hub = main(
        [
            "--release",
            "org/saes",
            "--sae_id",
            sae_id,
            "--output",
            str(tmp_path / "b.html"),
            *common,
        ]
    )
    assert embedded(from_folder)["fired"] == embedded(from_hub)["fired"]
    assert embedded(from_folder)["pages"] == embedded(from_hub)["pages"]
    assert {0, 1, 2, 3, 4} <= set(from_hub.latents)
