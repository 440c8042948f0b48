"""`cnnops serve` as a real server on 127.0.0.1: real PNG and JPEG uploads answered as `cnnops predict`
answers the same files, bad files and oversize requests refused by a clear 4xx, and a registered
version served by its alias."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fixtures_export import SIZE, grey, model_run
from fixtures_net import free_port
from mlflow import MlflowClient
from PIL import Image

from cnnops import cli
from cnnops.data.digest import file_sha256
from cnnops.tracking import registry

pytestmark = pytest.mark.integration
CNNOPS = str(Path(sys.executable).with_name("cnnops"))
MAX_PIXELS = 10_000  # a 120x120 picture is past it
MAX_BYTES = 200_000
MAX_FILES = 4


@contextmanager
def server(
    model: str, log: Path, *args: str, params: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`cnnops serve MODEL` on a free port of 127.0.0.1, until the block ends; yields its URL."""
    port = free_port()
    before = ["--params", str(params)] if params else []
    with log.open("w") as out:
        command = [CNNOPS, *before, "serve", model, "--port", str(port), *args]
        proc = subprocess.Popen(command, stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"cnnops serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer from {url}/health:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Class levels are a = 0.25, b = 0.5, c = 0.75 grey; each good file is named after its class."""
    root = tmp_path_factory.mktemp("serve_images")
    files = {name: root / name for name in ("a.png", "b.jpg", "c.png", "corrupt.png", "notes.png", "big.png")}
    Image.fromarray(grey(0.25)).save(files["a.png"])
    Image.fromarray(grey(0.5, (30, 26, 3)), "RGB").save(files["b.jpg"], quality=90)
    Image.fromarray(np.full((18, 18), round(0.75 * 65535), np.uint16)).save(files["c.png"])  # 16-bit
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(noisy, "PNG")
    files["corrupt.png"].write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])  # truncated
    files["notes.png"].write_text("not an image at all")
    Image.fromarray(grey(0.5, (120, 120))).save(files["big.png"])  # 14,400 pixels
    return files


@pytest.fixture(scope="module")
def served(onnx_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    limits = ("--max-pixels", str(MAX_PIXELS), "--max-bytes", str(MAX_BYTES), "--max-files", str(MAX_FILES))
    with server(str(onnx_file), tmp_path_factory.mktemp("serve_log") / "serve.log", *limits) as url:
        yield url


def post(url: str, *paths: Path, field: str = "file") -> httpx.Response:
    files = [(field, (path.name, path.read_bytes())) for path in paths]
    return httpx.post(f"{url}/predict", files=files, timeout=60)


def cnnops_predict(model: Path, *paths: Path) -> dict:
    done = subprocess.run(
        [
            CNNOPS,
            "predict",
            str(model),
            *map(str, paths),
            "--format",
            "json",
            "--max-pixels",
            str(MAX_PIXELS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stdout)


def test_answers_equal_cnnops_predict_and_a_corrupt_file_is_named(
    served: str, onnx_file: Path, images: dict[str, Path]
) -> None:
    files = [images[n] for n in ("a.png", "b.jpg", "corrupt.png", "c.png")]
    answer = post(served, *files)
    assert answer.status_code == 422, answer.text  # one file is bad: refused by name, the others answered
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    expected = cnnops_predict(onnx_file, *files)
    model = {"name": "model.onnx", "path": str(onnx_file), "sha256": file_sha256(onnx_file)}
    assert [p["file"] for p in body["predictions"]] == ["a.png", "b.jpg", "c.png"]
    for got, want in zip(body["predictions"], expected["predictions"], strict=True):
        assert got["class"] == want["class"] == got["file"][0]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert got["model"] == model
    [error] = body["errors"]
    [predict_error] = expected["errors"]
    assert error == {
        "file": "corrupt.png",
        "error": predict_error["error"].replace(str(images["corrupt.png"]), "corrupt.png"),
    }
    assert (
        error["error"].startswith("corrupt.png: is ") and str(images["corrupt.png"].parent) not in answer.text
    )


def test_good_files_alone_answer_200(served: str, images: dict[str, Path]) -> None:
    answer = post(served, images["b.jpg"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["errors"] == [] and answer.json()["predictions"][0]["class"] == "b"


@pytest.mark.parametrize(
    ("name", "problem"),
    [("notes.png", "is not an image"), ("big.png", f"more than {MAX_PIXELS:,} pixels")],
)
def test_bad_images_are_named_with_the_problem(
    served: str, images: dict[str, Path], name: str, problem: str
) -> None:
    answer = post(served, images[name])
    assert answer.status_code == 422
    [error] = answer.json()["errors"]
    assert error["file"] == name and error["error"].startswith(f"{name}: ") and problem in error["error"]


def test_oversize_and_malformed_requests_are_refused(
    served: str, images: dict[str, Path], tmp_path: Path
) -> None:
    bulky = tmp_path / "bulky.png"
    bulky.write_bytes(os.urandom(MAX_BYTES))
    too_large = post(served, bulky)
    assert too_large.status_code == 413 and f"{MAX_BYTES:,} (--max-bytes)" in too_large.json()["error"]
    too_many = post(served, *[images["a.png"]] * (MAX_FILES + 1))
    assert too_many.status_code == 413 and "--max-files" in too_many.json()["error"]
    not_a_form = httpx.post(f"{served}/predict", content=images["a.png"].read_bytes(), timeout=10)
    assert not_a_form.status_code == 415 and "multipart/form-data" in not_a_form.json()["error"]
    text_field = httpx.post(f"{served}/predict", files={"x": (None, "1")}, timeout=10)
    assert text_field.status_code == 400 and "'x' is not a file" in text_field.json()["error"]
    chunked = httpx.post(
        f"{served}/predict",
        content=iter([b"--b\r\n"]),
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=10,
    )
    assert chunked.status_code == 411
    for answer in (too_large, too_many, not_a_form, text_field, chunked):
        assert "Traceback" not in answer.text
    assert httpx.get(f"{served}/health", timeout=10).status_code == 200  # still answering


def test_health_metadata_and_untrusted_names(served: str, onnx_file: Path, images: dict[str, Path]) -> None:
    health = httpx.get(f"{served}/health", timeout=10).json()
    assert health == {
        "status": "ok",
        "model": {"name": "model.onnx", "path": str(onnx_file), "sha256": file_sha256(onnx_file)},
    }
    metadata = httpx.get(f"{served}/metadata", timeout=10)
    assert metadata.json()["metadata"]["class_names"] == ["a", "b", "c"]
    assert metadata.json()["metadata"]["input_size"] == list(SIZE)
    evil = "<script>alert(1)</script>\u202e\x1b[31m.png"
    answer = httpx.post(
        f"{served}/predict", files=[("file", (evil, images["a.png"].read_bytes()))], timeout=10
    )
    assert answer.json()["predictions"][0]["file"] == evil  # returned as data, JSON-encoded
    assert "<script>" not in answer.text and "\u202e" not in answer.text and "\x1b" not in answer.text
    assert answer.headers["x-content-type-options"] == "nosniff"
    missing = httpx.get(f"{served}/nope", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}


def test_concurrent_requests_get_their_own_answers(served: str, images: dict[str, Path]) -> None:
    names = ["a.png", "b.jpg", "c.png"] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda name: post(served, images[name]), names))
    assert [a.json()["predictions"][0]["class"] for a in answers] == [n[0] for n in names]


@pytest.mark.slow
def test_a_registered_version_is_served_by_its_alias(
    tmp_path: Path, onnx_file: Path, good_model, mlflow_store, images: dict[str, Path]
) -> None:
    checkpoint, report = model_run(tmp_path, "served", good_model, mlflow_store)
    run_id = json.loads(report.read_text())["run_id"]
    version = registry.register(mlflow_store, "served-model", run_id, onnx_file, checkpoint)
    MlflowClient().set_registered_model_alias("served-model", registry.CHAMPION, version)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tracking": {"uri": mlflow_store.uri}}))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the params file names it
    with server("models:/served-model@champion", tmp_path / "serve.log", params=params, env=env) as url:
        answer = post(url, images["c.png"])
    model = {"name": "served-model", "version": version, "sha256": file_sha256(onnx_file)}
    assert answer.status_code == 200 and answer.json()["predictions"][0]["model"] == model
    assert answer.json()["predictions"][0]["class"] == "c"


def test_a_model_that_cannot_be_served_is_a_clear_error(
    tmp_path: Path, mlflow_store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused at start, by name, with exit 1 and no traceback: a missing file, a URI of the wrong
    shape (before params.yaml is read), an alias no version has."""
    assert cli.main(["serve", str(tmp_path / "nope.onnx")]) == 1
    assert f"{tmp_path / 'nope.onnx'}: ONNX model not found" in capsys.readouterr().err
    assert cli.main(["--params", str(tmp_path / "absent.yaml"), "serve", "models:/a/b/c"]) == 1
    assert "models:/a/b/c: not a registered model URI" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tracking": {"uri": mlflow_store.uri}}))
    assert cli.main(["--params", str(params), "serve", "models:/ghost@champion"]) == 1
    err = capsys.readouterr().err
    assert "registered model 'ghost' has no version with alias 'champion'" in err and "Traceback" not in err
