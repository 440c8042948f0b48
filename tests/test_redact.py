"""Secrets never reach MLflow: a run that records its params (as train does) keeps URLs by host only."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from cnnops.config import TrackingParams, parse_params
from cnnops.tracking import runs
from cnnops.tracking.redact import redact_url

SECRETS = ("hunter2", "tok-xyz", "T000", "sekret", "k3y")


@pytest.mark.parametrize(
    ("url", "recorded"),
    [
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("mlruns", "mlruns"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://ci:hunter2@mlflow.example.com", "https://***@mlflow.example.com"),
        ("https://mlflow.example.com/?token=tok-xyz", "https://mlflow.example.com/***"),
        ("postgresql://me:hunter2@db:5432/mlflow", "postgresql://***@db:5432/***"),
        ("https://hooks.example.com/services/T000/sekret", "https://hooks.example.com/***"),
        ("sqlite:///mlflow.db?k3y=1", "sqlite:///mlflow.db?***"),
    ],
)
def test_a_url_is_recorded_by_scheme_and_host(url: str, recorded: str) -> None:
    assert redact_url(url) == recorded


def test_a_run_records_no_secret_in_its_params_or_its_params_file(tmp_path: Path) -> None:
    raw = {
        "tracking": {"uri": "https://ci:hunter2@mlflow.example.com/?token=tok-xyz", "experiment": "x"},
        "orchestrate": {"notify_webhook": "https://hooks.example.com/services/T000/sekret?k3y=1"},
        "train": {"epochs": 3},
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))  # the raw file holds the secrets
    params = parse_params(raw)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # where the run really goes
    runs.configure(TrackingParams(uri=store, artifact_location=str(tmp_path / "art"), experiment="x"))
    with mlflow.start_run() as run:
        runs.log_run_inputs(params, ["a", "b"], params_file, {"cnnops.dvc_stage": "train"})
    recorded = mlflow.MlflowClient(store).get_run(run.info.run_id).data.params
    got = tmp_path / "downloaded"
    got.mkdir()
    logged = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="params.yaml", dst_path=str(got), tracking_uri=store
    )
    artifact = Path(logged).read_text()
    for secret in SECRETS:
        assert secret not in json.dumps(recorded) and secret not in artifact, secret
    assert recorded["tracking.uri"] == "https://***@mlflow.example.com/***"
    assert recorded["orchestrate.notify_webhook"] == "https://hooks.example.com/***"
    assert recorded["train.epochs"] == "3"
    logged_params = yaml.safe_load(artifact)
    assert logged_params["tracking"]["uri"] == recorded["tracking.uri"]
    assert logged_params["train"] == params.train.model_dump(mode="json", by_alias=True)
