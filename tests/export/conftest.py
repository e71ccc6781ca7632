"""The Hub without a network: a stand-in for the upload calls and a Hub cache filled by the test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hub cache of the test's own, in offline mode (nothing reaches the network)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """HfApi.create_repo/upload_folder record their calls and copy the folder into ``tmp_path/remote``."""
    calls = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **options):
        calls.append(("upload_folder", repo_id, options))
        shutil.copytree(folder_path, tmp_path / "remote" / repo_id)
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("promptvit.hub.hub_reachable", lambda timeout=0: True)
    return calls


def populate_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repo / "snapshots" / COMMIT, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
