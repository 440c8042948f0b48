"""The real-photo example end to end: `dvc repro` fine-tunes a ResNet-18 on 224-px RGB JPEGs, then
`cnnops predict` classifies one of them; the real DVC, MLflow and ONNX Runtime in a temp git repo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures_model import cache_fake_resnet18
from fixtures_prefect import PROJECT, sh
from PIL import Image
from torchvision.models import get_model_weights

from cnnops.data.example import PHOTO_SIZE, PHOTOS, write_photos
from cnnops.errors import DataError

CLASSES, PER_CLASS = 4, 16
# What the subprocesses need of `publish_weights`: there the weights enum is torchvision's own, so a
# sitecustomize on PYTHONPATH points resnet18.IMAGENET1K_V1's URL at the locally made file when a
# `cnnops` command starts (tests only; cnnops itself is unchanged).
SITECUSTOMIZE = """\
import sys
from pathlib import Path

if Path(sys.argv[0]).name == "cnnops":
    from torchvision.models import get_model_weights

    get_model_weights("resnet18").IMAGENET1K_V1.value.url = {url!r}
"""


def test_photo_example_is_rgb_jpeg_crops_of_shipped_photographs(tmp_path: Path) -> None:
    assert write_photos(tmp_path / "a", per_class=3, classes=3) == 9
    write_photos(tmp_path / "b", per_class=3, classes=3)
    files = sorted((tmp_path / "a").rglob("*"))
    assert {p.name for p in (tmp_path / "a").iterdir()} == set(PHOTOS[:3])
    for path in (p for p in files if p.is_file()):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (PHOTO_SIZE, PHOTO_SIZE))
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    crops = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "a" / PHOTOS[0]).iterdir())]
    assert not np.array_equal(crops[0], crops[1])  # different places and scales
    with pytest.raises(DataError, match=r"--classes 9: choose 2 to 8 photographs"):
        write_photos(tmp_path / "c", classes=9)


def project_params() -> dict:
    """The shipped params with a 224-px RGB ResNet-18 fine-tune, sized for a test on 2 cores."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"]["color_mode"] = "RGB"
    params["prepare"]["image_size"] = [PHOTO_SIZE, PHOTO_SIZE]
    params["train"].update(
        model="resnet18", mode="finetune", weights="IMAGENET1K_V1", epochs=1, batch_size=8, lr=0.001
    )
    params["train"]["augment"].update(horizontal_flip=0.5)
    params["audit"].update(methods=["gradcam"], max_images_per_class=2, gallery_images_per_class=2)
    params["export"].update(latency_runs=5, throughput_batch=8)
    return params


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_fine_tunes_resnet18_on_224px_photos_and_predicts(
    tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_fake_resnet18(torch_home, monkeypatch)  # "pretrained" weights made here, in TORCH_HOME
    site = tmp_path / "site"
    site.mkdir()
    url = get_model_weights("resnet18").IMAGENET1K_V1.url
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(url=url))
    monkeypatch.setenv("PYTHONPATH", str(site))
    root = tmp_path / "repo"
    root.mkdir()
    sh(
        root,
        "cnnops",
        "make-example",
        "data",
        "--photos",
        "--classes",
        str(CLASSES),
        "--per-class",
        str(PER_CLASS),
    )
    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(project_params(), sort_keys=False))
    shutil.copytree(PROJECT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "add", "-q", "data")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "photo example copy")

    sh(root, "dvc", "repro")  # measured: 68 s on 2 shared cores (the whole test: 76 s)

    def report(name: str) -> dict:
        return json.loads((root / "reports" / name).read_text())

    classes = list(PHOTOS[:CLASSES])
    assert report("validation.json")["success"] is True
    assert report("prepare.json")["image_size"] == [PHOTO_SIZE, PHOTO_SIZE]
    train = report("train.json")
    assert (train["model"], train["mode"], train["epochs_run"]) == ("resnet18", "finetune", 1)
    metrics = report("metrics.json")
    assert set(metrics["per_class"]) == set(classes) and metrics["n_test"] > 0
    audit = report("audit.json")
    assert audit["verdict"] in ("pass", "fail", "inconclusive")
    exported = report("export.json")
    assert exported["parity"]["argmax_agreement"] == 1.0
    release = report("release.json")
    assert release["version"] == "1" and release["run_id"] == train["run_id"]

    photo = root / "data" / classes[0] / "0000.jpg"
    done = sh(root, "cnnops", "predict", "models/model.onnx", str(photo), "--format", "json")
    (prediction,) = json.loads(done)["predictions"]
    assert prediction["class"] in classes and set(prediction["probabilities"]) == set(classes)
