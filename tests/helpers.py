"""Tiny local stand-ins for GPT-2, OpenWebText and the Hub: nothing here touches the network."""

import shutil
from pathlib import Path
from typing import Any, BinaryIO

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

from saelens_moe.tiny import (  # noqa: F401  (re-exported for the tests)
    TINY_D_MODEL,
    TINY_VOCAB,
    build_tiny_gpt2,
    build_token_dataset,
)


class FakeHub:
    """Replaces the network calls of `huggingface_hub.HfApi` with a local folder.

    Repo contents land under `root/<repo_id>/`; the rest of HfApi (and SAELens's
    upload code) runs for real. Install with `FakeHub.install(monkeypatch, root)`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[str, bool] = {}  # repo_id -> private

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, root: Path) -> "FakeHub":
        hub = cls(root)
        for name in ("repo_info", "create_repo", "upload_folder", "upload_file"):
            monkeypatch.setattr(HfApi, name, getattr(hub, name))
        return hub

    def files(self, repo_id: str) -> set[str]:
        """Paths of every file in the repo, relative to its root."""
        repo = self.root / repo_id
        return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}

    def repo_info(self, repo_id: str, **_: Any) -> dict[str, str]:
        if repo_id not in self.repos:
            url = f"https://huggingface.co/api/models/{repo_id}"
            response = httpx2.Response(404, request=httpx2.Request("GET", url))
            raise RepositoryNotFoundError("Repository Not Found", response=response)
        return {"id": repo_id}

    def create_repo(
        self, repo_id: str, *, private: bool = False, exist_ok: bool = False, **_: Any
    ) -> str:
        if repo_id in self.repos and not exist_ok:
            raise FileExistsError(repo_id)
        self.repos.setdefault(repo_id, private)
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(
        self,
        *,
        folder_path: str | Path,
        repo_id: str,
        path_in_repo: str | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        **_: Any,
    ) -> None:
        """Upload what the real HfApi would select from the folder."""
        self.repo_info(repo_id)
        additions = HfApi()._prepare_upload_folder_additions(
            folder_path,
            path_in_repo or "",
            allow_patterns=allow_patterns,
            ignore_patterns=[
                *(
                    [ignore_patterns]
                    if isinstance(ignore_patterns, str)
                    else ignore_patterns or []
                ),
                *DEFAULT_IGNORE_PATTERNS,
            ],
        )
        for operation in additions:
            self._write(
                repo_id,
                operation.path_in_repo,
                Path(operation.path_or_fileobj).read_bytes(),
            )

    def upload_file(
        self,
        *,
        path_or_fileobj: str | Path | bytes | BinaryIO,
        path_in_repo: str,
        repo_id: str,
        **_: Any,
    ) -> None:
        self.repo_info(repo_id)
        if isinstance(path_or_fileobj, bytes):
            content = path_or_fileobj
        elif isinstance(path_or_fileobj, (str, Path)):
            content = Path(path_or_fileobj).read_bytes()
        else:
            content = path_or_fileobj.read()
        self._write(repo_id, path_in_repo, content)

    def _write(self, repo_id: str, path_in_repo: str, content: bytes) -> None:
        target = self.root / repo_id / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def populate_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay out `files` (a repo's contents) as huggingface_hub's cache of `repo_id`.

    With HF_HUB_CACHE=cache and HF_HUB_OFFLINE=1, `hf_hub_download` serves them.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)
    return repo
