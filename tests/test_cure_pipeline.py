"""The cure as a DVC stage and in the retrain flow, through the real tools (DVC, MLflow, Prefect, ONNX
Runtime) in temporary git + DVC projects.

One planted project (`cured_project`: digits with a corner square in class 3, tiny: 32 px, 60 per
class, a ConvNet, 4 epochs) serves the DVC and flow tests: `dvc repro` runs validate..release, the
audit fails, the cure stage trains, re-audits, exports and releases the cured model. The flow test
copies it and turns the cure over to `orchestrate.auto_cure`, so only the cure stage re-runs. The
cure stage skipped on clean data: tests/test_pipelines_flows.py, on the retrain's clean workspace
(its `dvc repro` succeeding). The CLI tests need no model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_prefect import PROJECT, copy_workspace, flow_artifact, init_project, sh, tool_env
from mlflow import MlflowClient

from cnnops.config import deep_merge
from cnnops.data.planted import make_planted
from pipelines.flows import RetrainResult, cure_table, retrain

CURED_FILES = {"train.json", "metrics.json", "audit.json", "export.json", "release.json", "model_card.html"}
# fixtures_audit.case_params's pipeline (the cure's proofs in tests/test_cure.py), as params.yaml
TINY: dict[str, Any] = {
    "data": {"color_mode": "L", "near_duplicate_distance": 0},
    "prepare": {"image_size": [32, 32]},
    "train": {
        "model": "convnet", "epochs": 4, "batch_size": 32, "label_smoothing": 0.0,
        "early_stopping_patience": None, "augment": {"random_resized_crop": False},
    },
    "audit": {"methods": ["gradcam"]},
    "export": {"latency_runs": 5, "throughput_batch": 32},
    "cure": {"enabled": True, "epochs": 4, "rate": 0.5},
}  # fmt: skip


def write_params(root: Path, *overrides: dict[str, Any]) -> None:
    params = deep_merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), TINY)
    for override in overrides:
        params = deep_merge(params, override)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(root: Path, cue: str, cued_class: str | None, seed: int) -> Path:
    """A git + DVC project: the repo's dvc.yaml and sources, TINY params, planted digits in data.dvc."""
    root.mkdir(parents=True)
    make_planted(root / "data", cue, cued_class, seed=seed, image_size=32, per_class=60)
    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(PROJECT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(root)
    (root / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    return init_project(root, "planted cnnops project")


def report(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / "reports" / name).read_text())


@pytest.fixture(scope="module")
def cured_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted project after `dvc repro` (cure.enabled): the one expensive run of this module."""
    root = make_project(tmp_path_factory.mktemp("cure-pipeline") / "ws", "corner", "3", seed=1)
    sh(root, "dvc", "repro")
    return root


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_cures_a_failed_audit_and_releases_the_cured_model(cured_project: Path) -> None:
    root = cured_project
    failed, cure = report(root, "release.json"), report(root, "cure.json")
    # a failing audit is recorded, names the cued class first, and does not stop DVC (sh raises)
    audited = report(root, "audit.json")
    assert audited["verdict"] == "fail" and audited["failures"][0]["class"] == "3", audited["failures"][:3]
    assert (root / "reports" / "audit" / "index.html").exists()
    assert "reports/audit.json" in sh(root, "dvc", "metrics", "show")
    assert not failed["promoted"] and "audit verdict is 'fail'" in failed["reason"]
    assert cure["status"] == "cured", cure["findings"]
    assert (cure["before"]["audit_verdict"], cure["after"]["audit_verdict"]) == ("fail", "pass")
    assert cure["parent_run_id"] == failed["run_id"] != cure["run_id"]
    # the cured model: a new challenger with its own audit, champion by the unchanged rule
    released = cure["release"]
    assert released["run_id"] == cure["run_id"] and released["audit_verdict"] == "pass"
    assert int(released["version"]) == int(failed["version"]) + 1
    assert released["promoted"] and released["champion"] == released["version"], released["reason"]
    assert "there is no champion yet" in released["reason"]
    assert released == {k: report(root, "cure/release.json")[k] for k in released}
    assert {p.name for p in (root / "models" / "cured").iterdir()} == {"model.pt", "model.onnx"}
    assert {p.name for p in (root / "reports" / "cure").iterdir()} >= CURED_FILES
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    name = released["model_name"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == released["version"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == released["version"]
    tags = client.get_run(cure["run_id"]).data.tags
    assert tags["cnnops.cure.parent_run_id"] == failed["run_id"] and tags["cnnops.cure.status"] == "cured"
    # the stage is in dvc.lock with its outputs, and a second repro has nothing to do
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["cure"]
    assert {o["path"] for o in lock["outs"]} == {"models/cured", "reports/cure", "reports/cure.json"}
    again = sh(root, "dvc", "repro")
    assert "Running stage" not in again and "Stage 'cure' didn't change, skipping" in again


@pytest.mark.slow
@pytest.mark.integration
def test_auto_cure_in_the_retrain_flow_notifies_the_before_after_table(
    cured_project: Path, tmp_path: Path, webhook, prefect_harness
) -> None:
    """cure.enabled off, orchestrate.auto_cure on: the same cure stage runs (its params changed, so
    it alone is out of date) and the flow announces its table; the new cured model does not beat the
    champion (the first cured model, trained the same way), so it stays a challenger."""
    root = copy_workspace(cured_project, tmp_path / "ws")
    url, messages = webhook
    write_params(
        root, {"cure": {"enabled": False}, "orchestrate": {"auto_cure": True, "notify_webhook": url}}
    )
    sh(root, "git", "commit", "-q", "-am", "auto_cure instead of cure.enabled; the test webhook")
    champion = report(root, "cure.json")["release"]["version"]
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    result: RetrainResult = state.result()
    assert result.changed and "stages out of date with dvc.lock: cure" in result.reason
    cure = result.cure
    assert cure == report(root, "cure.json") and cure["status"] in ("cured", "not cured")
    assert cure["parent_run_id"] == result.mlflow_run_id == report(root, "train.json")["run_id"]
    assert not cure["release"]["promoted"] and cure["release"]["champion"] == champion
    assert not result.new_champion
    assert [m["event"] for m in messages] == ["cure"], messages
    text = messages[0]["text"]
    assert f"cure: {cure['status']}" in messages[0]["subject"]
    for line in ("| test accuracy |", "| test macro_f1 |", "| audit verdict | fail |", "challenger"):
        assert line in text, text
    for finding in cure["findings"]:
        assert f"class &#x27;{finding['class']}&#x27; {finding['test']}" in text, text
    assert cure_table(cure) in text
    assert f"## Cure: {cure['status']}\n\n{cure_table(cure)}" in flow_artifact(state, "retrain-record")


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["cnnops", "cure", *args]
    return subprocess.run(command, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_if_failed_skips_a_passing_audit_and_without_it_cure_refuses(tmp_path: Path) -> None:
    """No model needed: the verdict decides before anything is loaded."""
    write_params(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "audit.json").write_text(json.dumps({"verdict": "pass"}))
    stale = tmp_path / "models" / "cured" / "model.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier cure's model")
    refused = cli(tmp_path, "reports/audit.json")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "reports/audit.json: the audit's verdict is 'pass', not 'fail'" in refused.stderr
    assert not (tmp_path / "reports" / "cure.json").exists() and stale.exists()
    skipped = cli(tmp_path, "reports/audit.json", "--if-failed")
    assert skipped.returncode == 0, skipped.stderr
    cure = report(tmp_path, "cure.json")
    assert cure["status"] == "skipped" and cure["reason"].startswith("the audit passed (reports/audit.json)")
    assert not any((tmp_path / "models" / "cured").iterdir()), "an earlier cure's model is removed"
    assert (tmp_path / "reports" / "cure").is_dir()


@pytest.mark.integration
def test_neither_cure_enabled_nor_auto_cure_skips_even_a_failed_audit(tmp_path: Path) -> None:
    write_params(tmp_path, {"cure": {"enabled": False}})
    (tmp_path / "audit.json").write_text(json.dumps({"verdict": "fail"}))
    done = cli(tmp_path, "audit.json", "--if-failed")
    assert done.returncode == 0, done.stderr
    assert report(tmp_path, "cure.json") == {
        "status": "skipped",
        "reason": "cure.enabled and orchestrate.auto_cure are false",
    }


def test_the_cure_table_escapes_class_names() -> None:
    figures = {"accuracy": 0.5, "macro_f1": 0.4, "audit_verdict": "fail"}
    finding = {"class": "<b>|x", "test": "transplant:top-left", "fails_after": True}
    cure = {
        "before": figures, "after": {**figures, "audit_verdict": "fail"}, "release": None,
        "findings": [{**finding, "before": {"flip_rate": 0.9, "control_flip_rate": 0.05}, "after": None}],
    }  # fmt: skip
    table = cure_table(cure)
    assert (
        "| class &#x27;&lt;b&gt;/x&#x27; transplant:top-left | 0.90 (control 0.05) | — (still fails) |"
        in table
    )
    assert "not released" in table
