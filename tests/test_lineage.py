"""Lineage: the commit a model came from, and whether the code differed from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cnnops.tracking.lineage import git_commit


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_dvc_own_writes_do_not_make_the_commit_dirty_but_code_changes_do(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    for name in ("dvc.lock", ".gitignore", "reports/.gitignore", "params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    for name in ("dvc.lock", ".gitignore", "reports/.gitignore"):  # what `dvc repro` rewrites
        (tmp_path / name).write_text("b\n")
    assert git_commit(tmp_path) == sha
    (tmp_path / "params.yaml").write_text("b\n")
    assert git_commit(tmp_path) == f"{sha}-dirty"
