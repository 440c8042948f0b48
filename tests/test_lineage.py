"""Lineage: the commit a model came from, whether the code differed from it, and its data version."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from cnnops.tracking.lineage import UNKNOWN, data_version, git_commit, lineage


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_dvc_own_writes_do_not_make_the_commit_dirty_but_code_changes_do(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: x\n    metrics:\n      - reports/m.json:\n          cache: false\n"
        "    plots:\n      - reports/plots/p.csv:\n          cache: false\n"
    )
    written = (
        "dvc.lock",
        ".gitignore",
        "reports/.gitignore",
        "data.dvc",
        "reports/m.json",
        "reports/plots/p.csv",
    )
    for name in (*written, "params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    for name in written:  # what `dvc repro` (and `dvc add`) rewrite, committed metrics and plots included
        (tmp_path / name).write_text("b\n")
    assert git_commit(tmp_path) == sha
    (tmp_path / "params.yaml").write_text("b\n")
    assert git_commit(tmp_path) == f"{sha}-dirty"


def test_data_version_is_none_without_a_recorded_hash_and_lineage_says_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dvc_file = tmp_path / "data.dvc"
    assert data_version(dvc_file) is None  # no file
    dvc_file.write_text("outs:\n- path: data\n")
    assert data_version(dvc_file) is None  # no md5 yet
    with caplog.at_level(logging.WARNING, logger="cnnops.tracking.lineage"):
        assert lineage(tmp_path, dvc_file).data_version == UNKNOWN
    assert "has no outs[0].md5" in caplog.text
    dvc_file.write_text("outs:\n- md5: 3f2a.dir\n  path: data\n")
    assert data_version(dvc_file) == "3f2a.dir"
