"""scripts/screenshot_gallery: headless Chromium turns a real audit gallery into a PNG for the docs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fixtures_model import TrainedDigits, one_thread
from PIL import Image

from cnnops.config import parse_params
from cnnops.stages import audit

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "scripts" / "screenshot_gallery"


def screenshot(*args: str, window: str = "900,700") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env={**os.environ, "WINDOW": window},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.integration
def test_a_real_gallery_becomes_a_png_of_the_window_size(
    trained_digits: TrainedDigits, tmp_path: Path
) -> None:
    if shutil.which("chromium") is None:  # scripts/test installs it: missing here is a failure, not a skip
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (scripts/test does)")
    raw = trained_digits.params.model_dump(mode="json", by_alias=True)
    raw["audit"].update(methods=["gradcam"], max_images_per_class=8, gallery_images_per_class=2)
    params = parse_params(raw, "screenshot test")
    t = trained_digits
    paths = audit.AuditPaths(
        t.model, t.prepared, t.train_report, None, None, tmp_path / "audit.json", tmp_path / "audit"
    )
    with one_thread():
        audit.run(params, paths)

    out = tmp_path / "img" / "gallery.png"
    done = screenshot(str(paths.gallery / "index.html"), str(out))
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (900, 700)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10, "the screenshot is blank: the page did not render"


def test_a_missing_gallery_is_named_with_what_to_run(tmp_path: Path) -> None:
    done = screenshot(str(tmp_path / "nowhere" / "index.html"), str(tmp_path / "out.png"))
    assert done.returncode == 1
    assert f"{tmp_path / 'nowhere' / 'index.html'}: no such gallery" in done.stderr
    assert "dvc repro audit" in done.stderr and not (tmp_path / "out.png").exists()
