"""Session fixtures with real image data: a small digits ImageFolder and its prepared split.

`digits_folder`: 40 PNG images per digit (400 in all, 32x32 grayscale) written by the same code
as `cnnops make-example`. `prepared_digits`: the folder with {train,val,test}.pt that the real
prepare stage made from it (colour mode "L", 32x32); its report is `prepared_digits.parent /
"prepare.json"`. Both are read-only for tests: copy them before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnops.config import Params, parse_params
from cnnops.data.example import write_digits
from cnnops.stages import prepare

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


def run_prepare(data: Path, out: Path, params: Params, **kwargs) -> dict:
    """The real prepare stage on `data` into `out/prepared` and `out/prepare.json`."""
    return prepare.run(
        data,
        out_dir=out / "prepared",
        report_path=out / "prepare.json",
        seed=params.base.seed,
        data=params.data,
        prepare=params.prepare,
        validate=params.validate,
        **kwargs,
    )


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path, digits_params) -> Path:
    out = tmp_path_factory.mktemp("prepared_digits")
    run_prepare(digits_folder, out, digits_params)
    return out / "prepared"
