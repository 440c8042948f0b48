"""MLflow: where runs live and how stages find the model's run.

The only module besides the release registry code that imports mlflow. The default store is a
local SQLite file with a local artifact folder, so nothing has to be started; an MLflow server is
used by configuration alone (`tracking.uri` in params.yaml or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from cnnops.config import TrackingParams
from cnnops.errors import StageInputError


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    uri = tracking.resolved_uri
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = Path(tracking.artifact_location).resolve().as_uri() if local_store else None
    experiment_id = mlflow.create_experiment(tracking.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def run_id_from_report(train_report: str | Path) -> str:
    """The MLflow run id that `train` wrote into its report; later stages add to that run."""
    path = Path(train_report)
    if not path.exists():
        raise StageInputError(f"{path}: train report not found; run `cnnops train` first")
    run_id = json.loads(path.read_text()).get("run_id")
    if not run_id:
        raise StageInputError(f"{path}: has no 'run_id'; re-run `cnnops train`")
    return str(run_id)


@contextmanager
def continue_run(tracking: TrackingParams, run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Re-open the model's run so a later stage adds its params, metrics and artifacts to it."""
    configure(tracking)
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise StageInputError(
            f"MLflow run {run_id} not found at {tracking.resolved_uri}: the train report points at a run "
            "in another tracking store; set tracking.uri (or MLFLOW_TRACKING_URI) to it, or re-run `cnnops train`"
        ) from exc
    with mlflow.start_run(run_id=run_id) as run:
        yield run
