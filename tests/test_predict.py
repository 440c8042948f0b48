"""`cnnops predict` through the real command line, on odd images and a corrupt file among good ones."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cases_hostile import EVIL_NAMES
from fixtures_export import grey, hand_built_onnx
from PIL import Image

from cnnops import cli

pytestmark = pytest.mark.integration
CNNOPS = str(Path(sys.executable).with_name("cnnops"))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class levels are a = 0.25, b = 0.5, c = 0.75 grey; each file is named after its true class."""
    root = tmp_path_factory.mktemp("images")
    rgba = np.dstack([grey(0.25)] * 3 + [np.full((20, 24), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "a_rgba.png")
    Image.fromarray(np.full((30, 30), round(0.5 * 65535), np.uint16)).save(root / "b_16bit.png")
    Image.fromarray(np.dstack([grey(0.75)] * 3), "RGB").convert("CMYK").save(root / "c_cmyk.jpg")
    Image.fromarray(grey(0.25)).convert("P").save(root / "a_palette.gif")
    Image.fromarray(grey(0.5)).save(root / "b_plain.bmp")
    good = io.BytesIO()
    Image.fromarray(grey(0.5)).save(good, "PNG")
    (root / "corrupt.png").write_bytes(good.getvalue()[:40])  # truncated
    (root / "notes.txt").write_text("not an image: skipped with a warning")
    return root


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CNNOPS, "predict", *args], capture_output=True, text=True, timeout=120)


def test_folder_json_with_odd_modes_and_a_corrupt_file(onnx_file: Path, odd_images: Path) -> None:
    done = predict(str(onnx_file), str(odd_images), "--format", "json", "--batch-size", "2")
    assert done.returncode == 1  # one file failed
    payload = json.loads(done.stdout)
    got = {Path(p["path"]).name: p for p in payload["predictions"]}
    assert sorted(got) == ["a_palette.gif", "a_rgba.png", "b_16bit.png", "b_plain.bmp", "c_cmyk.jpg"]
    for name, prediction in got.items():
        assert prediction["class"] == name[0], prediction
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert [Path(e["path"]).name for e in payload["errors"]] == ["corrupt.png"]
    assert f"cnnops predict: error: {odd_images / 'corrupt.png'}: is " in done.stderr
    assert "notes.txt" in done.stderr  # skipped with a warning, not silently


def test_files_as_csv(onnx_file: Path, odd_images: Path) -> None:
    files = [str(odd_images / "c_cmyk.jpg"), str(odd_images / "a_rgba.png")]
    done = predict(str(onnx_file), *files, "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(Path(r["path"]).name, r["class"]) for r in rows] == [("c_cmyk.jpg", "c"), ("a_rgba.png", "a")]
    assert set(rows[0]) == {"path", "class", "confidence", "a", "b", "c"}


def test_table_with_a_missing_path_and_a_foreign_model(
    onnx_file: Path, odd_images: Path, tmp_path: Path
) -> None:
    done = predict(str(onnx_file), str(odd_images / "b_plain.bmp"), str(tmp_path / "nope.png"))
    assert done.returncode == 1
    assert "nope.png: no such file or folder" in done.stderr
    table_row = next(line for line in done.stdout.splitlines() if "b_plain.bmp" in line)
    assert "│ b " in table_row and "confidence" in done.stdout
    (tmp_path / "x.onnx").write_bytes(b"junk")
    bad = predict(str(tmp_path / "x.onnx"), str(odd_images))
    assert bad.returncode == 1 and "x.onnx: not a readable ONNX model" in bad.stderr


@pytest.mark.parametrize(
    ("props", "graph", "key"),
    [
        ({"input_size": "[32, 32]"}, {"input_shape": ("batch", 1, 8, 8)}, "input_size"),
        ({"class_names": '["a", "b"]'}, {}, "class_names"),
        ({"input_size": "[-5, 8]"}, {}, "input_size"),
        ({"input_size": "[]"}, {}, "input_size"),
        ({"input_size": "[100000, 100000]"}, {}, "input_size"),
        ({}, {"input_type": onnx.TensorProto.INT64}, "INT64"),
        ({}, {"op": "NoSuchOp"}, "ONNX Runtime cannot load it"),
    ],
)
def test_mismatched_or_foreign_onnx_is_a_clear_error(
    tmp_path: Path,
    odd_images: Path,
    capsys: pytest.CaptureFixture[str],
    props: dict[str, str],
    graph: dict[str, object],
    key: str,
) -> None:
    """Each is refused before any image is read: exit 1, the file and the key named, no traceback."""
    path = hand_built_onnx(tmp_path / "edited.onnx", props, **graph)
    assert cli.main(["predict", str(path), str(odd_images / "b_plain.bmp")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cnnops predict: error: {path}: ") and key in err, err


def test_hand_built_onnx_that_agrees_with_its_metadata_predicts(
    tmp_path: Path, odd_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = hand_built_onnx(tmp_path / "fine.onnx")
    assert cli.main(["predict", str(path), str(odd_images / "b_plain.bmp"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["class"] == "a"  # three equal scores


def test_class_names_and_paths_reach_the_terminal_inert(tmp_path: Path) -> None:
    """Markup is shown, not parsed (`[/]` used to crash the table, `[link=...]` to hide a hyperlink),
    and escape sequences in names and paths are shown as \\xNN instead of driving the terminal."""
    model = hand_built_onnx(tmp_path / "m.onnx", {"class_names": json.dumps(EVIL_NAMES)})
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(grey(0.5)).save(images / "ok\x1b[31m.png")
    (images / "bad\x1b]8;;evil.example\x07.png").write_bytes(b"not a png")
    (images / "note\x1b[2J.txt").write_text("skipped with a warning")
    done = predict(str(model), str(images))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\x1b" not in done.stderr
    assert EVIL_NAMES[0] in done.stdout and "[/]" in done.stdout and r"\x1b]0;pwned\x07b" in done.stdout
    assert r"ok\x1b[31m.png" in done.stdout
    assert r"bad\x1b]8;;evil.example\x07.png: is not an image" in done.stderr  # error line
    assert r"note\x1b[2J.txt" in done.stderr  # the skip warning, through the log formatter
    missing = predict(str(tmp_path / "no\x1b[5m.onnx"), str(images))  # a CnnopsError, printed by cli.main
    assert r"no\x1b[5m.onnx: ONNX model not found" in missing.stderr and "\x1b" not in missing.stderr


@pytest.mark.parametrize("tty", [True, False])
def test_log_lines_are_printable_on_both_handlers(
    tty: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # setup_logging's handler leaves with the test
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    cli.setup_logging(verbose=False)
    logging.getLogger("cnnops.test").warning("skipping %s", "x\x1b]0;pwned\x07[/]\u202e.png")
    err = capsys.readouterr().err
    assert "\x07" not in err and "\x1b]" not in err and "\u202e" not in err
    shown = re.sub(r"\x1b\[[0-9;]*m", "", err)  # Rich's own colours, on a terminal
    assert r"skipping x\x1b]0;pwned\x07[/]\u202e.png" in shown


def test_limits_on_the_command_line_are_the_params_bounds(tmp_path: Path) -> None:
    """--max-pixels past twice Pillow's default would turn the bomb protection off: refused."""
    for flag, value in (("--max-pixels", "10000000000"), ("--batch-size", "1000000000")):
        result = predict(str(tmp_path / "m.onnx"), str(tmp_path), flag, value)
        assert result.returncode == 2 and "is more than" in result.stderr and "Traceback" not in result.stderr
