"""The documentation site builds strictly, and the README stays a first screen."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_WORDS = 900
REQUIRE_DOCS = bool(os.environ.get("SAELENS_MOE_REQUIRE_DOCS"))


def prose(markdown: str) -> str:
    """Markdown without its fenced code blocks."""
    return re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)


def test_readme_is_at_most_900_words_outside_code_blocks() -> None:
    words = len(prose(README.read_text()).split())
    assert words <= MAX_README_WORDS, f"README.md has {words} words outside code"


def test_readme_links_to_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert "docs/browser.png" in local
    for link in local:
        assert (REPO / link).exists(), link


def test_readme_links_every_documentation_page() -> None:
    readme = README.read_text()
    for page in DOCS.glob("*.md"):
        if page.name not in ("index.md", "benchmarks.md"):
            assert f"(docs/{page.name})" in readme, page.name


def test_every_documentation_page_is_in_the_navigation() -> None:
    config = (REPO / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert page.name in config, page.name


def test_mkdocs_build_is_strict_and_clean(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        if REQUIRE_DOCS:
            pytest.fail("mkdocs is not installed (pip install -e '.[docs]')")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--site-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("ScaleTrainingSAEConfig", "push_to_hub", "expert_matmul_path"):
        assert name in api, name
