"""Publish trained Scale and Switch SAEs to the Hugging Face Hub, with a model card.

Uploading goes through SAELens's own `upload_saes_to_huggingface`, so the repo
layout (`<sae_id>/cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`,
`runner_cfg.json`) is the one `SAE.from_pretrained(repo_id, sae_id)` reads.
Hub tokens are never written anywhere: uploaded configs are scrubbed of them and
errors that quote one are re-raised without it.
"""

import json
import re
import shutil
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, NamedTuple

from huggingface_hub import HfApi, get_token
from sae_lens import upload_saes_to_huggingface
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)

from saelens_moe import __version__
from saelens_moe.saes.scale_sae import PAPER_URL as SCALE_PAPER_URL
from saelens_moe.saes.switch_sae import PAPER_URL as SWITCH_PAPER_URL

PAPERS: dict[str, tuple[str, str]] = {
    "scale": (
        "Beyond Redundancy: Diverse and Specialized Multi-Expert Sparse Autoencoder",
        SCALE_PAPER_URL,
    ),
    "switch": (
        "Efficient Dictionary Learning with Switch Sparse Autoencoders",
        SWITCH_PAPER_URL,
    ),
}
CLASS_NAMES = {"scale": "ScaleSAE", "switch": "SwitchSAE"}
PLUGIN_ARCHITECTURES = frozenset(CLASS_NAMES)
"""Architectures that load only with this plugin imported; SAELens's own need nothing."""
DISTRIBUTION = "saelens-moe"
PUBLISHED_INSTALL = f"pip install {DISTRIBUTION}"
"""The install command once the release is on PyPI (it is not there yet)."""
REDACTED = "<redacted>"
TOKEN_KEYS = frozenset({"token", "use_auth_token", "hf_token", "hub_token"})
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
SAE_FILES = (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    RUNNER_CFG_FILENAME,
)
RUN_FIELDS = (
    ("model", "model_name"),
    ("hook", "hook_name"),
    ("dataset", "dataset_path"),
    ("training tokens", "training_tokens"),
    ("context size", "context_size"),
    ("batch size (tokens)", "train_batch_size_tokens"),
    ("learning rate", "lr"),
    ("lr schedule", "lr_scheduler_name"),
    ("lr decay steps", "lr_decay_steps"),
)
SAELENS_STATS = ("l0", "num_dead_features")

Metrics = Mapping[str, object]


class TrainedSAE(NamedTuple):
    """What a runner output folder says about one SAE."""

    cfg: dict[str, Any]
    """The inference config (`cfg.json`)."""
    runner_cfg: dict[str, Any] | None
    """The runner config (`runner_cfg.json`), when the folder has one."""


def read_output_folder(folder: str | Path) -> TrainedSAE:
    """Read `cfg.json` and, if present, `runner_cfg.json` of a runner output folder."""
    folder = Path(folder)
    cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
    runner_path = folder / RUNNER_CFG_FILENAME
    runner_cfg = json.loads(runner_path.read_text()) if runner_path.exists() else None
    return TrainedSAE(cfg, runner_cfg)


def push_to_hub(
    saes: Mapping[str, str | Path],
    repo_id: str,
    *,
    metrics: Mapping[str, Metrics] | None = None,
    private: bool = False,
    revision: str = "main",
) -> str:
    """Upload runner output folders as `<sae_id>/` in `repo_id`, plus a model card.

    `saes` maps each sae_id to a folder written by a SAELens runner (its
    `output_path`); `metrics` optionally maps sae_ids to flat or nested dicts
    (e.g. a metrics result's `to_dict()`). The token comes from `HF_TOKEN` or
    `hf auth login`. Returns the repo URL.
    """
    folders = {sae_id: Path(folder) for sae_id, folder in saes.items()}
    token = get_token()
    card = build_model_card(
        repo_id,
        {sae_id: read_output_folder(folder) for sae_id, folder in folders.items()},
        metrics,
    )
    with _redacted_errors(token), TemporaryDirectory() as tmp:
        staged = {
            sae_id: _stage_folder(folder, Path(tmp) / str(index), token)
            for index, (sae_id, folder) in enumerate(folders.items())
        }
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        upload_saes_to_huggingface(
            dict(staged),
            repo_id,
            hf_revision=revision,
            show_progress=False,
            add_default_readme=False,
        )
        api.upload_file(
            path_or_fileobj=_scrub_text(card, token).encode(),
            path_in_repo="README.md",
            repo_id=repo_id,
            revision=revision,
            commit_message="Add model card",
        )
    return f"https://huggingface.co/{repo_id}"


def _stage_folder(folder: Path, staged: Path, token: str | None) -> Path:
    """Copy the SAELens files of `folder`, scrubbed of tokens, and label the config."""
    staged.mkdir(parents=True)
    for name in SAE_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, staged / name)
    for name in (SAE_CFG_FILENAME, RUNNER_CFG_FILENAME):
        path = staged / name
        if path.exists():
            content = _scrub(json.loads(path.read_text()), token)
            if name == SAE_CFG_FILENAME:
                _label_config(content)
            path.write_text(json.dumps(content))
    return staged


def repository_install() -> str:
    """The one command that installs this package today, from its repository.

    Uses the "Repository" URL of the installed package's metadata
    (`[project.urls]` in pyproject.toml) when it has one, else a clone of the
    repository in `./saelens-moe`.
    """
    url = _repository_url()
    if url is None:
        return f"pip install ./{DISTRIBUTION}"
    return f'pip install "{DISTRIBUTION} @ git+{url}"'


def _repository_source() -> str:
    if _repository_url() is None:
        return f"a clone of the saelens-moe repository in ./{DISTRIBUTION}"
    return "the saelens-moe repository"


def requirement_note(architecture: str) -> str:
    """How to get a `scale` / `switch` SAE loading: install, then import."""
    return (
        f"needs the saelens-moe plugin {__version__} or later (today from "
        f"{_repository_source()}: `{repository_install()}`; once published on PyPI: "
        f"`{PUBLISHED_INSTALL}`), then `import saelens_moe` before loading (without "
        f"it SAELens raises KeyError: '{architecture}')"
    )


def _repository_url() -> str | None:
    try:
        urls = metadata(DISTRIBUTION).get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("repository", "source") and url.strip():
            return url.strip()
    return None


def _label_config(cfg: dict[str, Any]) -> None:
    """Say in cfg.json's metadata which package loads this SAE, if one is needed."""
    metadata = cfg.setdefault("metadata", {})
    architecture = str(cfg.get("architecture"))
    if architecture in PLUGIN_ARCHITECTURES:
        metadata["requires"] = f"This SAE {requirement_note(architecture)}."
    metadata["saelens_moe_version"] = __version__


def _scrub(value: Any, token: str | None) -> Any:
    """A copy of a JSON value with every Hub token replaced by REDACTED."""
    if isinstance(value, dict):
        return {
            key: REDACTED
            if key in TOKEN_KEYS and value[key]
            else _scrub(value[key], token)
            for key in value
        }
    if isinstance(value, list):
        return [_scrub(item, token) for item in value]
    if isinstance(value, str):
        return _scrub_text(value, token)
    return value


def _scrub_text(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)


@contextmanager
def _redacted_errors(token: str | None) -> Generator[None, None, None]:
    """Re-raise an error that quotes a token as a RuntimeError without it (or its chain)."""
    try:
        yield
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        scrubbed = _scrub_text(message, token)
        if scrubbed == message:
            raise
        raise RuntimeError(scrubbed) from None


def build_model_card(
    repo_id: str,
    saes: Mapping[str, TrainedSAE],
    metrics: Mapping[str, Metrics] | None = None,
) -> str:
    """The README.md of a repo holding `saes` (keyed by sae_id), in Markdown."""
    metrics = metrics or {}
    first_id = next(iter(saes))
    sections = [
        _front_matter(saes.values()),
        _card_intro(saes.values()),
        _usage(repo_id, first_id, _architectures(saes.values())),
        *(
            _sae_section(sae_id, sae, metrics.get(sae_id))
            for sae_id, sae in saes.items()
        ),
    ]
    return "\n\n".join(sections) + "\n"


def _architectures(saes: Any) -> list[str]:
    return sorted({str(sae.cfg.get("architecture")) for sae in saes})


def _front_matter(saes: Any) -> str:
    names = _architectures(saes)
    tags = ["sparse-autoencoder", "saelens", "saelens-moe"]
    if any(name in PLUGIN_ARCHITECTURES for name in names):
        tags.append("mixture-of-experts")
    tags += [f"{name}-sae" for name in names]
    tag_lines = "\n".join(f"- {tag}" for tag in tags)
    return f"---\nlibrary_name: saelens\ntags:\n{tag_lines}\n---"


def _card_intro(saes: Any) -> str:
    names = _architectures(saes)
    moe = any(name in PLUGIN_ARCHITECTURES for name in names)
    title = "Mixture-of-Experts sparse autoencoders" if moe else "Sparse autoencoders"
    lines = [f"# {title} for SAELens", ""]
    lines.append(
        "Trained with [SAELens](https://github.com/decoderesearch/SAELens) and "
        "published with the `saelens-moe` plugin. Architectures here:"
    )
    lines.append("")
    for name in names:
        paper_title, url = PAPERS.get(name, (name, ""))
        source = "saelens-moe" if name in PLUGIN_ARCHITECTURES else "SAELens"
        paper = f": {paper_title} ({url})" if url else ""
        lines.append(f"- `{name}` ({source}){paper}")
    return "\n".join(lines)


def _usage(repo_id: str, sae_id: str, architectures: list[str]) -> str:
    plugin = [name for name in architectures if name in PLUGIN_ARCHITECTURES]
    load = [
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{sae_id}")',
        "```",
    ]
    if not plugin:
        return "\n".join(
            ["## Usage", "", "These SAEs load with SAELens alone:", "", *load]
        )
    names = ", ".join(f"`{name}`" for name in plugin)
    need = f"The {names} SAEs here need the saelens-moe plugin {__version__} or later"
    others = len(plugin) < len(architectures)
    return "\n".join(
        [
            "## Usage",
            "",
            need
            + ("; every other SAE here loads with SAELens alone." if others else "."),
            "",
            "```bash",
            f"# today, from {_repository_source()}:",
            repository_install(),
            "# once saelens-moe is published on PyPI (not yet):",
            PUBLISHED_INSTALL,
            "```",
            "",
            "Import it before loading (without it SAELens raises "
            f"KeyError: '{plugin[0]}'):",
            "",
            load[0],
            f"import saelens_moe  # registers the {names} architectures",
            *load[1:],
        ]
    )


def _sae_section(sae_id: str, sae: TrainedSAE, metrics: Metrics | None) -> str:
    architecture = str(sae.cfg.get("architecture"))
    class_name = CLASS_NAMES.get(architecture)
    named = f" (`{class_name}`)" if class_name else ""
    lines = [f"## `{sae_id}`", "", f"Architecture: `{architecture}`{named}."]
    fields = _architecture_fields(sae.cfg)
    if fields:
        lines += ["", _table(("field", "value"), fields)]
    run = _run_fields(sae)
    if run:
        lines += ["", "### Training run", "", _table(("setting", "value"), run)]
    lines += ["", "### Metrics", "", _metrics_section(sae.cfg, metrics)]
    return "\n".join(lines)


def _architecture_fields(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    fields = {
        key: value
        for key, value in cfg.items()
        if key not in ("metadata", "device", "architecture")
    }
    details = cfg.get("metadata", {}).get("training_architecture_details") or {}
    fields |= {f"{key} (training)": value for key, value in details.items()}
    return [(key, _format(value)) for key, value in sorted(fields.items())]


def _run_fields(sae: TrainedSAE) -> list[tuple[str, str]]:
    source = sae.runner_cfg or sae.cfg.get("metadata", {})
    rows = [
        (label, _format(source[key]))
        for label, key in RUN_FIELDS
        if source.get(key) not in (None, "")
    ]
    tokens, batch = source.get("training_tokens"), source.get("train_batch_size_tokens")
    if isinstance(tokens, int) and isinstance(batch, int) and batch > 0:
        rows.append(("steps", str(tokens // batch)))
    return rows


def _metrics_section(cfg: Mapping[str, Any], metrics: Metrics | None) -> str:
    metadata = cfg.get("metadata", {})
    rows = [
        (f"{name} (SAELens, end of training)", _format(metadata[name]))
        for name in SAELENS_STATS
        if metadata.get(name) is not None
    ]
    rows += [(name, _format(value)) for name, value in _flatten(metrics or {})]
    if not rows:
        return "No metrics were recorded for this SAE."
    return _table(("metric", "value"), rows)


def _flatten(
    values: Mapping[str, object], prefix: str = ""
) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")  # pyright: ignore[reportUnknownArgumentType]
        else:
            rows.append((name, value))
    return rows


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{len(value)} values"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines)
