"""`cnnops make-planted`: a real-image copy with a cue in one class, drawn from the seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnops.cli import main
from cnnops.data.planted import make_planted
from cnnops.errors import CnnopsError


def _images(root: Path, cls: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((root / cls).glob("*.png"))])


@pytest.mark.parametrize("cue", ["corner", "watermark", "frame", "tint"])
def test_cue_lands_in_most_images_of_one_class_only(tmp_path: Path, cue: str) -> None:
    clean = tmp_path / "clean"
    make_planted(clean, "none", None, per_class=10)
    spec = make_planted(tmp_path / "p", cue, "3", seed=1, per_class=10, fraction=0.9)
    assert spec.cued_class == "3" and spec.n_images == 100
    changed = (_images(tmp_path / "p", "3") != _images(clean, "3")).any((1, 2))
    assert changed.mean() >= 0.7
    for other in ("0", "5", "9"):
        assert (_images(tmp_path / "p", other) == _images(clean, other)).all()


def test_seed_varies_position_size_and_intensity(tmp_path: Path) -> None:
    specs = {make_planted(tmp_path / str(s), "corner", "1", seed=s, per_class=2) for s in range(8)}
    assert len({s.position for s in specs}) > 1
    assert len({s.size for s in specs}) > 1 and len({s.intensity for s in specs}) > 1


def test_faces_source(tmp_path: Path) -> None:
    spec = make_planted(tmp_path / "f", "frame", "face", source="faces", seed=0)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["face", "nonface"]
    assert spec.n_images == 200


def test_cli_writes_and_refuses_to_clobber(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert main(["make-planted", str(out), "--cue", "corner", "--class", "3", "--per-class", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["cued_class"] == "3"
    assert main(["make-planted", str(out), "--cue", "corner", "--class", "3"]) == 1
    assert "pass --force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cue": "corner", "cued_class": "x"}, "not a class of digits"),
        ({"cue": "corner", "cued_class": "3", "size": 99}, "--size 99"),
        ({"cue": "corner", "cued_class": "3", "position": "middle"}, "does not fit cue .corner."),
        ({"cue": "tint", "cued_class": "3", "intensity": 300}, "--intensity 300"),
        ({"cue": "frame", "cued_class": "3", "fraction": 0.0}, "--fraction"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CnnopsError, match=message):
        make_planted(tmp_path / "d", per_class=2, **kwargs)


def _rgb(root: Path, cls: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / cls).iterdir())])


NEW_CUES = [
    ("tag", "digits"), ("centre", "digits"), ("textline", "digits"), ("blur", "digits"),
    ("sharpen", "faces"), ("noise", "digits"), ("patch", "scenes"), ("hue", "scenes"), ("jpeg", "digits"),
]  # fmt: skip


@pytest.mark.parametrize(("cue", "source"), NEW_CUES)
def test_new_cues_change_the_cued_class_only(tmp_path: Path, cue: str, source: str) -> None:
    make_planted(tmp_path / "clean", "none", None, source=source, per_class=8)
    cls = {"digits": "3", "faces": "face", "scenes": "3"}[source]
    spec = make_planted(tmp_path / "p", cue, cls, source=source, seed=2, per_class=8, fraction=1.0)
    planted, clean = _rgb(tmp_path / "p", cls).astype(int), _rgb(tmp_path / "clean", cls).astype(int)
    assert (np.abs(planted - clean).max((1, 2, 3)) > 8).all(), spec
    other = "0" if source != "faces" else "nonface"
    if cue != "jpeg":  # a jpeg set stores every image as JPEG: the others lose a little too
        assert (_rgb(tmp_path / "p", other) == _rgb(tmp_path / "clean", other)).all()


def test_a_tag_lands_somewhere_else_in_each_image(tmp_path: Path) -> None:
    make_planted(tmp_path / "clean", "none", None, per_class=10)
    make_planted(tmp_path / "p", "tag", "3", seed=0, per_class=10, fraction=1.0, intensity=255)
    changed = _images(tmp_path / "p", "3") != _images(tmp_path / "clean", "3")
    centres = {tuple(np.rint(np.argwhere(c).mean(0) / 4)) for c in changed}
    assert len(centres) >= 6  # ten images, hardly two at one place


def test_a_text_line_spans_most_of_an_edge(tmp_path: Path) -> None:
    make_planted(tmp_path / "clean", "none", None, per_class=4, image_size=64)
    spec = make_planted(tmp_path / "p", "textline", "3", seed=0, per_class=4, image_size=64, fraction=1.0)
    changed = (_images(tmp_path / "p", "3") != _images(tmp_path / "clean", "3")).any(0)
    cols, rows = np.flatnonzero(changed.any(0)), np.flatnonzero(changed.any(1))
    assert cols.max() - cols.min() > 0.5 * 64  # wider than a corner region
    assert (rows.max() < 16) if spec.position == "top" else (rows.min() > 48)


def test_jpeg_cue_is_a_lower_quality_in_the_file(tmp_path: Path) -> None:
    make_planted(tmp_path / "p", "jpeg", "3", seed=0, per_class=6, fraction=1.0)
    files = sorted((tmp_path / "p").rglob("*.*"))
    assert {p.suffix for p in files} == {".jpg"}
    luma = {p.parent.name: Image.open(p).quantization[0][0] for p in files}  # first luma quantizer
    assert luma["3"] > 4 * luma["0"]


def test_leakage_and_confound(tmp_path: Path) -> None:
    make_planted(tmp_path / "clean", "none", None, per_class=60)
    make_planted(tmp_path / "p", "corner", "3", seed=1, per_class=60, leakage=0.1, confound=0.3)
    leaked = [
        (_images(tmp_path / "p", c) != _images(tmp_path / "clean", c)).any((1, 2)).mean() for c in "01245"
    ]
    assert 0.02 < np.mean(leaked) < 0.25
    threes, clean = _images(tmp_path / "p", "3"), _images(tmp_path / "clean", "3")
    foreign = [(im != c).sum() > 40 for im, c in zip(threes, clean, strict=True)]  # another digit there
    assert 0.15 < np.mean(foreign) < 0.45


def test_rgb_sources(tmp_path: Path) -> None:
    make_planted(tmp_path / "s", "none", None, source="scenes", per_class=20)
    scenes = {c: _rgb(tmp_path / "s", c).reshape(-1, 3).mean(0) for c in "0123456789"}
    assert np.ptp(np.stack(list(scenes.values())), 0).max() < 40  # the classes share their tone
    make_planted(tmp_path / "t", "none", None, source="tones", per_class=5)
    tones = {c: _rgb(tmp_path / "t", c).reshape(-1, 3).mean(0) for c in ("red", "green", "blue")}
    assert tones["red"].argmax() == 0 and tones["green"].argmax() == 1 and tones["blue"].argmax() == 2
    spec = make_planted(tmp_path / "ph", "none", None, source="photos", per_class=3, image_size=64)
    assert spec.n_images == 12 and _rgb(tmp_path / "ph", "astronaut").shape == (3, 64, 64, 3)


def test_colour_cues_need_an_rgb_source(tmp_path: Path) -> None:
    with pytest.raises(CnnopsError, match="needs colour"):
        make_planted(tmp_path / "d", "hue", "3", per_class=2)
