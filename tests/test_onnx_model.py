"""The ONNX contract: parity with PyTorch across architectures, a dynamic batch, metadata, compression."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fixtures_export import CLASSES, SIZE, hand_built_onnx, synthetic_split

from cnnops.errors import ExportError, StageInputError
from cnnops.export.compression import SplitCalibration, compress, refusal
from cnnops.export.onnx_model import (
    OnnxMetadata,
    check_parity,
    export_classifier,
    infer,
    open_session,
    read_metadata,
    with_output,
)
from cnnops.models import CHANNELS, create_classifier, default_spec

pytestmark = pytest.mark.integration


def metadata_for(model, output: str = "logits") -> OnnxMetadata:
    spec = model.spec
    return OnnxMetadata(
        class_names=spec.class_names,
        input_size=spec.image_size,
        color_mode=spec.color_mode,
        output=output,
        model=spec.model,
        mlflow_run_id="run123",
        git_commit="abc",
        data_version="d41d8.dir",
    )


def export(model, tmp_path: Path, output: str = "logits") -> Path:
    path = tmp_path / "model.onnx"
    export_classifier(model, path, opset=18, metadata=metadata_for(model, output))
    return path


def eager(model, images: torch.Tensor, output: str = "logits") -> np.ndarray:
    with torch.inference_mode():
        return with_output(model, output)(images).numpy()


@pytest.mark.parametrize(
    ("arch", "color_mode", "size"),
    [
        ("convnet", "L", (16, 16)),
        ("convnet", "RGB", (16, 16)),
        ("resnet18", "L", (32, 32)),
        ("resnet18", "RGB", (32, 32)),
        pytest.param("mobilenet_v3_small", "L", (32, 32), marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", "RGB", (32, 32), marks=pytest.mark.slow),
    ],
)
def test_parity_and_dynamic_batch(arch: str, color_mode: str, size: tuple[int, int], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_classifier(default_spec(arch, CLASSES, color_mode, size)).eval()
    path = export(model, tmp_path)
    session = open_session(path)
    channels = CHANNELS[color_mode]
    for batch in (1, 7):  # some exporter versions silently fix the batch axis to the example's
        images = torch.rand(batch, channels, *size)
        outputs = infer(session, images.numpy(), batch_size=batch)
        assert outputs.shape == (batch, len(CLASSES))
        parity = check_parity(eager(model, images), outputs, 1e-4, path.name)
        assert parity["argmax_agreement"] == 1.0
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a number
    assert not list(tmp_path.glob("*.data"))  # one self-contained file


def test_metadata_round_trip_and_softmax_in_graph(tmp_path: Path, good_model) -> None:
    model = good_model
    path = export(model, tmp_path, output="probabilities")
    meta = read_metadata(path)
    assert meta == metadata_for(model, "probabilities")
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["class_names"] == '["a", "b", "c"]' and props["input_size"] == "[16, 16]"
    assert props["color_mode"] == "L" and props["output"] == "probabilities"
    outputs = infer(open_session(path), synthetic_split((2, 2, 2)).floats().numpy(), batch_size=4)
    np.testing.assert_allclose(outputs.sum(1), 1.0, atol=1e-5)


def test_parity_failure_names_the_numbers() -> None:
    expected = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    actual = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    with pytest.raises(ExportError, match=r"probabilities 0.462 .*parity_atol = 0.0001.*agreement 50\.00%"):
        check_parity(expected, actual, 1e-4, "model.onnx")
    with pytest.raises(ExportError, match="probabilities nan"):
        check_parity(expected, np.full_like(expected, np.nan), 1e-4, "model.onnx")


def test_parity_fits_the_scale_of_large_logits_and_forgives_near_ties() -> None:
    """The measured failure in miniature: logits in the tens differ by 1.2e-4 from float32 rounding
    (over the old absolute limit on logits) while the probabilities agree far inside 1e-4."""
    rng = np.random.default_rng(0)
    expected = rng.normal(0, 15, (64, 4)).astype(np.float32)
    actual = expected + rng.choice([-1.2e-4, 1.2e-4], expected.shape).astype(np.float32)
    parity = check_parity(expected, actual, 1e-4, "model.onnx")
    assert parity["max_abs_output_diff"] > 1e-4 > parity["max_abs_diff"] and parity["argmax_agreement"] == 1.0
    tie = np.array([[2.0, 2.0 + 1e-6]], dtype=np.float32)  # a near tie flips on rounding alone
    flipped = check_parity(tie, tie[:, ::-1].copy(), 1e-4, "model.onnx")
    assert flipped["near_ties"] == 1 and flipped["argmax_agreement"] == 1.0


def test_foreign_or_broken_onnx_is_refused(tmp_path: Path) -> None:
    model = create_classifier(default_spec("convnet", CLASSES, "L", SIZE)).eval()
    path = export(model, tmp_path)
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "foreign.onnx")
    with pytest.raises(StageInputError, match=r"foreign.onnx: metadata_props lack class_names"):
        read_metadata(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(StageInputError, match=r"junk\.onnx: not a readable ONNX model"):
        read_metadata(tmp_path / "junk.onnx")
    with pytest.raises(StageInputError, match=r"missing\.onnx: ONNX model not found"):
        read_metadata(tmp_path / "missing.onnx")


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_compression_keeps_contract_and_predictions(kind: str, tmp_path: Path, good_model) -> None:
    model = good_model
    path = export(model, tmp_path)
    out = tmp_path / f"model.{kind}.onnx"
    compress(path, out, kind)
    assert read_metadata(out) == replace(metadata_for(model), compression=kind)
    images = synthetic_split((4, 4, 4), seed=3).floats().numpy()
    fp32, small = infer(open_session(path), images, 5), infer(open_session(out), images, 5)
    assert small.dtype == np.float32 and small.shape == fp32.shape
    assert (small.argmax(1) == fp32.argmax(1)).all()
    assert out.stat().st_size < path.stat().st_size


def test_static_int8_is_qdq_per_channel_calibrated_in_batches(tmp_path: Path, good_model) -> None:
    """int8_static quantizes the convolutions (dynamic INT8 leaves them fp32): QDQ pairs around
    them, one weight scale per output channel; the calibration reads the split a batch at a time."""
    path = export(good_model, tmp_path)
    train = synthetic_split((9, 9, 9), seed=5)
    calibration = SplitCalibration(train, SIZE, images=20, batch_size=8)
    assert (len(calibration), calibration.images) == (3, 20)  # 20 of 27 images, spread: 8 + 8 + 4
    out = tmp_path / "model.int8_static.onnx"
    compress(path, out, "int8_static", calibration)
    assert calibration.get_next() is None  # ORT read every batch
    graph = onnx.load(out).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 2 and "Conv" in ops
    weights = {i.name: i for i in graph.initializer}
    conv = next(node for node in graph.node if node.op_type == "Conv")
    dequantize = next(node for node in graph.node if node.output[0] == conv.input[1])
    scale = onnx.numpy_helper.to_array(weights[dequantize.input[1]])
    assert scale.shape == (onnx.numpy_helper.to_array(weights[dequantize.input[0]]).shape[0],)  # per channel
    assert read_metadata(out).compression == "int8_static"
    images = synthetic_split((4, 4, 4), seed=3).floats().numpy()
    fp32, small = infer(open_session(path), images, 5), infer(open_session(out), images, 5)
    assert small.dtype == np.float32 and (small.argmax(1) == fp32.argmax(1)).all()


def test_a_copy_that_does_not_help_is_refused_with_its_figures() -> None:
    latency = {"fp32_batch1_p50_ms": 2.0, "compressed_batch1_p50_ms": 1.0, "speedup_batch1": 2.0}
    helps = {"kind": "int8_static", "accuracy": 0.99, "fp32_accuracy": 1.0, "latency": latency}
    assert refusal(helps, 0.01) == ""
    assert refusal({**helps, "accuracy": 0.95}, 0.01) == (
        "int8_static copy refused: test accuracy 0.9500 is 0.0500 below fp32's 1.0000 "
        "(export.max_accuracy_drop 0.01)"
    )
    slow = {**latency, "compressed_batch1_p50_ms": 3.0, "speedup_batch1": 2 / 3}
    assert refusal({**helps, "latency": slow}, 0.01) == (
        "int8_static copy refused: slower than fp32 at batch 1 (p50 3.000 ms vs 2.000 ms, 0.67x)"
    )


@pytest.mark.parametrize(
    ("props", "graph", "message"),
    [
        (
            {"input_size": "[32, 32]", "resize_size": "[32, 32]"},
            {},
            r"input 'image' has shape \[\?, 1, 16, 16\], but .*input_size say",
        ),
        (
            {"input_size": "[32, 32]"},
            {},
            r"resize_size is \[16, 16\], expected at least input_size \[32, 32\]",
        ),
        ({}, {"input_shape": ("batch", 1, 8, 8)}, r"input 'image' has shape \[\?, 1, 8, 8\]"),
        ({"color_mode": "RGB"}, {}, r"color_mode and input_size say \[batch, 3, 16, 16\]"),
        ({"class_names": '["a", "b"]'}, {}, r"output 'logits' has shape \[\?, 3\], but .*class_names say"),
        ({}, {"input_type": onnx.TensorProto.INT64}, r"input 'image' is INT64, but cnnops feeds"),
        ({"input_size": "[-5, 8]"}, {}, r"input_size is \[-5, 8\], expected \[height, width\] .* 1\.\.4096"),
        ({"input_size": "[]"}, {}, r"input_size is \[\], expected"),
        ({"input_size": "[100000, 100000]"}, {}, r"input_size is \[100000, 100000\], expected"),
        ({"input_size": '["16", 16.0]'}, {}, r"input_size is \['16', 16\.0\], expected"),  # never coerced
        ({"input_size": "16 x 16"}, {}, r"input_size is '16 x 16', expected a JSON list"),
        (
            {"class_names": "[1, 2, 3]"},
            {},
            r"class_names is \[1, 2, 3\], expected a list of 1\.\.100000 names",
        ),
        ({"class_names": '["a", "a", "b"]'}, {}, r"class_names is .*, expected distinct names"),
    ],
)
def test_metadata_that_does_not_describe_the_graph_is_refused(
    tmp_path: Path, props: dict[str, str], graph: dict[str, object], message: str
) -> None:
    path = hand_built_onnx(tmp_path / "edited.onnx", props, **graph)
    with pytest.raises(StageInputError, match=rf"edited\.onnx: .*{message}"):
        read_metadata(path)


def test_graph_onnx_runtime_cannot_load_is_refused(tmp_path: Path) -> None:
    path = hand_built_onnx(tmp_path / "odd.onnx", op="NoSuchOp")
    read_metadata(path)  # the declared inputs and outputs agree with the metadata
    with pytest.raises(StageInputError, match=r"odd\.onnx: ONNX Runtime cannot load it \(.*NoSuchOp"):
        open_session(path)


def test_the_calibration_temperature_is_inside_the_graph_and_in_its_metadata(
    tmp_path: Path, good_model
) -> None:
    """Probabilities come out divided by the temperature; the argmax and the metadata say so."""
    meta = replace(metadata_for(good_model, "probabilities"), temperature=2.5)
    path = tmp_path / "tempered.onnx"
    export_classifier(good_model, path, opset=18, metadata=meta)
    images = synthetic_split((4, 4, 4)).floats()
    outputs = infer(open_session(path), images.numpy(), 12)
    with torch.inference_mode():
        logits = good_model(images)
    np.testing.assert_allclose(outputs, torch.softmax(logits / 2.5, 1).numpy(), atol=1e-6)
    assert (outputs.argmax(1) == logits.argmax(1).numpy()).all()
    assert read_metadata(path).temperature == 2.5
    assert read_metadata(export(good_model, tmp_path)).temperature == 1.0
    for bad in ("0", "-1", "nan", "inf", "warm"):
        with pytest.raises(
            StageInputError, match=r"metadata_props temperature is .*expected a number in \(0, 1000\]"
        ):
            read_metadata(hand_built_onnx(tmp_path / f"t{bad}.onnx", {"temperature": bad}))
