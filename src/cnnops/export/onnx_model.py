"""The ONNX model contract: export a Classifier, describe it in metadata_props, run it with ONNX Runtime.

An exported model is self-describing: its input is float32 NCHW in [0, 1] with a dynamic batch axis,
normalisation is inside the graph, and metadata_props say how to feed it (`input_size`,
`color_mode`), how to read it (`class_names`, `output`, the calibration `temperature` its logits
were divided by inside the graph) and where it came from (MLflow run, git commit, data
version). `predict` and `release` need nothing but the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cnnops.config import MAX_CLASSES, MAX_IMAGE_SIDE
from cnnops.errors import ExportError, StageInputError
from cnnops.models import CHANNELS

INPUT_NAME = "image"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
OutputKind = Literal["logits", "probabilities"]
MAX_CLASS_NAME = 255  # characters: the longest folder name a filesystem allows
MAX_TEMPERATURE = 1000.0  # calibration.TEMPERATURE_RANGE lies well inside (0, this]


@dataclass(frozen=True)
class OnnxMetadata:
    """The metadata_props of every cnnops ONNX file; lists and sizes are stored as JSON strings."""

    class_names: list[str]
    input_size: tuple[int, int]  # (H, W)
    color_mode: str  # "RGB" or "L"
    output: OutputKind
    model: str  # architecture name, e.g. convnet or resnet18
    mlflow_run_id: str
    git_commit: str
    data_version: str
    compression: str = "none"  # none, int8 or fp16
    # (H, W) a picture is resized to (covering, aspect kept) and centre-cropped at before the centre
    # crop to input_size: the prepared size of the images it trained on; equal to input_size by default
    resize_size: tuple[int, int] | None = None
    # the graph divides the logits by this before its output (temperature scaling fitted by
    # `cnnops evaluate` on the validation split): probabilities are calibrated, the argmax unchanged
    temperature: float = 1.0
    # (low, high) of high-bit images mapped onto 0..255 (params `data.window`); None: full range
    window: tuple[float, float] | None = None

    @property
    def prepared_size(self) -> tuple[int, int]:
        return self.resize_size or self.input_size

    @property
    def channels(self) -> int:
        return CHANNELS[self.color_mode]

    def to_props(self) -> dict[str, str]:
        props = asdict(self)
        props["resize_size"] = props["resize_size"] or props["input_size"]
        props["temperature"] = repr(float(self.temperature))  # repr round-trips the float exactly
        props["window"] = json.dumps(None if self.window is None else [float(v) for v in self.window])
        return {k: v if isinstance(v, str) else json.dumps(list(v)) for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> OnnxMetadata:
        """The metadata of a file, every value checked: a foreign or edited file is refused by key."""
        optional = ("compression", "resize_size", "temperature", "window")  # absent from older cnnops files
        missing = [name for name in cls.__dataclass_fields__ if name not in props and name not in optional]
        if missing:
            raise StageInputError(
                f"{source}: metadata_props lack {', '.join(missing)}; it was not exported by `cnnops export` "
                "(re-export it with `cnnops export`)"
            )
        meta = cls(
            class_names=_class_names(_json_prop(props, "class_names", source), source),
            input_size=_input_size(_json_prop(props, "input_size", source), source),
            color_mode=props["color_mode"],
            output=props["output"],  # type: ignore[arg-type]
            model=props["model"],
            mlflow_run_id=props["mlflow_run_id"],
            git_commit=props["git_commit"],
            data_version=props["data_version"],
            compression=props.get("compression", "none"),
            resize_size=_resize_size(props, source),
            temperature=_temperature(props, source),
            window=_window(props, source),
        )
        if meta.color_mode not in CHANNELS or meta.output not in ("logits", "probabilities"):
            raise StageInputError(
                f"{source}: metadata color_mode={meta.color_mode[:40]!r} output={meta.output[:40]!r}; "
                "expected RGB|L and logits|probabilities"
            )
        return meta


def _refused(source: str, key: str, value: object, expected: str) -> StageInputError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return StageInputError(
        f"{source}: metadata_props {key} is {shown}, expected {expected}; "
        "it was not written by `cnnops export` or was edited since (re-export it with `cnnops export`)"
    )


def _json_prop(props: dict[str, str], key: str, source: str) -> object:
    try:
        return json.loads(props[key])
    except ValueError:
        raise _refused(source, key, props[key], "a JSON list") from None


def _input_size(value: object, source: str, key: str = "input_size") -> tuple[int, int]:
    """[height, width], bounded: the size predict resizes every image to and allocates per batch."""
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(type(side) is int and 1 <= side <= MAX_IMAGE_SIDE for side in value)
    ):
        raise _refused(source, key, value, f"[height, width] with each side an int in 1..{MAX_IMAGE_SIDE}")
    return value[0], value[1]


def _resize_size(props: dict[str, str], source: str) -> tuple[int, int] | None:
    """resize_size, bounded like input_size and never smaller than it (the crop comes out of it)."""
    if "resize_size" not in props:
        return None
    size = _input_size(_json_prop(props, "resize_size", source), source, "resize_size")
    crop = _input_size(_json_prop(props, "input_size", source), source)
    if size[0] < crop[0] or size[1] < crop[1]:
        raise _refused(source, "resize_size", list(size), f"at least input_size {list(crop)}")
    return None if size == crop else size  # no crop: the file reads as it was written


def _temperature(props: dict[str, str], source: str) -> float:
    """The calibration temperature: a finite float in (0, MAX_TEMPERATURE]; 1 in older files."""
    text = props.get("temperature", "1.0")
    try:
        value = float(text[:40])
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= MAX_TEMPERATURE:  # `not` also refuses NaN
        raise _refused(source, "temperature", text, f"a number in (0, {MAX_TEMPERATURE:g}]")
    return value


def _window(props: dict[str, str], source: str) -> tuple[float, float] | None:
    """The high-bit window: null or [low, high], finite and rising; absent from older files."""
    if props.get("window", "null") == "null":
        return None
    value = _json_prop(props, "window", source)
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(type(v) in (int, float) and math.isfinite(v) for v in value)
        and value[0] < value[1]
    ):
        raise _refused(source, "window", value, "null or [low, high] with low < high, both finite")
    return float(value[0]), float(value[1])


def _class_names(value: object, source: str) -> list[str]:
    if not (
        isinstance(value, list)
        and 0 < len(value) <= MAX_CLASSES
        and all(isinstance(name, str) and 0 < len(name) <= MAX_CLASS_NAME for name in value)
    ):
        raise _refused(
            source,
            "class_names",
            value,
            f"a list of 1..{MAX_CLASSES} names of 1..{MAX_CLASS_NAME} characters",
        )
    if len(set(value)) != len(value):
        raise _refused(source, "class_names", value, "distinct names")
    return list(value)


def check_graph(graph: onnx.GraphProto, meta: OnnxMetadata, source: str) -> None:
    """The graph takes what the metadata says and gives one score per class name: float32
    [batch, channels, H, W] in, float32 [batch, classes] out (the batch axis may be symbolic)."""
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or not graph.output:
        raise StageInputError(
            f"{source}: the graph has {len(inputs)} input(s) and {len(graph.output)} output(s); a cnnops "
            "classifier has one image input and a score output (re-export it with `cnnops export`)"
        )
    _check_tensor(inputs[0], (meta.channels, *meta.input_size), "input", "color_mode and input_size", source)
    _check_tensor(graph.output[0], (len(meta.class_names),), "output", "class_names", source)


def _check_tensor(
    value: onnx.ValueInfoProto, expected: tuple[int, ...], role: str, keys: str, source: str
) -> None:
    tensor = value.type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)  # UNDEFINED when not a tensor
        raise StageInputError(
            f"{source}: the graph's {role} {value.name[:80]!r} is {kind}, but cnnops feeds and reads "
            "float32; it is not a cnnops classifier (re-export it with `cnnops export`)"
        )
    dims = [d.dim_value if d.HasField("dim_value") else "?" for d in tensor.shape.dim]
    if not tensor.HasField("shape") or dims[1:] != list(expected):
        shape = f"[{', '.join(map(str, dims))}]" if tensor.HasField("shape") else "undeclared"
        raise StageInputError(
            f"{source}: the graph's {role} {value.name[:80]!r} has shape {shape}, but metadata_props {keys} "
            f"say [batch, {', '.join(map(str, expected))}]; the metadata does not describe this graph "
            "(re-export it with `cnnops export`)"
        )


def set_metadata(proto: onnx.ModelProto, metadata: OnnxMetadata) -> None:
    """Write the cnnops keys into metadata_props, replacing any earlier values and keeping other keys."""
    props = metadata.to_props()
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def read_metadata(path: str | Path) -> OnnxMetadata:
    """The file's metadata, checked against its graph (a file is untrusted: foreign, edited, mismatched)."""
    proto = load_proto(path)
    meta = OnnxMetadata.from_props({p.key: p.value for p in proto.metadata_props}, str(path))
    check_graph(proto.graph, meta, str(path))
    return meta


def load_proto(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{path}: ONNX model not found; run `cnnops export` (or `dvc repro export`)")
    try:
        return onnx.load(path)
    except Exception as exc:  # onnx raises protobuf's DecodeError and others for non-ONNX bytes
        raise StageInputError(
            f"{path}: not a readable ONNX model ({exc}); re-export it with `cnnops export`"
        ) from None


class Tempered(nn.Module):
    """Logits divided by a fixed temperature: temperature scaling as one node of the graph."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


def with_output(model: nn.Module, output: OutputKind, temperature: float = 1.0) -> nn.Module:
    """The module whose outputs the graph holds: the Classifier (its logits divided by
    `temperature` unless it is 1), followed by softmax for probabilities."""
    parts = [model] if temperature == 1.0 else [model, Tempered(temperature)]
    if output == "probabilities":
        parts.append(nn.Softmax(dim=1))
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def export_classifier(model: nn.Module, path: str | Path, *, opset: int, metadata: OnnxMetadata) -> None:
    """Export `model` (a Classifier in eval mode) to a single checked ONNX file with a dynamic batch axis."""
    graph = with_output(model, metadata.output, metadata.temperature).eval()
    # A batch of 2: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.zeros(2, metadata.channels, *metadata.input_size)
    try:
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[metadata.output],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types (torch._dynamo, onnxscript, ...)
        raise ExportError(
            f"torch.onnx.export failed for model {metadata.model!r} at opset {opset}: {exc}; "
            "try another export.opset in params.yaml"
        ) from exc
    proto = program.model_proto
    set_metadata(proto, metadata)
    check_dynamic_batch(proto, str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"{path}: onnx.checker rejected the exported graph at opset {opset}: {exc}"
        ) from exc
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, path)


def check_dynamic_batch(proto: onnx.ModelProto, source: str) -> None:
    """Fail if the exporter fixed the batch axis (pytorch/pytorch#157621) instead of leaving it symbolic."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise ExportError(
                f"{source}: the batch axis of {value.name!r} was fixed to {dim.dim_value} by the exporter; "
                "it must be dynamic. Try another export.opset or torch version"
            )


def best_provider() -> str:
    return available_providers()[-1]


def available_providers() -> list[str]:
    """CPU always; CUDA only when torch sees a GPU (asking ORT for CUDA without one logs load errors)."""
    return [CPU, CUDA] if torch.cuda.is_available() and CUDA in ort.get_available_providers() else [CPU]


def open_session(model: str | Path | bytes, provider: str = CPU, threads: int = 0) -> ort.InferenceSession:
    """An ORT session on `provider` (falling back to CPU); `threads` 0 lets ORT pick its intra-op count."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    source = model if isinstance(model, bytes) else str(model)
    providers = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # ORT's Fail, InvalidGraph, NotImplemented... derive from Exception only
        label = "the ONNX model" if isinstance(model, bytes) else str(model)
        raise StageInputError(
            f"{label}: ONNX Runtime cannot load it ({' '.join(str(exc).split())[:300]}); "
            "re-export it with `cnnops export`"
        ) from None


def infer(session: ort.InferenceSession, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run float32 NCHW [0, 1] images through the model in batches; returns the graph's outputs."""
    name = session.get_inputs()[0].name
    chunks = [
        session.run(None, {name: np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def check_parity(
    expected: np.ndarray, actual: np.ndarray, atol: float, source: str, output: OutputKind = "logits"
) -> dict[str, float]:
    """ORT against PyTorch on the test split; ExportError past the limits.

    Compared as probabilities, which are bounded whatever the logits' scale: a larger model's
    logits reach the tens, where float32 rounding alone passes a fixed 1e-4 on logits (measured:
    1.2e-4 on a correct ResNet-18 export). The argmax must agree wherever PyTorch's two top
    probabilities are further apart than `atol`: a closer tie may flip on rounding alone.
    """
    p, q = probabilities(expected, output), probabilities(actual, output)
    max_diff = float(np.abs(p - q).max()) if p.size else 0.0
    top2 = np.sort(p, axis=1)[:, -2:] if p.shape[-1] > 1 else np.zeros((len(p), 2))
    decided = (top2[:, 1] - top2[:, 0]) > atol
    agree = p.argmax(1) == q.argmax(1)
    agreement = float(agree[decided].mean()) if decided.any() else 1.0
    if not max_diff <= atol or agreement < 1.0:  # `not <=` also catches NaN
        raise ExportError(
            f"{source}: ONNX Runtime differs from PyTorch on the test split: max abs difference of the "
            f"probabilities {max_diff:.3g} (limit export.parity_atol = {atol:g}), argmax agreement "
            f"{agreement:.2%} (must be 100% outside near ties) over {len(expected)} images; try another "
            "export.opset, or raise export.parity_atol if the model is numerically sensitive"
        )
    raw = float(np.abs(expected - actual).max()) if expected.size else 0.0
    return {
        "images": len(expected),
        "max_abs_diff": max_diff,
        "max_abs_output_diff": raw,  # of the graph's own output (logits or probabilities), for the record
        "argmax_agreement": agreement,
        "near_ties": int((~decided).sum()),
        "atol": atol,
    }


def probabilities(outputs: np.ndarray, output: OutputKind) -> np.ndarray:
    if output == "probabilities":
        return outputs
    return torch.softmax(torch.from_numpy(outputs), dim=1).numpy()
