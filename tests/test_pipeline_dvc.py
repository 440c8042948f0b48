"""`dvc repro` of validate + prepare with the real DVC in a temporary git repo, on a small example copy."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnops.data.example import write_digits

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("validate", "prepare")
ENV = {
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "cnnops tests",
    "GIT_AUTHOR_EMAIL": "tests@cnnops.invalid",
    "GIT_COMMITTER_NAME": "cnnops tests",
    "GIT_COMMITTER_EMAIL": "tests@cnnops.invalid",
}


def sh(root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_runs_validate_and_prepare_then_does_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "cnnops", "make-example", "data", "--per-class", "12")  # the real command, in the repo
    write_digits(tmp_path / "again", per_class=12)
    assert not filecmp.dircmp(root / "data", tmp_path / "again").diff_files  # deterministic bytes
    assert len(list((root / "data").rglob("*.png"))) == 120

    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in STAGES}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copy(PROJECT / "params.yaml", root / "params.yaml")
    shutil.copytree(PROJECT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "add", "-q", "data")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "example copy")

    sh(root, "dvc", "repro")
    assert (root / "reports" / "validation_docs" / "index.html").exists()
    assert {p.name for p in (root / "prepared").iterdir()} == {
        f"{s}.{ext}" for s in ("train", "val", "test") for ext in ("npy", "json")
    }
    lock = (root / "dvc.lock").read_text()
    assert set(yaml.safe_load(lock)["stages"]) == set(STAGES)
    metrics = sh(root, "dvc", "metrics", "show").stdout
    assert "reports/prepare.json" in metrics and "reports/validation.json" in metrics

    again = sh(root, "dvc", "repro")
    assert "Stage 'validate' didn't change, skipping" in again.stdout
    assert "Stage 'prepare' didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout
    assert (root / "dvc.lock").read_text() == lock

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["val_fraction"] = 0.3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    partial = sh(root, "dvc", "repro")
    assert "Stage 'validate' didn't change, skipping" in partial.stdout
    assert "Running stage 'prepare'" in partial.stdout
