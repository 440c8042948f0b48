"""12/16-bit images kept faithful: a window (fixed, or the train split's percentiles) instead of
scaling by 65535, carried from prepare through the checkpoint and the ONNX metadata to predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import run_prepare
from PIL import Image

from cnnops.config import TrainParams, parse_params
from cnnops.data.decode import load_tensor, read_image
from cnnops.data.splits import load_splits
from cnnops.errors import DataError, StageInputError
from cnnops.export.onnx_model import OnnxMetadata, export_classifier, read_metadata
from cnnops.export.predict import predict
from cnnops.models import create_classifier
from cnnops.stages import train

LEVELS = (600, 1800, 3000)  # 12-bit grey levels of the three classes (an X-ray's 0..4095)


def _twelve_bit(root: Path, per_class: int = 12, size: int = 24) -> Path:
    """16-bit PNGs holding 12-bit values: class k a flat level LEVELS[k] plus noise."""
    rng = np.random.default_rng(0)
    for k, level in enumerate(LEVELS):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            values = np.clip(level + rng.normal(0, 150, (size, size)), 0, 4095).astype(np.uint16)
            Image.fromarray(values).save(root / f"c{k}" / f"{i}.png")
    return root


def test_a_fixed_window_keeps_twelve_bit_contrast(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.array([[0, 2048, 4095]], dtype=np.uint16)).save(path)
    assert np.asarray(read_image(path, color_mode="L").image).tolist() == [[0, 8, 16]]  # full range
    windowed = read_image(path, color_mode="L", window=(0.0, 4095.0)).image
    assert np.asarray(windowed).tolist() == [[0, 128, 255]]
    clipped = read_image(path, color_mode="L", window=(1000.0, 3000.0)).image
    assert np.asarray(clipped).tolist() == [[0, 134, 255]]  # outside the window clips


def test_percentile_window_is_measured_on_train_and_travels_to_predict(tmp_path: Path) -> None:
    data = _twelve_bit(tmp_path / "data")
    params = parse_params(
        {"data": {"color_mode": "L", "window": "percentiles"}, "prepare": {"image_size": [24, 24]}}, "t"
    )
    report = run_prepare(data, tmp_path, params)
    low, high = report["window"]
    assert 0 < low < LEVELS[0] and LEVELS[2] < high < 4095, report["window"]
    splits = load_splits(tmp_path / "prepared")
    assert all(s.window == (low, high) for s in splits.values())
    test = splits["test"]
    assert int(test.images.max()) > 200, "the window spreads the 12-bit values over 0..255"

    spec = train._spec(TrainParams.from_defaults(model="convnet"), splits["train"])
    assert spec.window == (low, high)
    onnx_path = tmp_path / "model.onnx"
    meta = OnnxMetadata(
        spec.class_names,
        spec.image_size,
        "L",
        "probabilities",
        "convnet",
        "run",
        "commit",
        "v",
        window=spec.window,
    )
    export_classifier(create_classifier(spec).eval(), onnx_path, opset=18, metadata=meta)
    assert read_metadata(onnx_path).window == (low, high)
    for path, image in zip(test.paths, test.images, strict=True):  # predict's pixels are the split's
        fed = load_tensor(data / path, color_mode="L", size=(24, 24), window=read_metadata(onnx_path).window)
        assert torch.equal(fed, image)
    predictions, failures = predict(onnx_path, [data / p for p in test.paths])
    assert len(predictions) == len(test) and not failures


def test_bad_windows_are_refused_by_key(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"data.window \[4095, 0\]: low must be below high"):
        parse_params({"data": {"window": [4095, 0]}}, "t")
    flat = tmp_path / "data"
    for k in range(2):
        (flat / f"c{k}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((8, 8), 700 + i % 2, np.uint16)).save(flat / f"c{k}" / f"{i}.png")
    params = parse_params(
        {"data": {"color_mode": "L", "window": "percentiles", "window_percentiles": [40, 45]}}, "t"
    )
    with pytest.raises(DataError, match=r"45th percentiles both 700: no window"):
        run_prepare(flat, tmp_path / "out", params)


def test_an_edited_window_in_an_onnx_file_is_refused(tmp_path: Path) -> None:
    props = OnnxMetadata(
        ["a", "b"], (8, 8), "L", "logits", "convnet", "r", "c", "v", window=(0.0, 1.0)
    ).to_props()
    assert json.loads(props["window"]) == [0.0, 1.0]
    for bad in ("[1, 0]", '["0", 1]', "[0]", "[0, Infinity]"):
        with pytest.raises(StageInputError, match="metadata_props window"):
            OnnxMetadata.from_props({**props, "window": bad}, "m.onnx")
    assert (
        OnnxMetadata.from_props({k: v for k, v in props.items() if k != "window"}, "old.onnx").window is None
    )
