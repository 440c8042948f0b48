"""`dvc repro` of validate + prepare with the real DVC in a temporary git repo, on a small example copy."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest
import yaml
from fixtures_prefect import PROJECT, sh

from cnnops.data.example import write_digits

STAGES = ("validate", "prepare")


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
    metrics = sh(root, "dvc", "metrics", "show")
    assert "reports/prepare.json" in metrics and "reports/validation.json" in metrics

    again = sh(root, "dvc", "repro")
    assert "Stage 'validate' didn't change, skipping" in again
    assert "Stage 'prepare' didn't change, skipping" in again
    assert "Running stage" not in again
    assert (root / "dvc.lock").read_text() == lock

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["val_fraction"] = 0.3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    partial = sh(root, "dvc", "repro")
    assert "Stage 'validate' didn't change, skipping" in partial
    assert "Running stage 'prepare'" in partial
