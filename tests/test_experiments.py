"""DVC experiments land in MLflow: the real `dvc exp run` in a tiny git + DVC workspace.

A workspace experiment and a queued one (run by DVC's queue worker in a temporary copy of the repo)
must each give their own MLflow run, tagged with the DVC experiment name, in the project's store:
a relative `sqlite:///mlflow.db` resolved inside the temporary copy would be deleted with it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from fixtures_prefect import copy_workspace, tool_env

from cnnops.config import TrackingParams
from cnnops.tracking import runs

PROJECT = Path(__file__).resolve().parents[1]


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run(
        ["dvc", *args], cwd=root, env=tool_env(), capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def runs_by_experiment(root: Path) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnops")
    runs = client.search_runs([experiment.experiment_id])
    return {run.data.tags.get("dvc.experiment", ""): run for run in runs}


@pytest.mark.integration
@pytest.mark.slow
def test_workspace_and_queued_experiments_are_mlflow_runs_named_after_them(make_workspace) -> None:
    root = make_workspace("exp")
    dvc(root, "exp", "run", "train", "-n", "ws-convnet")
    dvc(root, "exp", "run", "train", "--queue", "-n", "queued-lr", "-S", "train.lr=0.01")
    out = dvc(root, "exp", "run", "--run-all")  # starts the queue worker, waits for it
    assert "Failed to reproduce" not in out

    runs = runs_by_experiment(root)
    assert {"ws-convnet", "queued-lr"} <= set(runs), f"MLflow runs by dvc.experiment tag: {sorted(runs)}"
    workspace, queued = runs["ws-convnet"], runs["queued-lr"]
    assert workspace.info.run_id != queued.info.run_id
    assert queued.data.params["train.lr"] == "0.01" and workspace.data.params["train.lr"] == "0.003"
    assert queued.info.run_name.startswith("queued-lr")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    assert queued.data.tags["dvc.baseline_rev"] == head.strip()
    assert "val_loss" in queued.data.metrics
    # The queued run's artifacts sit in the project's folder, not in the deleted temporary copy.
    assert any((root / "mlartifacts").rglob("model.pt"))
    assert not list(root.glob(".dvc/tmp/exps/**/mlflow.db"))

    # `dvc exp show` tells the same story: each experiment's train.json names its MLflow run.
    shown = json.loads(dvc(root, "exp", "show", "--json"))
    run_ids = {
        exp["name"]: exp["data"]["metrics"]["reports/train.json"]["data"]["run_id"]
        for baseline in shown
        for group in baseline.get("experiments") or []
        for exp in group["revs"]
    }
    assert run_ids["ws-convnet"] == workspace.info.run_id and run_ids["queued-lr"] == queued.info.run_id


def test_local_store_is_anchored_at_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = TrackingParams(uri="sqlite:///mlflow.db", artifact_location="mlartifacts", experiment="cnnops")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert runs.store_uri(params) == "sqlite:///mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert runs.store_uri(params) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runs.anchored("mlartifacts") == tmp_path / "mlartifacts"
    absolute = TrackingParams(
        uri="sqlite:////srv/mlflow.db", artifact_location="/srv/art", experiment="cnnops"
    )
    assert runs.store_uri(absolute) == "sqlite:////srv/mlflow.db"
    assert runs.anchored("/srv/art") == Path("/srv/art")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runs.store_uri(params) == "http://127.0.0.1:5000"


def test_every_stage_input_is_tracked_by_git_or_dvc() -> None:
    """Temporary experiment copies hold only what git or DVC track (treeverse/dvc#8747): a stage
    dependency that is neither would be missing there while the workspace run still passes."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    outs = {
        next(iter(o)) if isinstance(o, dict) else o
        for stage in stages.values()
        for key in ("outs", "metrics", "plots")
        for o in stage.get(key, [])
    }
    dvc_tracked = {p.with_suffix("").name for p in PROJECT.glob("*.dvc")}
    git_files = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    missing = [
        dep
        for stage in stages.values()
        for dep in stage.get("deps", [])
        if dep not in outs
        and dep not in dvc_tracked
        and not any(f == dep or f.startswith(dep.rstrip("/") + "/") for f in git_files)
    ]
    assert not missing, f"stage deps neither git- nor DVC-tracked (add them): {missing}"
    assert "params.yaml" in git_files


@pytest.mark.integration
@pytest.mark.slow
def test_an_experiment_registers_a_challenger_but_never_moves_champion(retrained, tmp_path: Path) -> None:
    """The real `dvc exp run` of the whole pipeline: release runs (DVC sets DVC_EXP_NAME) and would
    make the first champion of a new model name, but an experiment never deploys."""
    root = copy_workspace(retrained["root"], tmp_path / "ws")
    assert json.loads((root / "reports" / "release.json").read_text())["promoted"]  # the retrain's v1
    dvc(root, "exp", "run", "-n", "try-name", "-S", "release.model_name=cnnops-exp")

    release = json.loads((root / "reports" / "release.json").read_text())
    assert (release["model_name"], release["promoted"], release["champion"]) == ("cnnops-exp", False, None)
    assert "runs under `dvc exp run` (experiment 'try-name')" in release["reason"]
    assert "there is no champion yet" in release["reason"]  # what it would have earned
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    aliases = {k: str(v) for k, v in client.get_registered_model("cnnops-exp").aliases.items()}
    assert aliases == {"challenger": "1"}
    assert str(client.get_registered_model("cnnops-classifier").aliases["champion"]) == "1"
