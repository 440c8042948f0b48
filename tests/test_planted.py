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
        ({"cue": "corner", "cued_class": "3", "position": "middle"}, "not a corner"),
        ({"cue": "tint", "cued_class": "3", "intensity": 300}, "--intensity 300"),
        ({"cue": "frame", "cued_class": "3", "fraction": 0.0}, "--fraction"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CnnopsError, match=message):
        make_planted(tmp_path / "d", per_class=2, **kwargs)
