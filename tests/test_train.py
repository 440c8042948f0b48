"""The train stage: its MLflow record, determinism, resume after SIGKILL, DDP, a real MLflow server."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from fixtures_model import TrainedDigits, cache_fake_resnet18, digits_train_params, one_thread
from fixtures_net import free_port

from cnnops import cli
from cnnops.config import Params
from cnnops.data.splits import PreparedSplit
from cnnops.models import load_classifier
from cnnops.stages import evaluate, train

BIN = Path(sys.executable).parent


def client(params: Params) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=params.tracking.resolved_uri)


def artifact_paths(c: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in c.list_artifacts(run_id, path):
        found |= artifact_paths(c, run_id, item.path) if item.is_dir else {item.path}
    return found


def paths_under(root: Path, prepared: Path) -> train.TrainPaths:
    return train.TrainPaths(
        prepared=prepared,
        model=root / "models" / "model.pt",
        report=root / "reports" / "train.json",
        history=root / "reports" / "plots" / "train_history.csv",
        curves=root / "reports" / "plots" / "train_history.png",
        state=root / ".cnnops" / "train" / "state.pt",
    )


def test_run_records_params_metrics_lineage_and_artifacts(trained_digits: TrainedDigits) -> None:
    t = trained_digits
    c = client(t.params)
    run = c.get_run(t.run_id)
    report = json.loads(t.train_report.read_text())
    epochs = t.params.train.epochs
    assert report["run_id"] == t.run_id and report["epochs_run"] == epochs
    assert load_classifier(t.model)[1]["run_id"] == t.run_id
    assert run.data.params["train.model"] == "convnet" and run.data.params["base.seed"] == "0"
    assert run.data.params["validate.severity.decodes"] == "error"  # every section, not only train
    assert {"cnnops.git_commit", "cnnops.git_dirty", "cnnops.data_version", "cnnops.dvc_stage"} <= set(
        run.data.tags
    )
    assert [m.step for m in c.get_metric_history(t.run_id, "val_loss")] == list(range(1, epochs + 1))
    assert run.data.metrics["best_val_accuracy"] == report["best_val_accuracy"]
    assert {
        "checkpoint/model.pt",
        "params.yaml",
        "class_names.json",
        "train/train_history.csv",
        "train/train_history.png",
        "train/train.json",
    } <= artifact_paths(c, t.run_id)
    rows = list(csv.DictReader((t.root / "reports" / "plots" / "train_history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert not (t.root / ".cnnops" / "train" / "state.pt").exists()  # a finished run leaves no resume state


def test_same_params_and_data_give_same_results(tmp_path: Path, prepared_digits: Path, digits_params) -> None:
    augment = {"random_resized_crop": True, "horizontal_flip": 0.5, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}
    results, weights = [], []
    for name in ("a", "b"):
        root = tmp_path / name
        params = digits_train_params(root, digits_params, epochs=2, augment=augment)
        with one_thread():
            results.append(train.run(params, paths_under(root, prepared_digits)))
        weights.append(torch.load(root / "models" / "model.pt", weights_only=True)["state_dict"])
    assert results[0].history == results[1].history
    assert results[0].run_id != results[1].run_id
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_linear_probe_stage_keeps_pretrained_backbone(
    tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch, prepared_digits: Path, digits_params
) -> None:
    pretrained = cache_fake_resnet18(torch_home, monkeypatch)
    params = digits_train_params(
        tmp_path, digits_params, model="resnet18", mode="linear_probe", weights="IMAGENET1K_V1", epochs=1
    )
    with one_thread():
        train.run(params, paths_under(tmp_path, prepared_digits))
    trained, _ = load_classifier(tmp_path / "models" / "model.pt")
    state = trained.net.state_dict()
    backbone = [k for k in pretrained if not k.startswith("fc.")]
    assert all(torch.equal(state[k], pretrained[k]) for k in backbone)  # incl. BN running stats
    assert state["fc.weight"].shape == (10, 512)


def test_cli_reports_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  epochs: 1\n")
    assert cli.main(["--params", str(params_file), "train", str(tmp_path / "nowhere")]) == 1
    assert "cnnops train: error:" in capsys.readouterr().err


def write_project(root: Path, prepared: Path, params: Params) -> Path:
    """A folder to run `cnnops` in: prepared data and params.yaml."""
    shutil.copytree(prepared, root / "prepared")
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return root


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # One intra-op thread: identical arithmetic in every run, and no contention on a shared 2-core machine.
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.integration
def test_sigkilled_training_resumes_to_identical_weights(
    tmp_path: Path, prepared_digits: Path, digits_params
) -> None:
    epochs = 6
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    params = digits_train_params(killed, digits_params, epochs=epochs, batch_size=16)
    write_project(killed, prepared_digits, params)
    state = killed / ".cnnops" / "train" / "state.pt"
    proc = subprocess.Popen(
        ["cnnops", "train", "prepared"], cwd=killed, env=tool_env(), stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    saved = torch.load(state, weights_only=True)
    assert 1 <= saved["epoch"] < epochs, "the run must be killed mid-training"

    resumed = subprocess.run(
        ["cnnops", "train", "prepared"], cwd=killed, env=tool_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming convnet after epoch {saved['epoch']}" in resumed.stderr
    straight_params = digits_train_params(straight, digits_params, epochs=epochs, batch_size=16)
    with one_thread():  # the same single-threaded arithmetic as the subprocesses (OMP_NUM_THREADS=1)
        train.run(straight_params, paths_under(straight, killed / "prepared"))

    runs = {"killed": killed, "straight": straight}
    weights = [torch.load(r / "models" / "model.pt", weights_only=True)["state_dict"] for r in runs.values()]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    history = [(r / "reports" / "plots" / "train_history.csv").read_text() for r in runs.values()]
    assert history[0] == history[1]
    report = json.loads((killed / "reports" / "train.json").read_text())
    assert report["run_id"] == saved["run_id"]  # the same MLflow run, continued
    c = mlflow.MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
    assert len(c.search_runs([c.get_experiment_by_name("cnnops-tests").experiment_id])) == 1
    assert sorted(m.step for m in c.get_metric_history(report["run_id"], "val_loss")) == list(
        range(1, epochs + 1)
    )


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_two_cpu_processes(tmp_path: Path, prepared_digits: Path, digits_params) -> None:
    root = write_project(tmp_path, prepared_digits, digits_train_params(tmp_path, digits_params, epochs=2))
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", "--no-python", "cnnops", "train", "prepared"],
        cwd=root,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("epoch 2/2:") == 1  # only rank 0 logs
    report = json.loads((root / "reports" / "train.json").read_text())
    c = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("cnnops-tests").experiment_id])
    assert [r.info.run_id for r in runs] == [report["run_id"]]  # one run: rank 1 never talks to MLflow
    model, extra = load_classifier(root / "models" / "model.pt")
    assert extra["run_id"] == report["run_id"] and model.head.out_features == 10


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact root."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "server"
    store.mkdir()
    command = [
        "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        command, env=tool_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
@pytest.mark.integration
def test_training_against_an_mlflow_server_by_configuration_alone(
    tmp_path: Path, mlflow_server, prepared_digits: Path, digits_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, store = mlflow_server
    root = tmp_path / "project"
    params = digits_train_params(root, digits_params, epochs=1)  # tracking.uri: a local SQLite file ...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # ... which the environment overrides
    paths = paths_under(root, prepared_digits)
    with one_thread():
        result = train.run(params, paths)
        evaluate.run(params, evaluate_paths(root, paths))
    assert not (root / "mlflow.db").exists()
    c = mlflow.MlflowClient(url)
    run = c.get_run(result.run_id)
    assert run.data.metrics["test_accuracy"] > 0 and "val_loss" in run.data.metrics
    assert {"checkpoint/model.pt", "evaluate/confusion.png"} <= artifact_paths(c, result.run_id)
    assert any(store.joinpath("artifacts").rglob("model.pt"))  # stored by the server, not the client


def evaluate_paths(root: Path, trained: train.TrainPaths) -> evaluate.EvaluatePaths:
    return evaluate.EvaluatePaths(
        trained.model,
        trained.prepared,
        trained.report,
        root / "reports" / "metrics.json",
        root / "reports" / "plots" / "confusion.csv",
        root / "reports" / "plots" / "confusion.png",
    )


@pytest.mark.slow
def test_precise_bn_makes_a_short_run_evaluate_the_network_it_trained(
    tmp_path: Path, prepared_digits: Path, digits_params
) -> None:
    """The measured failure in miniature: a ResNet-18 from scratch, 27 steps. Without precise BN
    its BatchNorm running statistics still hold the first batches', so in eval mode it is another
    network (train accuracy high, validation far below); recomputed, validation follows training."""
    results = {}
    for setting in ("off", "auto"):
        root = tmp_path / setting
        params = digits_train_params(
            root, digits_params, model="resnet18", epochs=3, lr=0.01, warmup_epochs=0, precise_bn=setting
        )
        with one_thread():
            results[setting] = train.run(params, paths_under(root, prepared_digits))
    off, auto = (results[k].history[-1] for k in ("off", "auto"))
    # measured here: train accuracy 0.91; validation 0.40 (loss 7.7) off, 0.89 (loss 0.34) recalibrated
    assert off["train_accuracy"] > 0.8 and off["val_accuracy"] < 0.6 and off["val_loss"] > 3
    assert auto["val_accuracy"] > 0.8 and auto["val_loss"] < 1.0
    assert results["off"].report["precise_bn_images"] == 0
    assert results["auto"].report["precise_bn_images"] == len(PreparedSplit.load(prepared_digits, "train"))
