"""MLflow: where runs live and how stages find the model's run.

Runs, their tracking store and their tags are handled here. mlflow is also imported by
`cnnops.tracking.registry` (the model registry) and by the release stage (its `MlflowClient` for the
champion and challenger aliases). The default store is a local SQLite file with a local artifact
folder, so nothing has to be started; an MLflow server is used by configuration alone
(`tracking.uri` in params.yaml or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from cnnops.config import Params, TrackingParams
from cnnops.data.splits import PreparedSplit, split_digest, split_files
from cnnops.errors import StageInputError
from cnnops.models import Classifier, load_classifier
from cnnops.tracking.lineage import lineage
from cnnops.tracking.redact import redact_params, redact_url

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values
DATA_EXPERIMENT_SUFFIX = "-data"  # the experiment of the data stages' runs, beside the model runs'


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    uri = store_uri(tracking)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow 3 also exports the URI as MLFLOW_TRACKING_URI, which TrackingParams.resolved_uri reads
    # first: put the variable back, or the first store configured in a process wins every later call.
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = anchored(tracking.artifact_location).resolve().as_uri() if local_store else None
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


def load_run_model(model_path: str | Path, train_report: str | Path) -> tuple[Classifier, str]:
    """The trained model and the MLflow run it belongs to, refusing a checkpoint from another run
    (a stale models/model.pt beside a newer train report would add figures to the wrong run)."""
    run_id = run_id_from_report(train_report)
    model, extra = load_classifier(model_path)
    if extra.get("run_id") not in (None, run_id):
        raise StageInputError(
            f"{model_path} was trained in MLflow run {extra['run_id']} but {train_report} names run "
            f"{run_id}; rerun `cnnops train` so both come from the same run"
        )
    return model, run_id


@contextmanager
def continue_run(tracking: TrackingParams, run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Re-open the model's run so a later stage adds its params, metrics and artifacts to it."""
    configure(tracking)
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise StageInputError(
            f"MLflow run {run_id} not found at {redact_url(store_uri(tracking))}: the train report points "
            "at a run in another tracking store; set tracking.uri (or MLFLOW_TRACKING_URI) to it, or rerun "
            "`cnnops train`"
        ) from exc
    with mlflow.start_run(run_id=run_id) as run:
        yield run


@contextmanager
def training_run(tracking: TrackingParams, run_id: str | None, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """Start the model's run, or continue `run_id` (a resumed training) so it stays one run per model."""
    if run_id is not None:
        with continue_run(tracking, run_id) as run:
            yield run
        return
    configure(tracking)
    # System metrics (CPU, memory, GPU through pynvml) on GPU runs only: on CPU the figures are the
    # machine's, not the model's, and the sampling thread costs a core that training wants.
    gpu = torch.cuda.is_available()
    with mlflow.start_run(run_name=experiment_run_name(run_name), log_system_metrics=gpu) as run:
        yield run


@contextmanager
def data_run(params: Params, stage: str, sections: tuple[str, ...]) -> Iterator[mlflow.ActiveRun]:
    """A run of its own for a data stage (validate, prepare), in experiment `<experiment>-data`.

    The data stages run before any model exists, so they record themselves: their params sections,
    lineage and reports. Beside the model runs but not among them (a model experiment stays one
    run per model); a model run finds the runs of its data by the shared `cnnops.data_version` tag.
    """
    tracking = params.tracking
    configure(tracking.model_copy(update={"experiment": f"{tracking.experiment}{DATA_EXPERIMENT_SUFFIX}"}))
    with mlflow.start_run(run_name=experiment_run_name(stage)) as run:
        mlflow.log_params({k: v for k, v in flat_params(params).items() if k.split(".")[0] in sections})
        mlflow.set_tags(lineage_tags(stage=stage))
        yield run


def lineage_tags(repo: str | Path = ".", stage: str = "train") -> dict[str, str]:
    """What made the model: git commit, dirty tree, data version (data.dvc) and the DVC stage."""
    found = lineage(repo, Path(repo) / "data.dvc")
    commit = found.git_commit.removesuffix("-dirty")
    return {
        MLFLOW_GIT_COMMIT: commit,
        "cnnops.git_commit": commit,
        "cnnops.git_dirty": str(found.git_commit.endswith("-dirty")).lower(),
        "cnnops.data_version": found.data_version,
        # DVC sets DVC_STAGE for every command it runs; outside `dvc repro` the stage ran by hand.
        "cnnops.dvc_stage": os.environ.get("DVC_STAGE", f"{stage} (run outside dvc repro)"),
        **experiment_tags(),
    }


def flat_params(params: Params) -> dict[str, str]:
    """Every params.yaml key as a dotted MLflow param (e.g. train.augment.mixup_alpha), URLs that may
    carry a password or a token redacted (`redact.SECRET_URL_PARAMS`)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

    walk("", _recorded(params))
    return {k: v[:MAX_PARAM_LENGTH] for k, v in flat.items()}


def log_run_inputs(
    params: Params, class_names: list[str], params_file: Path | None, tags: dict[str, str]
) -> None:
    """Params, lineage tags, class names and the params file: what a new run records first.

    The params file is recorded as the params it configured, redacted, under its name: the file
    itself may hold a tracking password or a webhook token.
    """
    mlflow.log_params(flat_params(params))
    mlflow.set_tags(tags)
    mlflow.log_dict({"class_names": class_names}, "class_names.json")
    if params_file is not None:
        mlflow.log_dict(_recorded(params), params_file.name)


def _recorded(params: Params) -> dict[str, Any]:
    """The params as MLflow records them: every key, secrets redacted."""
    return redact_params(params.model_dump(mode="json", by_alias=True))


def log_files(paths: Iterable[Path], artifact_path: str) -> None:
    """Log files and folders (e.g. the validate and prepare reports and the GX data docs).

    A missing one is skipped with a warning: the run still records everything else.
    """
    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(str(path), f"{artifact_path}/{path.name}")
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path)
        else:
            log.warning(
                "%s not found: not logged to the MLflow run (run the stage that writes it first)", path
            )


# MLflow's dataset digest column holds 36 characters: the split's SHA-256 is cut to it there, and
# kept whole in the profile.
DIGEST_CHARS = 36
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


class PreparedSplitDataset(MetaDataset):
    """A prepared split as an MLflow dataset: its files as the source, its content hash as the
    digest, its size and classes as the profile, and not one image loaded (a split of lab size
    would not fit in memory: mlflow.data.from_numpy would hash and profile the whole array).
    MetaDataset has no profile; this adds one."""

    def __init__(self, prepared: Path, name: str) -> None:
        images, _ = split_files(prepared, name)
        split = PreparedSplit.load(prepared, name)  # memory-mapped: only the index is read
        sha256 = split_digest(prepared, (name,))  # streamed
        counts = torch.bincount(split.labels, minlength=len(split.class_names)).tolist()
        self._profile = {
            "images": len(split),
            "classes": len(split.class_names),
            "smallest_class": min(counts, default=0),
            "largest_class": max(counts, default=0),
            "image_shape": list(split.images.shape[1:]),
            "color_mode": split.color_mode,
            "groups": len({g for g in split.groups or () if g is not None}),
            "sha256": sha256,
        }
        with warnings.catch_warnings():
            # MLflow registers its local source for both the "" and "file" schemes and warns that a
            # file URI could be either: both are the same LocalArtifactDatasetSource.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(images.resolve().as_uri())
        super().__init__(source, name=f"{Path(prepared).name}/{name}", digest=sha256[:DIGEST_CHARS])

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_splits(prepared: Path, names: tuple[str, ...]) -> dict[str, PreparedSplitDataset]:
    """Log the named splits as the active run's inputs (context training / validation / testing);
    returns the datasets, e.g. to link metrics to the one they were measured on."""
    datasets = {name: PreparedSplitDataset(prepared, name) for name in names}
    mlflow.log_inputs(list(datasets.values()), [SPLIT_CONTEXTS[name] for name in names], [None] * len(names))
    return datasets


def log_epoch(metrics: Mapping[str, float], epoch: int) -> None:
    mlflow.log_metrics(dict(metrics), step=epoch)


def logged_steps(run_id: str, key: str) -> set[int]:
    """Epochs already logged for `key`: a resumed run logs only the ones its killed process missed."""
    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def log_metrics(metrics: Mapping[str, float]) -> None:
    mlflow.log_metrics(dict(metrics))


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(dict(data), artifact_file)


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


def tag_run(
    tracking: TrackingParams, run_id: str, tags: Mapping[str, str], root: str | Path | None = None
) -> None:
    """Tag a finished run without re-opening it (its status and end time stay), e.g. with the Prefect
    flow run that produced it, so the MLflow record and the orchestration record lead to each other.
    `root`: the project folder a relative local store lives in (see `store_uri`)."""
    client = mlflow.MlflowClient(store_uri(tracking, root))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


# --- DVC experiments (`dvc exp run`, docs/experiments.md) -------------------------------------------
# `dvc exp run --temp` and queued experiments (`--queue`, `dvc queue start`) run the stages in a
# temporary copy of the repo that is deleted afterwards. DVC sets DVC_ROOT to the parent project's
# root for every stage command (the project itself under `dvc repro`), DVC_EXP_NAME and
# DVC_EXP_BASELINE_REV for experiments (dvc/repo/experiments/queue/base.py).

SQLITE_PREFIX = "sqlite:///"


def anchored(path: str | Path, root: str | Path | None = None) -> Path:
    """A relative path of the local store, taken from `root` (default DVC_ROOT when DVC runs the
    stage), so that a temporary experiment copy writes to the project's store instead of one deleted
    with the copy, and a flow outside the project finds the store its stages wrote."""
    root = root if root is not None else os.environ.get("DVC_ROOT")
    return Path(root) / path if root and not Path(path).is_absolute() else Path(path)


def store_uri(tracking: TrackingParams, root: str | Path | None = None) -> str:
    """The tracking URI to use: a relative SQLite file (the default `sqlite:///mlflow.db`) is anchored
    at `root` (default DVC_ROOT); servers and absolute paths are used as given."""
    uri = tracking.resolved_uri
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        return SQLITE_PREFIX + str(anchored(uri[len(SQLITE_PREFIX) :], root))
    return uri


def experiment_tags() -> dict[str, str]:
    """`dvc.experiment` (search runs with `tags.dvc.experiment = '<name>'`) and the baseline commit;
    none outside `dvc exp run`."""
    names = {"dvc.experiment": "DVC_EXP_NAME", "dvc.baseline_rev": "DVC_EXP_BASELINE_REV"}
    return {tag: os.environ[env] for tag, env in names.items() if os.environ.get(env)}


def experiment_run_name(run_name: str) -> str:
    """The run's name in the MLflow UI: the DVC experiment name first, when there is one."""
    name = os.environ.get("DVC_EXP_NAME")
    return f"{name} ({run_name})" if name else run_name
