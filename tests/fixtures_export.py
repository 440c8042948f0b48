"""Export/release fixtures: synthetic prepared splits whose accuracy is known, models of chosen
quality, and MLflow runs in a SQLite store, so ONNX and registry tests run in seconds.

Class k's images are a flat grey level (k + 1) / (n + 1) plus noise: a briefly trained ConvNet
gets them all right, while a `constant_model` always answers one class and so scores exactly
that class's share of the split.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch

from cnnops.config import Params, Section, TrackingParams, parse_params
from cnnops.data.splits import PreparedSplit
from cnnops.export.onnx_model import OnnxMetadata, export_classifier
from cnnops.models import CHANNELS, Classifier, create_classifier, default_spec, save_checkpoint
from cnnops.tracking import runs

CLASSES = ["a", "b", "c"]
SIZE = (16, 16)
TEST_COUNTS = (7, 3, 3)  # constant class a: accuracy 7/13; constant class b: 3/13


def synthetic_split(
    counts: tuple[int, ...], color_mode: str = "L", size: tuple[int, int] = SIZE, seed: int = 0
) -> PreparedSplit:
    generator = torch.Generator().manual_seed(seed)
    channels = CHANNELS[color_mode]
    images, labels = [], []
    for label, count in enumerate(counts):
        level = (label + 1) / (len(counts) + 1)
        noise = 0.05 * torch.randn(count, channels, *size, generator=generator)
        images.append(((level + noise).clamp(0, 1) * 255).round().to(torch.uint8))
        labels += [label] * count
    names = CLASSES[: len(counts)]
    paths = [f"{names[y]}/{i}.png" for i, y in enumerate(labels)]
    return PreparedSplit(torch.cat(images), torch.tensor(labels), paths, names, color_mode)


def hand_built_onnx(
    path: Path,
    props: dict[str, str] | None = None,
    *,
    input_shape: tuple[int | str, ...] = ("batch", 1, *SIZE),
    input_type: int = onnx.TensorProto.FLOAT,
    classes: int = len(CLASSES),
    op: str = "GlobalAveragePool",
) -> Path:
    """A graph made by hand (Cast, pool, Flatten, Concat: the mean grey level once per class) with
    cnnops metadata_props for CLASSES at SIZE, overridden by `props`: a foreign or edited file whose
    graph and metadata can disagree in any one way."""
    h = onnx.helper
    nodes = [
        h.make_node("Cast", ["image"], ["x"], to=onnx.TensorProto.FLOAT),
        h.make_node(op, ["x"], ["pooled"]),
        h.make_node("Flatten", ["pooled"], ["flat"]),
        h.make_node("Concat", ["flat"] * classes, ["logits"], axis=1),
    ]
    graph = h.make_graph(
        nodes,
        "hand_built",
        [h.make_tensor_value_info("image", input_type, list(input_shape))],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", classes])],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    meta = OnnxMetadata(CLASSES, SIZE, "L", "logits", "convnet", "run", "commit", "data").to_props()
    h.set_model_props(proto, {**meta, **(props or {})})
    onnx.save(proto, path)
    return path


def constant_model(label: int, color_mode: str = "L") -> Classifier:
    """A ConvNet that answers `label` for every image (zero head weights, one-hot bias)."""
    model = create_classifier(default_spec("convnet", CLASSES, color_mode, SIZE))
    head = model.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), len(CLASSES)).float() * 10)
    return model.eval()


def trained_model(color_mode: str = "L", steps: int = 40, seed: int = 0) -> Classifier:
    """A ConvNet trained for a few steps on the synthetic classes: it separates them perfectly."""
    torch.manual_seed(seed)
    split = synthetic_split((16, 16, 16), color_mode, seed=seed + 100)
    model = create_classifier(default_spec("convnet", CLASSES, color_mode, SIZE)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = split.floats()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), split.labels).backward()
        optimizer.step()
    return model.eval()


def tracking_params(root: Path) -> TrackingParams:
    return TrackingParams(
        uri=f"sqlite:///{root / 'mlflow.db'}", artifact_location=str(root / "mlartifacts"), experiment="test"
    )


@pytest.fixture
def committed_repo(tmp_path: Path) -> Path:
    """A git work tree with one commit and a tracked file, clean: where release may move champion."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text("a: 1\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (("init", "-q"), ("add", "params.yaml"), ("commit", "-qm", "init")):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    return root


def stage_params(tracking: TrackingParams, **sections: Section) -> Params:
    """The defaults with `tracking` and the given sections (e.g. export=ExportParams.from_defaults(...))."""
    return parse_params({}, "test").model_copy(update={"tracking": tracking, **sections})


def model_run(root: Path, name: str, model: Classifier, params: TrackingParams) -> tuple[Path, Path]:
    """What `train` leaves behind for one model: a checkpoint, an MLflow run and the train report."""
    runs.configure(params)
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_param("model", model.spec.model)
    checkpoint = root / name / "model.pt"
    save_checkpoint(checkpoint, model)
    report = root / name / "train.json"
    report.write_text(json.dumps({"run_id": run.info.run_id}))
    return checkpoint, report


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingParams:
    """A fresh SQLite store under tmp_path, also set as MLFLOW_TRACKING_URI for the test only.

    mlflow.set_tracking_uri (in runs.configure) exports MLFLOW_TRACKING_URI, which
    TrackingParams.resolved_uri prefers: setting it here makes this test's store win, and
    monkeypatch removes it afterwards so the store does not leak into later tests.
    """
    params = tracking_params(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params.uri)
    return params


@pytest.fixture(scope="session")
def prepared_synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prepared folder (its test split only) per colour mode, with the imbalanced TEST_COUNTS split."""
    folders = {}
    for mode in ("L", "RGB"):
        folder = tmp_path_factory.mktemp(f"prepared_{mode}")
        synthetic_split(TEST_COUNTS, mode).save(folder, "test")
        folders[mode] = folder
    return folders


@pytest.fixture(scope="session")
def good_model() -> Classifier:
    return trained_model("L")


@pytest.fixture(scope="session")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, good_model) -> Path:
    """`good_model` exported (logits, CLASSES at SIZE, grey): what predict and serve read."""
    path = tmp_path_factory.mktemp("onnx_file") / "model.onnx"
    meta = OnnxMetadata(CLASSES, SIZE, "L", "logits", "convnet", "run", "commit", "data")
    export_classifier(good_model, path, opset=18, metadata=meta)
    return path


def grey(level: float, shape: tuple[int, ...] = (20, 24)) -> np.ndarray:
    """A flat grey picture at `level` in [0, 1] (the synthetic classes are grey levels)."""
    return np.full(shape, round(level * 255), dtype=np.uint8)
