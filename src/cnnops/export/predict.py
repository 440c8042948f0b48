"""`cnnops predict MODEL.onnx PATH...`: classify image files with nothing but the ONNX file.

Class names, input size, colour mode and output kind come from the model's metadata_props; each
image goes through the data contract (`images.load_tensor`), the same function `prepare` used
for training. A file that fails is reported by name and the others still get their prediction.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from cnnops.cli import positive_int, printable
from cnnops.config import MAX_BATCH, MAX_IMAGE_PIXELS
from cnnops.data.decode import DEFAULT_MAX_PIXELS, load_tensor
from cnnops.errors import CnnopsError
from cnnops.export.onnx_model import (
    OnnxMetadata,
    best_provider,
    infer,
    open_session,
    probabilities,
    read_metadata,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    confidence: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Failure:
    path: str
    error: str


def image_files(paths: Sequence[Path]) -> tuple[list[Path], list[Failure]]:
    """Files as given, and inside folders (recursively) those with an extension Pillow registers.

    A named file is always tried, whatever its extension; in a folder, other files (notes, CSVs)
    are skipped with a warning that names how many and which.
    """
    extensions = set(Image.registered_extensions())
    files: list[Path] = []
    failures: list[Failure] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            skipped = [p for p in found if p.suffix.lower() not in extensions]
            if skipped:
                names = ", ".join(str(p) for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
                log.warning(
                    "skipping %d file(s) in %s without an image extension: %s", len(skipped), path, names
                )
            files.extend(p for p in found if p.suffix.lower() in extensions)
        elif path.is_file():
            files.append(path)
        else:
            failures.append(Failure(str(path), f"{path}: no such file or folder"))
    return files, failures


def predict(
    model: Path, paths: Sequence[Path], *, batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[Prediction], list[Failure]]:
    """Predictions for every readable image under `paths`, and a Failure for each file that was not."""
    meta = read_metadata(model)
    session = open_session(model, best_provider())
    files, failures = image_files(paths)
    results = classify(session, meta, files, batch_size=batch_size, max_pixels=max_pixels)
    failures += [r for r in results if isinstance(r, Failure)]
    return [r for r in results if isinstance(r, Prediction)], failures


def classify(
    session: ort.InferenceSession,
    meta: OnnxMetadata,
    files: Sequence[Path],
    *,
    batch_size: int,
    max_pixels: int,
) -> list[Prediction | Failure]:
    """One result per file, in order, with `batch_size` images in memory at a time: what both
    `cnnops predict` and `cnnops serve` answer, so a served model gets the pixels predict feeds it."""
    results: dict[int, Prediction | Failure] = {}
    for start in range(0, len(files), batch_size):
        loaded: dict[int, torch.Tensor] = {}
        for index, path in enumerate(files[start : start + batch_size], start):
            try:
                loaded[index] = model_input(path, meta, max_pixels)
            except CnnopsError as exc:
                results[index] = Failure(str(path), str(exc))
        if not loaded:
            continue
        images = torch.stack(list(loaded.values())).float().div_(255.0).numpy()
        probs = probabilities(infer(session, images, batch_size), meta.output)
        for index, row in zip(loaded, probs, strict=True):
            best = int(np.argmax(row))
            results[index] = Prediction(
                path=str(files[index]),
                label=meta.class_names[best],
                confidence=float(row[best]),
                probabilities={name: float(p) for name, p in zip(meta.class_names, row, strict=True)},
            )
    return [results[index] for index in range(len(files))]


def model_input(path: Path, meta: OnnxMetadata, max_pixels: int) -> torch.Tensor:
    """The uint8 CHW pixels the model gets for one file: prepare's geometry (cover and centre-crop
    at the prepared size), then evaluation's centre crop to the input, the very pixels the model
    was evaluated on."""
    image = load_tensor(
        path,
        color_mode=meta.color_mode,
        size=meta.prepared_size,
        max_pixels=max_pixels,
        window=meta.window,
    )
    return F.center_crop(image, list(meta.input_size))


def write_json(predictions: list[Prediction], failures: list[Failure], stream: TextIO) -> None:
    payload = {
        "predictions": [
            {"path": p.path, "class": p.label, "confidence": p.confidence, "probabilities": p.probabilities}
            for p in predictions
        ],
        "errors": [{"path": f.path, "error": f.error} for f in failures],
    }
    json.dump(payload, stream, indent=2)
    stream.write("\n")


def write_csv(predictions: list[Prediction], class_names: list[str], stream: TextIO) -> None:
    writer = csv.writer(stream)
    writer.writerow(["path", "class", "confidence", *class_names])
    for p in predictions:
        writer.writerow(
            [p.path, p.label, f"{p.confidence:.6f}", *(f"{p.probabilities[c]:.6f}" for c in class_names)]
        )


def write_table(predictions: list[Prediction], top_k: int = 3) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("file", "class", "confidence", f"top {top_k}")
    for p in predictions:
        ranked = sorted(p.probabilities.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        top = "  ".join(f"{c} {v:.3f}" for c, v in ranked)
        # Paths and class names are user input: Text is never parsed as markup, printable() defuses escapes.
        table.add_row(
            Text(printable(p.path)), Text(printable(p.label)), f"{p.confidence:.3f}", Text(printable(top))
        )
    # Off a terminal (piped to a file) the table keeps whole paths on one line instead of wrapping at 80.
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def _bounded(limit: int) -> Callable[[str], int]:
    """An argparse type: a positive int up to `limit`, the bound params.yaml has for the same knob."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text} is more than {limit}")
        return value

    return parse


pixel_limit, batch_limit = _bounded(MAX_IMAGE_PIXELS), _bounded(MAX_BATCH)  # shared with serve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify images with an exported ONNX model", description=__doc__
    )
    parser.add_argument("model", type=Path, help="an ONNX file written by `cnnops export`")
    parser.add_argument("paths", type=Path, nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--batch-size", type=batch_limit, default=64, help="images per ONNX Runtime call")
    parser.add_argument(
        "--max-pixels",
        type=pixel_limit,
        default=DEFAULT_MAX_PIXELS,
        help=f"decompression-bomb limit (at most {MAX_IMAGE_PIXELS}, as data.max_image_pixels)",
    )
    parser.set_defaults(handler=_main, needs_params=False)


def _main(args: argparse.Namespace, _params: object) -> int:
    predictions, failures = predict(
        args.model, args.paths, batch_size=args.batch_size, max_pixels=args.max_pixels
    )
    if args.format == "json":
        write_json(predictions, failures, sys.stdout)
    elif args.format == "csv":
        write_csv(predictions, read_metadata(args.model).class_names, sys.stdout)
    else:
        write_table(predictions)
    for failure in failures:
        print(f"cnnops predict: error: {printable(failure.error)}", file=sys.stderr)
    if failures:
        print(
            f"cnnops predict: {len(failures)} of {len(predictions) + len(failures)} file(s) failed",
            file=sys.stderr,
        )
    return 1 if failures else 0
