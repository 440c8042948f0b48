"""Session fixtures with real image data: a small digits ImageFolder and its prepared split.

`digits_folder`: 40 PNG images per digit (400 in all, 32x32 grayscale) written by the same code
as `cnnops make-example`. `prepared_digits`: the folder with the {train,val,test} splits that the real
prepare stage made from it (colour mode "L", 32x32); its report is `prepared_digits.parent /
"prepare.json"`. Both are read-only for tests: copy them before changing anything.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from cnnops.config import Params, TrackingParams, parse_params
from cnnops.data.example import write_digits
from cnnops.stages import prepare, validate

DIGITS_PER_CLASS = 40


@pytest.fixture(scope="session")
def digits_params():
    """Params of the digits fixtures: the defaults with grayscale 32x32 images."""
    return parse_params({"data": {"color_mode": "L"}, "prepare": {"image_size": [32, 32]}}, "digits fixture")


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data"
    write_digits(root, per_class=DIGITS_PER_CLASS)
    return root


# One MLflow store for the data stages' runs of the whole session (a new SQLite store costs seconds
# of migrations); tests that check those runs give their own.
DATA_STORE = Path(tempfile.mkdtemp(prefix="cnnops-test-data-runs-"))
atexit.register(shutil.rmtree, DATA_STORE, ignore_errors=True)  # not pytest's tmp: made at import


def with_data_store(params: Params) -> Params:
    """`params` with tracking in the session's data-run store, never the project's mlflow.db."""
    tracking = TrackingParams(
        uri=f"sqlite:///{DATA_STORE / 'mlflow.db'}",
        artifact_location=str(DATA_STORE / "mlartifacts"),
        experiment="cnnops-tests",
    )
    return params.model_copy(update={"tracking": tracking})


def run_validate(data: Path, out: Path, params: Params) -> dict:
    """The real validate stage on `data` into `out/validation.json` and `out/validation_docs`."""
    paths = validate.ValidatePaths(data, out / "validation.json", out / "validation_docs")
    return validate.run(with_data_store(params), paths).report


def run_prepare(data: Path, out: Path, params: Params, validation: Path | None = None) -> dict:
    """The real prepare stage on `data` into `out/prepared` and `out/prepare.json`."""
    paths = prepare.PreparePaths(data, out / "prepared", out / "prepare.json", validation)
    return prepare.run(with_data_store(params), paths).report


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path, digits_params) -> Path:
    out = tmp_path_factory.mktemp("prepared_digits")
    run_prepare(digits_folder, out, digits_params)
    return out / "prepared"
