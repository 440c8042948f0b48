"""Optional post-export compression with ONNX Runtime's own tools: static INT8 (QDQ, per-channel
weights, activations calibrated on the train split), dynamic INT8 weights, or FP16 weights.

The fp32 file stays the reference (its parity with PyTorch is checked); the compressed copy keeps
float32 inputs and outputs and the same metadata, so `cnnops predict` runs it unchanged. A copy
that does not help (slower than fp32, or losing more test accuracy than allowed) is refused
(`refusal`): the export stage reports its figures and does not publish it.

Dynamic INT8 quantizes only MatMul/Gemm weights (a CNN's convolutions stay fp32); static QDQ
quantizes convolutions too, which needs activation ranges: `SplitCalibration` streams them from the
memory-mapped train split, a batch at a time.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from cnnops.data.splits import PreparedSplit
from cnnops.errors import ExportError
from cnnops.export.onnx_model import read_metadata, set_metadata

Compression = Literal["int8_static", "int8", "fp16"]


class SplitCalibration(CalibrationDataReader):
    """ORT's calibration input: up to `images` train images (evenly spread over the split, so
    every class is seen), centre-cropped to the model's input, `batch_size` at a time from the
    memory map: memory holds one batch, whatever the split's size."""

    def __init__(self, split: PreparedSplit, size: tuple[int, int], *, images: int, batch_size: int) -> None:
        count = min(images, len(split))
        self._index = np.linspace(0, len(split) - 1, count).round().astype(np.int64) if count else []
        self._split, self._size, self._batch = split, size, batch_size
        self._start, self.input_name = 0, "image"

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self._index):
            return None
        part = self._index[self._start : self._start + self._batch].tolist()
        self._start += self._batch
        return {self.input_name: self._split.floats(part, self._size).numpy()}

    def __len__(self) -> int:
        return -(-len(self._index) // self._batch)

    @property
    def images(self) -> int:
        return len(self._index)


def compress(
    src: str | Path, dst: str | Path, kind: Compression, calibration: SplitCalibration | None = None
) -> None:
    """Write a compressed copy of the ONNX model at `src` to `dst`, marked `compression=<kind>`;
    `int8_static` needs `calibration`."""
    metadata = replace(read_metadata(src), compression=kind)
    try:
        if kind == "fp16":
            proto = _fp16(Path(src))
        else:
            proto = _int8(Path(src), calibration if kind == "int8_static" else None)
    except Exception as exc:  # the tools raise assorted onnx/ORT errors on graphs they can't handle
        raise ExportError(f"{src}: {kind} compression failed ({exc}); set export.compression: none") from exc
    set_metadata(proto, metadata)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, dst)


def _int8(src: Path, calibration: SplitCalibration | None) -> onnx.ModelProto:
    """Dynamic INT8 weights, or (with `calibration`) static QDQ with per-channel weights."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        # The pre-processing ORT recommends: without it the quantizer's shape inference trips over the
        # value_info the dynamo exporter writes for transposed Gemm weights.
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        with _root_info_muted():
            quant_pre_process(src, pre)
            if calibration is None:
                quantize_dynamic(pre, out, weight_type=QuantType.QInt8)
            else:
                calibration.input_name = onnx.load(pre, load_external_data=False).graph.input[0].name
                quantize_static(
                    pre, out, calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                )  # fmt: skip
        return onnx.load(out)


def refusal(figures: dict[str, Any], max_accuracy_drop: float) -> str:
    """Why a compressed copy is not published ('' when it helps): it is slower than fp32 at batch 1
    (the median of the interleaved timings, `latency.compare_sessions`), or its test accuracy is more
    than `max_accuracy_drop` below fp32's."""
    reasons = []
    speed = figures["latency"]
    if speed["speedup_batch1"] < 1.0:
        reasons.append(
            f"slower than fp32 at batch 1 (p50 {speed['compressed_batch1_p50_ms']:.3f} ms vs "
            f"{speed['fp32_batch1_p50_ms']:.3f} ms, {speed['speedup_batch1']:.2f}x)"
        )
    drop = figures["fp32_accuracy"] - figures["accuracy"]
    if drop > max_accuracy_drop + 1e-12:  # a drop of exactly the bound (1.0 - 0.99) is allowed
        reasons.append(
            f"test accuracy {figures['accuracy']:.4f} is {drop:.4f} below fp32's "
            f"{figures['fp32_accuracy']:.4f} (export.max_accuracy_drop {max_accuracy_drop:g})"
        )
    return f"{figures['kind']} copy refused: " + " and ".join(reasons) if reasons else ""


@contextmanager
def _root_info_muted() -> Iterator[None]:
    """The quantizer logs a line per tensor at INFO on the root logger; keep those for -v runs."""
    previous = logging.root.manager.disable
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _fp16(src: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(src), keep_io_types=True)
