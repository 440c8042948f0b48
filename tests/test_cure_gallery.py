"""reports/cure/compare.html: a real cure's before/after page, rendered by headless Chromium, offline,
with every user-controlled string escaped; and the README's cure demo (scripts/demo-cure) sets up
its project (the pipeline itself is test_cure's and test_pipeline_dvc's to prove).

The cure is test_cure's corner case (`fixtures_cure.cured`, run once a session: this module shares it
rather than running another pipeline), so the page is the one `cure.run` wrote and logged.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import fixtures_cure
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cnnops.audit import cure_gallery
from cnnops.config import load_params

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[1]
HOSTILE = "<img src=x onerror=alert(1)>"  # a legal folder name, so a legal class name


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:  # scripts/test installs it: missing here is a failure, not a skip
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (scripts/test does)")
    return found


def _dom(page: Path, profile: Path) -> str:
    """The page's DOM after Chromium parsed it (and ran anything it would run)."""
    done = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _screenshot(page: Path, out: Path) -> np.ndarray:
    _chromium()
    done = subprocess.run(
        [str(PROJECT / "scripts" / "screenshot_gallery"), str(page), str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        return np.asarray(image.convert("L"))


@pytest.mark.slow
def test_a_real_cures_page_shows_the_before_after_and_the_same_images_on_both_models(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    cured = fixtures_cure.cured(fixtures_cure.CORNER, tmp_path_factory)
    report, root = cured.result.report, cured.audited.root
    page = root / "reports" / "cure" / cure_gallery.PAGE
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched
    assert f"id='status'>{report['status']}<" in text
    for side in ("before", "after"):
        f = report[side]
        assert f"<td>{f['accuracy']:.3f}</td>" in text and f"<td>{f['macro_f1']:.3f}</td>" in text
        assert f"<td>{f['audit_verdict']}</td>" in text
    for finding in report["findings"]:
        assert f"<td>{html.escape(finding['test'])}</td>" in text
    # every round: its findings acted on, its re-audit and training time (the corner: one round, cured)
    stopped = f"{len(report['rounds'])} round(s): {html.escape(report['stopped'])}; "
    assert stopped + f"the cured model is round {report['kept_round']}'s</p>" in text
    for r in report["rounds"]:
        assert f"<td>re-audit {r['audit_verdict']}</td><td>trained {r['train_seconds']:.3f} s</td>" in text
    # the cued class's images, each as the failed and the cured model see it
    pairs = text.count("<div class='pair'>")
    assert 1 <= pairs <= cured.audited.params.audit.gallery_images_per_class
    assert text.count("class='overlay'") == 2 * pairs and "failed model: predicted" in text
    assert "cured model: predicted" in text
    release = report["release"]
    assert f"version {release['version']}" in text
    # the cured model's run holds it
    store = MlflowClient(cured.audited.params.tracking.uri)
    logged = [a.path for a in store.list_artifacts(report["run_id"], "cure")]
    assert f"cure/{cure_gallery.PAGE}" in logged
    pixels = _screenshot(page, tmp_path / "compare.png")
    assert pixels.std() > 10, "the screenshot is blank: the page did not render"
    assert "Cure:" in _dom(page, tmp_path / "profile")


def _hostile(report: dict, name: str) -> dict:
    """The report with class `name` renamed to HOSTILE wherever a class is named."""

    def renamed(rows: list[dict]) -> list[dict]:
        return [{**r, "class": HOSTILE if r["class"] == name else r["class"]} for r in rows]

    hostile = {"class": HOSTILE, "test": "t", "why": HOSTILE, "round": 1}
    rounds = [
        {**r, "addressed": renamed(r["addressed"]), "findings": renamed(r["findings"])}
        for r in report["rounds"]
    ]
    return {
        **report,
        "addressed": renamed(report["addressed"]),
        "not_addressed": [*renamed(report["not_addressed"]), hostile],
        "findings": renamed(report["findings"]),
        "rounds": rounds,
        "stopped": HOSTILE,
    }


@pytest.mark.slow
def test_a_hostile_class_name_is_escaped_everywhere_on_the_page(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    cured = fixtures_cure.cured(fixtures_cure.CORNER, tmp_path_factory)
    report, root = cured.result.report, cured.audited.root
    name = cured.audited.spec.cued_class
    pairs = cure_gallery.side_by_side(
        root / "models" / "model.pt", Path(report["model"]), root / "prepared", [name],
        cured.audited.params.audit,
    )  # fmt: skip
    hostile = {HOSTILE: [replace(p, path=f"{HOSTILE}/{Path(p.path).name}") for p in pairs[name]]}
    page = tmp_path / "compare.html"
    cure_gallery.render(page, _hostile(report, name), hostile)
    text = page.read_text()
    assert HOSTILE not in text and html.escape(HOSTILE) in text
    dom = _dom(page, tmp_path / "profile")
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom  # text, not an element
    tags = _Tags()
    tags.feed(dom)
    assert not [t for t in tags.seen if "onerror" in t[1]], tags.seen
    assert [t[1]["class"] for t in tags.seen if t[0] == "img"] == ["overlay"] * 2 * len(hostile[HOSTILE])


class _Tags(HTMLParser):
    """Every element of a page with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.append((tag, dict(attrs)))


def test_the_cure_demo_sets_up_a_planted_git_and_dvc_project_with_the_cure_on(tmp_path: Path) -> None:
    demo = PROJECT / "scripts" / "demo-cure"
    root = tmp_path / "demo"
    env = {**os.environ, "SETUP": "0", "SEED": "1"}
    done = subprocess.run(
        [str(demo), "--no-repro", str(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"set up in {root}" in done.stdout
    planted = json.loads((root / "planted.json").read_text())
    assert (planted["cue"], planted["cued_class"], planted["fraction"]) == ("corner", "3", 0.9)
    assert load_params(root / "params.yaml").cure.enabled is True  # the cure on, every other key valid
    git = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    assert git.returncode == 0 and git.stdout == ""  # committed, data/ tracked by data.dvc
    assert (root / "data.dvc").is_file() and (root / "data" / "3").is_dir()
    stages = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--name-only"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert stages.returncode == 0 and "cure" in stages.stdout.split(), stages.stderr
    # a folder with something in it is refused, by name, before anything is written
    again = subprocess.run([str(demo), "--no-repro", str(root)], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and f"{root} exists and is not empty" in again.stderr
