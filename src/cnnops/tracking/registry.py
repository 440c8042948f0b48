"""The MLflow Model Registry side of `release`: register once per exported file, aliases, tags.

A model version's source is the ONNX model (the deployable artifact, self-describing through its
metadata); the PyTorch model is logged to the same run and linked from the version's
`pytorch_model_uri` tag. A version is identified by (run id, sha256 of the ONNX file), which is
what makes `cnnops release` idempotent: the same export is never registered twice.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from cnnops.config import TrackingParams
from cnnops.data.digest import file_sha256
from cnnops.export.onnx_model import CPU, available_providers, infer, open_session
from cnnops.models import load_classifier
from cnnops.tracking import runs

CHAMPION, CHALLENGER = "champion", "challenger"
SHA_TAG = "onnx_sha256"


def find_version(client: MlflowClient, name: str, run_id: str, sha256: str) -> str | None:
    """The version number already registered from this run for this exact ONNX file, if any."""
    for candidate in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if candidate.tags.get(SHA_TAG) == sha256:
            return _number(candidate)
    return None


def register(
    tracking_params: TrackingParams,
    name: str,
    run_id: str,
    onnx_path: Path,
    checkpoint: Path,
    test: tuple[Path, Mapping[str, float]] | None = None,
) -> str:
    """Log the ONNX and PyTorch models to the model's run, register the ONNX one; returns its version.

    The version's files hold model.onnx and, as an extra file, the cnnops checkpoint
    (`cnnops.models.load_classifier`), so either engine can be served from `models:/name@alias`.
    `test`: the prepared folder and the ONNX model's figures on its test split, logged as metrics of
    that logged model on that dataset (MLflow 3's model_id= and dataset=), so the model's page shows
    what it scored and on which data (release always gives it). The flavor records the execution
    providers to load it with.
    """
    model, _ = load_classifier(checkpoint)
    spec = model.spec
    # pt2 bakes the example's batch into the saved program when it is 1 (measured with MLflow 3.17): use 2.
    example = np.zeros((2, spec.in_channels, *spec.image_size), dtype=np.float32)
    with runs.continue_run(tracking_params, run_id):
        pytorch_info = mlflow.pytorch.log_model(
            model,
            name="pytorch",
            input_example=example,
            pip_requirements=[f"torch=={package_version('torch')}"],
        )
        # A signature rather than an input example: MLflow would run the example on its default
        # providers, CUDA first, which logs load errors on a machine without a GPU.
        onnx_info = mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="onnx",
            signature=infer_signature(example, infer(open_session(onnx_path), example, len(example))),
            registered_model_name=name,
            save_as_external_data=False,
            extra_files=[str(checkpoint)],
            pip_requirements=[
                f"onnx=={package_version('onnx')}",
                f"onnxruntime-gpu=={package_version('onnxruntime-gpu')}",
            ],
            # in ORT's order of preference: CUDA first where this machine has it, CPU always
            onnx_execution_providers=[p for p in available_providers() if p != CPU] + [CPU],
        )
        if test is not None:
            dataset = runs.log_splits(test[0], ("test",))["test"]
            mlflow.log_metrics(dict(test[1]), model_id=onnx_info.model_id, dataset=dataset)
    client = MlflowClient()
    version = str(onnx_info.registered_model_version)
    client.set_model_version_tag(name, version, SHA_TAG, file_sha256(onnx_path))
    client.set_model_version_tag(name, version, "pytorch_model_uri", pytorch_info.model_uri)
    return version


def _number(version: ModelVersion) -> str:
    """MLflow gives version numbers as int or str depending on the call: always str here."""
    return str(version.version)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return _number(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@contextmanager
def downloaded_onnx(name: str, version: str) -> Iterator[Path]:
    """The ONNX file of a registered version, in a temporary folder for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="cnnops-champion-") as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp)
        yield Path(local) / "model.onnx"


def set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    """The same tags on the model version and on its run, so either view shows the decision."""
    run_id = client.get_model_version(name, version).run_id
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, key, value)


MAX_DESCRIPTION = 5000  # characters of a version's description kept (the card itself is an artifact)
CARD_TAG = "model_card"
CARD_FOLDER = "model_card"


def attach_card(client: MlflowClient, name: str, version: str, files: list[Path], decision: str) -> str:
    """Log the model card's files to the version's run (not re-opened: its status and end time stay)
    and point the version at them: tag `model_card` holds the HTML page's artifact URI, and the
    description says the decision and where the card is. Returns that URI."""
    run_id = client.get_model_version(name, version).run_id
    for path in files:
        client.log_artifact(run_id, str(path), CARD_FOLDER)
    uri = f"runs:/{run_id}/{CARD_FOLDER}/{files[-1].name}"
    client.set_model_version_tag(name, version, CARD_TAG, uri)
    description = f"{decision}\n\nModel card: {uri} (Markdown beside it: {files[0].name})"
    client.update_model_version(name, version, description=description[:MAX_DESCRIPTION])
    return uri
