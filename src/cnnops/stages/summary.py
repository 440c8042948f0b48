"""`cnnops summary`: the lecture's memory table for a model at an input size, before training it.

Per layer: output shape, parameters, activation memory and multiply-accumulates an image; totals,
and the estimated peak training memory for the batch size, precision and optimizer train would
use, with the largest batch that fits this machine (or `--memory-gib`). What it does not get on the
command line comes from params.yaml and, when present, the prepared train split (class count,
colour mode, size), so it describes the run `cnnops train` would start. Networks are built without
pretrained weights: nothing is read from TORCH_HOME, nothing downloaded.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnops import atomic
from cnnops.cli import positive_int
from cnnops.config import Params
from cnnops.data.splits import PreparedSplit, split_files
from cnnops.errors import ConfigError
from cnnops.models import create_classifier, default_spec
from cnnops.stages.paths import add_path_arguments, path_arg, paths_from_args
from cnnops.training import summary as table
from cnnops.training.summary import Budget, ModelSummary, TrainingMemory


@dataclass(frozen=True)
class SummaryPaths:
    prepared: Path = path_arg(
        "prepared", "prepare's output folder: class count, colour mode and size, if there"
    )
    out: Path | None = path_arg(None, "also write the Markdown table to this file")


@dataclass(frozen=True)
class SummaryRequest:
    """What the command line overrides; None: what train would use."""

    model: str | None = None  # train.model
    input_size: tuple[int, int] | None = None  # train.input_size, else the prepared (or prepare) size
    color_mode: str | None = None  # the prepared split's, else data.color_mode
    classes: int | None = None  # the prepared split's
    batch_size: int | None = None  # train.batch_size (auto: the largest that fits this machine)
    precision: str | None = None  # train.amp on this machine's device (fp32 on CPU)
    memory_gib: float | None = None  # the memory the largest batch must fit; None: this machine's
    depth: int | None = None  # rows: modules at this depth; None: every leaf layer


@dataclass(frozen=True)
class SummaryResult:
    summary: ModelSummary
    memory: TrainingMemory
    budget: Budget
    markdown: str


def run(
    params: Params, paths: SummaryPaths = SummaryPaths(), request: SummaryRequest = SummaryRequest()
) -> SummaryResult:
    """Build the model as train would (random weights) and summarise it; write `paths.out` if set."""
    t = params.train
    split = _train_split(paths.prepared)
    classes = request.classes or (len(split.class_names) if split else None)
    if classes is None:
        raise ConfigError(
            f"summary: no prepared split at {split_files(paths.prepared, 'train')[0]} to count the classes; "
            "give --classes N (the head's outputs, e.g. 1000 for ImageNet) or run `cnnops prepare`"
        )
    color_mode = request.color_mode or (split.color_mode if split else params.data.color_mode)
    size = request.input_size or t.input_size or (split.image_size if split else params.prepare.image_size)
    spec = default_spec(
        request.model or t.model, [f"class {i}" for i in range(classes)], color_mode, tuple(size)
    )
    model = create_classifier(spec, check_input=True)
    if t.mode == "linear_probe":
        model.freeze_backbone()
    summary = table.summarize(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = _budget(request.memory_gib, device, t.memory_fraction)
    precision = request.precision or table.configured_precision(t.amp, device)
    memory = table.training_memory(summary, 1, precision, t.optimizer, t.momentum)
    batch = request.batch_size or t.batch_size
    if batch == "auto":
        cap = min(t.auto_batch_max, len(split)) if split else t.auto_batch_max
        batch = table.fit_batch(summary, memory, budget, auto=True, cap=cap)
    memory = memory.at(batch)
    markdown = table.render(summary, memory, request.depth, budget)
    if paths.out is not None:
        atomic.write_text(paths.out, markdown)
    return SummaryResult(summary, memory, budget, markdown)


def _train_split(prepared: Path) -> PreparedSplit | None:
    """The prepared train split when prepare has run (its header only: the images stay mapped)."""
    return (
        PreparedSplit.load(prepared, "train")
        if all(p.exists() for p in split_files(prepared, "train"))
        else None
    )


def _budget(memory_gib: float | None, device: torch.device, fraction: float) -> Budget:
    if memory_gib is None:
        return table.device_budget(device, fraction)
    return Budget("given by --memory-gib", int(memory_gib * 2**30), fraction, gpu=True)


def _size_arg(text: str) -> tuple[int, int]:
    """--input-size 224 or 224x160 (height x width)."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and 8 <= int(p) <= 4096 for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a side or HxW, each 8 to 4096 (e.g. 224 or 224x160)"
        )
    return (int(parts[0]), int(parts[-1]))


def _gib(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1e6:
        raise argparse.ArgumentTypeError(f"{text} GiB: give a size above 0 (e.g. 24 for a 24 GB GPU)")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "summary",
        help="per-layer shapes, parameters, memory and MACs; training memory and the batch that fits",
    )
    add_path_arguments(p, SummaryPaths)
    p.add_argument("--model", help="a model name (default: train.model)")
    p.add_argument("--input-size", type=_size_arg, help="H or HxW (default: train's input size)")
    p.add_argument(
        "--color-mode", choices=("RGB", "L"), help="default: the prepared split's, else data.color_mode"
    )
    p.add_argument(
        "--classes", type=positive_int, help="head outputs (default: the prepared split's classes)"
    )
    p.add_argument("--batch-size", type=positive_int, help="default: train.batch_size")
    p.add_argument("--precision", choices=tuple(table.PRECISIONS), help="default: train.amp on this machine")
    p.add_argument(
        "--memory-gib", type=_gib, help="device memory for the largest batch (default: this machine's)"
    )
    p.add_argument("--depth", type=int, help="rows: the modules at this depth (0: the network's children)")
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    fields = (
        "model",
        "input_size",
        "color_mode",
        "classes",
        "batch_size",
        "precision",
        "memory_gib",
        "depth",
    )
    request = SummaryRequest(**{name: getattr(args, name) for name in fields})
    result = run(params, paths_from_args(SummaryPaths, args), request)
    sys.stdout.write(result.markdown)
    return 0
