"""`dvc repro` records a failing audit and goes on: the real DVC in a temporary git repo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_pipeline_dvc import PROJECT, sh

STAGES = ("validate", "prepare", "train", "evaluate", "audit")


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_records_a_failing_audit_and_does_not_stop(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "cnnops", "make-planted", "data", "--cue", "frame", "--class", "4", "--per-class", "30")
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in STAGES}
    pipeline.pop("plots", None)
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"].update(epochs=4, batch_size=32)
    params["audit"].update(methods=["gradcam"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(PROJECT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "add", "-q", "data")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "planted copy")

    sh(root, "dvc", "repro")  # sh raises on a non-zero exit: a `fail` verdict must not stop DVC
    report = json.loads((root / "reports" / "audit.json").read_text())
    assert report["verdict"] == "fail" and report["failed_classes"] == ["4"]
    assert (root / "reports" / "audit" / "index.html").exists()
    assert "audit" in yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "reports/audit.json" in sh(root, "dvc", "metrics", "show").stdout

    again = sh(root, "dvc", "repro")
    assert "Stage 'audit' didn't change, skipping" in again.stdout
