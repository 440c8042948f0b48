"""Session fixture `trained_digits`: a model really trained and evaluated by the train and evaluate stages.

Built once per session from `prepared_digits` (400 grayscale 32x32 digits) with the ConvNet for a
few epochs, tracked in a real MLflow SQLite store under the fixture's own folder. Later stages
(audit, export, release, flows) use it as their "model the pipeline made". Read-only: copy files
before changing them; add to the MLflow run freely (e.g. `tracking.continue_run(t.tracking, t.run_id)`).

Interface (`TrainedDigits`):
    root          project folder holding everything below, plus params.yaml, mlflow.db, mlartifacts/
    prepared      the {train,val,test} splits (the `prepared_digits` folder)
    model         models/model.pt, the best checkpoint (`cnnops.models.load_classifier(path)`)
    train_report  reports/train.json: {"run_id", "model", "mode", "best_epoch", "best_val_accuracy", ...}
    metrics       reports/metrics.json from evaluate: accuracy, balanced_accuracy, macro_f1, top3_accuracy,
                  ece, loss, n_test, per_class
    params        the cnnops Params used; params.tracking points at the SQLite store (absolute paths)
    params_file   root / "params.yaml" with the same params
    run_id        the MLflow run id (also in train_report and the checkpoint's extra["run_id"])
    tracking      shortcut for params.tracking

Also: `torch_home` (function fixture: an empty TORCH_HOME) and `cache_fake_resnet18(torch_home,
monkeypatch)`, which caches a locally made resnet18 state dict as IMAGENET1K_V1 (named, like
torchvision's files, by its own sha256 prefix; the member's URL points at that name for the test),
so the pretrained-weights path runs without a download (`train.weights: IMAGENET1K_V1` or
`DEFAULT`); `publish_weights` does the same for any bytes and weights member (`saved(obj)` gives
torch.save's bytes).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models import WeightsEnum, get_model, get_model_weights

from cnnops.config import Params, TrackingParams, parse_params
from cnnops.models import weights_file
from cnnops.stages import evaluate, train

FIXTURE_EPOCHS = 4


@contextmanager
def one_thread() -> Iterator[None]:
    """Train tiny models on one thread: on the shared 2-core test machine, two intra-op threads
    contend with other test processes and were measured 10x slower per step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TrainedDigits:
    root: Path
    prepared: Path
    model: Path
    train_report: Path
    metrics: Path
    params: Params
    params_file: Path
    run_id: str

    @property
    def tracking(self) -> TrackingParams:
        return self.params.tracking


def digits_train_params(root: Path, base: Params, **train: object) -> Params:
    """`base` (the digits params) with a quick ConvNet training (no label smoothing, early stopping or
    augmentation unless `train` asks) and an MLflow SQLite store under `root`."""
    raw = base.model_dump(mode="json", by_alias=True)
    quick = {
        "epochs": FIXTURE_EPOCHS,
        "batch_size": 32,
        "label_smoothing": 0.0,
        "early_stopping_patience": None,
        "augment": {**raw["train"]["augment"], "random_resized_crop": False},
    }
    raw["train"] = {**raw["train"], **quick, **train}
    raw["tracking"] = {
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_location": str(root / "mlartifacts"),
        "experiment": "cnnops-tests",
    }
    return parse_params(raw, "trained_digits fixture")


@pytest.fixture(scope="session")
def trained_digits(
    tmp_path_factory: pytest.TempPathFactory, prepared_digits: Path, digits_params
) -> TrainedDigits:
    root = tmp_path_factory.mktemp("trained_digits")
    params = digits_train_params(root, digits_params)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    paths = train.TrainPaths(
        prepared=prepared_digits,
        model=root / "models" / "model.pt",
        report=root / "reports" / "train.json",
        history=root / "reports" / "plots" / "train_history.csv",
        curves=root / "reports" / "plots" / "train_history.png",
        state=root / ".cnnops" / "train" / "state.pt",
        params_file=params_file,
    )
    metrics = evaluate.EvaluatePaths(
        model=paths.model,
        prepared=prepared_digits,
        train_report=paths.report,
        metrics=root / "reports" / "metrics.json",
        confusion=root / "reports" / "plots" / "confusion.csv",
        confusion_png=root / "reports" / "plots" / "confusion.png",
    )
    with one_thread():
        result = train.run(params, paths)
        evaluate.run(params, metrics)
    assert result.run_id is not None
    return TrainedDigits(
        root, prepared_digits, paths.model, paths.report, metrics.metrics, params, params_file, result.run_id
    )


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local weights cache: TORCH_HOME is where torchvision's hub looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def cache_fake_resnet18(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A locally made resnet18 state dict cached as IMAGENET1K_V1 (never downloaded).

    cnnops checks a cached file against the sha256 prefix in its name, and the real name
    (resnet18-f37072fd.pth) carries the real file's hash, which no locally made file can match. So
    the test publishes its own file: IMAGENET1K_V1's URL (for this test only) ends in
    resnet18-<sha256 prefix of the fake>.pth, and cnnops runs unchanged: enum -> cache file name
    -> hash check -> weights_only load.
    """
    torch.manual_seed(123)
    state = get_model("resnet18", weights=None).state_dict()
    path = publish_weights(torch_home, monkeypatch, get_model_weights("resnet18").IMAGENET1K_V1, saved(state))
    assert weights_file(get_model_weights("resnet18").DEFAULT) == path  # DEFAULT is the same member
    return state


def publish_weights(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch, weights: WeightsEnum, data: bytes
) -> Path:
    """Cache `data` under `weights`' stem and the sha256 prefix of `data`, and point `weights`' URL at
    that name for this test: the file is then exactly what the enum member publishes."""
    stem = Path(weights.url).name.rsplit("-", 1)[0]
    url = f"{weights.url.rsplit('/', 1)[0]}/{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setattr(weights.value, "url", url)
    path = weights_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def saved(obj: object) -> bytes:
    """The bytes `torch.save` writes for `obj`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
