"""Optional post-export compression with ONNX Runtime's own tools: dynamic INT8 or FP16 weights.

The fp32 file stays the reference (its parity with PyTorch is checked); the compressed copy keeps
float32 inputs and outputs and the same metadata, so `cnnops predict` runs it unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal

import onnx

from cnnops.errors import ExportError
from cnnops.export.onnx_model import read_metadata, set_metadata

Compression = Literal["int8", "fp16"]


def compress(src: str | Path, dst: str | Path, kind: Compression) -> None:
    """Write a compressed copy of the ONNX model at `src` to `dst`, marked `compression=<kind>`."""
    metadata = replace(read_metadata(src), compression=kind)
    try:
        proto = _int8(Path(src)) if kind == "int8" else _fp16(Path(src))
    except Exception as exc:  # both tools raise assorted onnx/ORT errors on graphs they can't handle
        raise ExportError(f"{src}: {kind} compression failed ({exc}); set export.compression: none") from exc
    set_metadata(proto, metadata)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, dst)


def _int8(src: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        # The pre-processing ORT recommends: without it the quantizer's shape inference trips over the
        # value_info the dynamo exporter writes for transposed Gemm weights.
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        with _root_info_muted():
            quant_pre_process(src, pre)
            quantize_dynamic(pre, out, weight_type=QuantType.QInt8)
        return onnx.load(out)


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
