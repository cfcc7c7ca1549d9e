"""The wheel and sdist as a user gets them: built, checked, installed outside the checkout.

`python -m build` makes the sdist and builds the wheel from it; `twine check` reads
both. The wheel goes into a fresh virtualenv in a temporary folder and the
package's commands run from another working directory, importing the installed
copy, never this checkout. By default the virtualenv borrows this interpreter's
installed dependencies (torch, SAELens: no download) through a `.pth` file and the
wheel is installed without dependencies; with SAELENS_MOE_WHEEL_FULL_INSTALL=1 (CI)
it installs torch==2.13.0 and then the wheel with every dependency from the index.
"""

import importlib.metadata
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import saelens_moe

REPO = Path(__file__).parents[1]
FULL_INSTALL = os.environ.get("SAELENS_MOE_WHEEL_FULL_INSTALL") == "1"
TORCH = "torch==2.13.0"

pytestmark = pytest.mark.packaging


def run(*command: str | Path, cwd: Path, timeout: float = 900) -> str:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it (`python -m build`)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO, cwd=out)
    return out


@pytest.fixture(scope="module")
def installed(
    dist: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A fresh virtualenv outside the checkout holding the wheel, and a working folder."""
    root = tmp_path_factory.mktemp("user")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=root)
    python = venv / "bin" / "python"
    (wheel,) = dist.glob("*.whl")
    if FULL_INSTALL:
        run(python, "-m", "pip", "install", "--quiet", TORCH, cwd=root)
        run(python, "-m", "pip", "install", "--quiet", wheel, cwd=root)
    else:
        purelib = run(
            python,
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=root,
        ).strip()
        borrowed = "\n".join(site.getsitepackages()) + "\n"
        (Path(purelib) / "borrowed_dependencies.pth").write_text(borrowed)
        run(python, "-m", "pip", "install", "--quiet", "--no-deps", wheel, cwd=root)
    work = root / "work"
    work.mkdir()
    return python, work


def test_build_makes_a_wheel_and_an_sdist_that_twine_accepts(dist: Path) -> None:
    version = saelens_moe.__version__
    names = sorted(path.name for path in dist.iterdir())
    assert names == [
        f"saelens_moe-{version}-py3-none-any.whl",
        f"saelens_moe-{version}.tar.gz",
    ]
    output = run(
        sys.executable,
        "-m",
        "twine",
        "check",
        "--strict",
        *sorted(dist.iterdir()),
        cwd=dist,
    )
    assert output.count("PASSED") == 2


def test_installed_wheel_is_imported_from_the_virtualenv_with_its_version(
    installed: tuple[Path, Path],
) -> None:
    python, work = installed
    output = run(
        python,
        "-c",
        "import importlib.metadata, saelens_moe; print(saelens_moe.__file__); "
        "print(saelens_moe.__version__); print(importlib.metadata.version('saelens-moe'))",
        cwd=work,
    )
    location, version, metadata_version = output.strip().splitlines()[-3:]
    assert Path(location).is_relative_to(python.parents[1])
    assert not Path(location).is_relative_to(REPO)
    assert version == metadata_version == saelens_moe.__version__


def test_installed_quickstart_runs_from_another_folder(
    installed: tuple[Path, Path],
) -> None:
    python, work = installed
    output = run(
        python, "-m", "saelens_moe.quickstart", "--tiny", "--output-dir", "qs", cwd=work
    )
    assert "| scale e=2 |" in output
    assert (work / "qs" / "results.md").exists()
    assert (work / "qs" / "plots" / "scale_e_2" / "browser.html").exists()


def test_installed_browser_smoke_run_writes_a_page(
    installed: tuple[Path, Path],
) -> None:
    python, work = installed
    run(python, "-m", "saelens_moe.browse", "--smoke", "--output", "b.html", cwd=work)
    assert (work / "b.html").read_text().startswith("<!DOCTYPE html>")


def test_installed_train_command_shows_saelens_flags_and_ours(
    installed: tuple[Path, Path],
) -> None:
    python, work = installed
    command = python.parent / "saelens-moe-train"
    output = run(command, "--help", cwd=work)
    for text in ("--architecture", "--push", "--context_size", "scale,switch"):
        assert text in output, text
    scale = run(command, "--architecture", "scale", "--help", cwd=work)
    for flag in ("--n_experts", "--n_active_experts", "--load_balancing_coefficient"):
        assert flag in scale, flag


def test_version_is_written_once_and_matches_the_installed_metadata() -> None:
    assert saelens_moe.__version__ == importlib.metadata.version("saelens-moe")
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?", saelens_moe.__version__)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "saelens_moe.__version__" }' in pyproject
    citation = (REPO / "CITATION.cff").read_text()
    assert f"version: {saelens_moe.__version__}\n" in citation
