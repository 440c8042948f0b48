"""Hostile and broken inputs through the real command line: each is refused by a non-zero exit, a
message naming the input (file, key or value), and no traceback.

The corpus drives what the per-module tests probe (test_config, test_models, test_onnx_model,
test_predict, test_validate, test_audit_annotations, test_prepare) through `cnnops <command>` as a
subprocess, each case in a project folder of its own with its own params.yaml and MLflow store.
Nothing is trained: models are hand-built ONNX files or untrained checkpoints, splits synthetic. The
commands run two at a time, as each spends seconds importing torch and MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cases_hostile import EVIL_NAMES, Payload
from fixtures_export import constant_model, hand_built_onnx, synthetic_split
from PIL import Image
from torchvision.models import get_model_weights

from cnnops.config import deep_merge
from cnnops.models import save_checkpoint

pytestmark = pytest.mark.integration
CNNOPS = Path(sys.executable).with_name("cnnops")

# What a user could write: 1e9 is a float, .inf and .nan too, true a bool, "3" text.
BAD_PARAMS = """\
base: {seed: 1180591620717411303424}
data: {max_image_pixels: 1000000000000000}
prepare: {image_size: [100000, 100000]}
train: {batch_size: 1e9, num_workers: 10000, lr: .inf, epochs: true}
evaluate: {ece_bins: 1000000000}
release: {margin: .inf}
orchestrate: {lock_timeout: .nan, retries: "3"}
"""


@dataclass(frozen=True)
class Case:
    """A command line, run in the case's project folder, and what its stderr must name."""

    args: tuple[str, ...]
    named: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def _project(root: Path, **sections: dict) -> None:
    """params.yaml with an MLflow store under `root`: no case touches the project's own store."""
    tracking = {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "art")}
    raw = deep_merge({"tracking": {**tracking, "experiment": "corpus"}}, sections)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def _splits(prepared: Path, names: tuple[str, ...], size: tuple[int, int] = (16, 16)) -> Path:
    for name in names:
        synthetic_split((4, 4, 4), size=size).save(prepared, name)
    return prepared


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(path)
    return path


def params_out_of_range(root: Path) -> Case:
    (root / "params.yaml").write_text(BAD_PARAMS)
    named = (
        "cnnops prepare: error: params.yaml: 'base.seed' = 1180591620717411303424 is not allowed",
        "(allowed: >= 0 and < 4294967296)",
        "'data.max_image_pixels' = 1000000000000000 is not allowed",
        "(allowed: > 0 and <= 178956970)",
        "'prepare.image_size' = [100000, 100000] is not allowed: Value error, each side must be 8 to 4096",
        "'train.batch_size' = 1000000000.0 is not allowed: Input should be a valid integer",
        "(allowed: >= 1 and <= 65536)",
        "'train.num_workers' = 10000 is not allowed: Value error, use auto or a whole number from 0 to 64",
        "'train.lr' = inf is not allowed: Input should be a finite number (allowed: > 0.0 and <= 10.0)",
        "'train.epochs' = True is not allowed: Input should be a valid integer (allowed: >= 1 and <= 10000)",
        "'evaluate.ece_bins' = 1000000000 is not allowed",
        "(allowed: >= 2 and <= 1000)",
        "'release.margin' = inf is not allowed",
        "'orchestrate.lock_timeout' = nan is not allowed",
        "'orchestrate.retries' = '3' is not allowed: Input should be a valid integer",
        "(allowed: >= 0 and <= 10); it is quoted, so YAML reads it as text",
    )
    return Case(("prepare", "data"), named)


def planted_weights(root: Path) -> Case:
    """A code-running pickle under the real resnet18 cache name: the sha256 check refuses it unread."""
    home = root / "torch_home"
    cached = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cached.name == Path(get_model_weights("resnet18").DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Payload(root / "pwned")}, cached)
    _splits(root / "prepared", ("train", "val"), (32, 32))
    _project(root, train={"model": "resnet18", "mode": "finetune", "weights": "DEFAULT"})
    named = ("cnnops train: error: ", f"{cached}: sha256 ", "does not start with f37072fd", "delete it")
    return Case(("train", "prepared"), named, {"TORCH_HOME": str(home)})


def onnx_input_unlike_metadata(root: Path) -> Case:
    model = hand_built_onnx(root / "edited.onnx", input_shape=("batch", 1, 8, 8))
    named = ("cnnops predict: error: ", f"{model}: ", "input 'image' has shape [?, 1, 8, 8]")
    return Case(("predict", str(model), str(_image(root / "x.png"))), named)


def onnx_output_unlike_class_names(root: Path) -> Case:
    model = hand_built_onnx(root / "edited.onnx", {"class_names": '["a", "b"]'})
    named = ("cnnops predict: error: ", f"{model}: ", "output 'logits' has shape [?, 3]", "class_names")
    return Case(("predict", str(model), str(_image(root / "x.png"))), named)


def escapes_in_names(root: Path) -> Case:
    """Class names with Rich markup and an OSC title escape; file names with ANSI and OSC-8 links."""
    model = hand_built_onnx(root / "m.onnx", {"class_names": json.dumps(EVIL_NAMES)})
    _image(root / "images" / "ok\x1b[31m.png")
    (root / "images" / "bad\x1b]8;;evil.example\x07.png").write_bytes(b"not a png")
    return Case(
        ("predict", str(model), "images"), (r"images/bad\x1b]8;;evil.example\x07.png: is not an image",)
    )


def name_not_utf8(root: Path) -> Case:
    for i in range(3):
        _image(root / "data" / "a" / f"{i}.png")
        _image(root / "data" / "b" / f"{i}.png")
    bad = os.fsencode(root / "data" / "a") + b"/caf\xe9.png"
    _image(Path(os.fsdecode(bad)))
    _project(root)
    named = ("cnnops validate: error: ", f"{bad!r}: the name is not valid UTF-8; rename it")
    return Case(("validate", str(root / "data")), named)


def docs_kept_without_data(root: Path) -> Case:
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_text("last run's docs")
    _project(root)
    named = ("cnnops validate: error: ", "no-such-data: data folder not found")
    return Case(("validate", "no-such-data", "--docs", "docs", "--report", "v.json"), named)


def _audit(root: Path, annotations: str, named: tuple[str, ...]) -> Case:
    """An untrained ConvNet, synthetic splits, and data/annotations.csv: audit reads the CSV after a
    first saliency pass over two images a class."""
    _splits(root / "prepared", ("train", "test"))
    save_checkpoint(root / "model.pt", constant_model(0))
    (root / "train.json").write_text(json.dumps({"run_id": "corpus"}))
    (root / "validation.json").write_text(json.dumps({"manifest": []}))
    _image(root / "data" / "a" / "0.png")
    (root / "data" / ".masks").mkdir()
    (root / "data" / ".masks" / "m.png").write_bytes(b"")
    (root / "data" / "annotations.csv").write_text(annotations)
    _project(root, audit={"methods": ["gradcam"], "max_images_per_class": 2})
    flags = ("--prepared", "prepared", "--train-report", "train.json", "--validation", "validation.json")
    out = ("--data", "data", "--report", "audit.json", "--gallery", "gallery")
    return Case(
        ("audit", "model.pt", *flags, *out), ("cnnops audit: error: data/annotations.csv:2: ", *named)
    )


def empty_mask(root: Path) -> Case:
    return _audit(root, "path,mask\na/0.png,.masks/m.png\n", ("m.png: is empty (0 bytes)",))


def infinite_box(root: Path) -> Case:
    return _audit(root, "path,box\na/0.png,0 0 inf 8\n", ("box '0 0 inf 8' holds inf or nan",))


def truncated_split(root: Path) -> Case:
    images = _splits(root / "prepared", ("train", "val")) / "train.npy"
    images.write_bytes(images.read_bytes()[:-100])
    _project(root)
    named = ("cnnops train: error: prepared/train.npy: unreadable or truncated", "re-run `cnnops prepare`")
    return Case(("train", "prepared"), named)


def old_format_split(root: Path) -> Case:
    (_splits(root / "prepared", ("val",)) / "train.pt").write_bytes(b"old")
    _project(root)
    named = ("cnnops train: error: prepared/train.pt: a prepared split of an older cnnops",)
    return Case(("train", "prepared"), named)


CASES: dict[str, Callable[[Path], Case]] = {
    build.__name__: build
    for build in (
        params_out_of_range,
        planted_weights,
        onnx_input_unlike_metadata,
        onnx_output_unlike_class_names,
        escapes_in_names,
        name_not_utf8,
        docs_kept_without_data,
        empty_mask,
        infinite_box,
        truncated_split,
        old_format_split,
    )
}


@dataclass(frozen=True)
class Outcome:
    root: Path
    case: Case
    result: subprocess.CompletedProcess[str]


def _cnnops(root: Path, case: Case) -> Outcome:
    env = {**os.environ, "PATH": f"{CNNOPS.parent}{os.pathsep}{os.environ['PATH']}", **case.env}
    result = subprocess.run(
        [str(CNNOPS), *case.args], cwd=root, capture_output=True, text=True, env=env, timeout=300
    )
    return Outcome(root, case, result)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case built, then run two at a time: their inputs are apart, so order does not matter."""
    built = {}
    for name, build in CASES.items():
        root = tmp_path_factory.mktemp(name)
        built[name] = (root, build(root))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda item: _cnnops(*item), built.values())
        return dict(zip(built, done, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_naming_it_without_a_traceback(outcomes: dict[str, Outcome], name: str) -> None:
    case, result = outcomes[name].case, outcomes[name].result
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    missing = [text for text in case.named if text not in result.stderr]
    assert missing == [], result.stderr


def test_the_planted_pickle_never_ran(outcomes: dict[str, Outcome]) -> None:
    assert not (outcomes["planted_weights"].root / "pwned").exists()


def test_names_reach_the_terminal_inert(outcomes: dict[str, Outcome]) -> None:
    """Markup is shown as typed, never parsed; escapes are shown as \\xNN, never sent."""
    result = outcomes["escapes_in_names"].result
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\x07" not in stream
    assert EVIL_NAMES[0] in result.stdout and r"\x1b]0;pwned\x07b" in result.stdout
    assert r"ok\x1b[31m.png" in result.stdout


def test_a_missing_data_folder_leaves_the_docs_folder_alone(outcomes: dict[str, Outcome]) -> None:
    docs = outcomes["docs_kept_without_data"].root / "docs"
    assert (docs / "index.html").read_text() == "last run's docs"
