"""Training throughput of `cnnops train` against a plain loop; prepared tensors against ImageFolder.

1. The same model, batch, data and optimizer, trained by
   - a plain hand-written loop (tensors in memory, randperm batches, forward/backward/AdamW step),
   - cnnops' loop (`engine.train_one_epoch` fed by the stage's DataLoader, presets and schedule),
   - the whole `train` stage (`train.run`, which also validates, checkpoints and logs to MLflow each
     epoch; its report's train_seconds),
   alternating the first two epoch by epoch so machine load hits both alike. Target: cnnops' loop at
   most 5% slower than the plain loop.
2. One pass over all images via the prepared, memory-mapped uint8 splits (`PreparedSplit.load` + DataLoader)
   against torchvision's ImageFolder decoding each PNG with PIL. Target: at least 3x faster.

Not a test: timings depend on the machine and its load; only ratios from the same run mean anything.

    .venv/bin/python benchmarks/train_throughput.py --data data --epochs 4 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from figures import add_json_argument, row, write_json
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from cnnops.config import parse_params
from cnnops.data.example import write_digits
from cnnops.data.loaders import SplitDataset, eval_loader, train_loader
from cnnops.data.splits import PreparedSplit
from cnnops.data.transforms import EvalPreset, TrainPreset
from cnnops.models import create_classifier, default_spec
from cnnops.stages import prepare, train
from cnnops.training.engine import LoopSettings, train_one_epoch
from cnnops.training.optim import build_optimizer, build_scheduler


def plain_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer, batch: int) -> None:
    """The baseline: what one would write by hand around the same model and optimizer."""
    model.train()
    order = torch.randperm(len(labels))
    for start in range(0, len(order) - batch + 1, batch):
        index = order[start : start + batch]
        loss = nn.functional.cross_entropy(model(images[index].float().div_(255)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def loop_ratio(split: PreparedSplit, params, epochs: int) -> tuple[float, float]:
    """Images per second of the plain loop and of cnnops' loop, epochs interleaved."""
    t = params.train
    spec = default_spec(t.model, split.class_names, split.color_mode, split.image_size)
    torch.manual_seed(0)
    plain_model, cnnops_model = create_classifier(spec), create_classifier(spec)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    optimizer = build_optimizer(
        cnnops_model, name="adamw", lr=t.lr, backbone_lr=t.lr, weight_decay=t.weight_decay, momentum=0.0
    )
    loader = train_loader(
        SplitDataset(split, TrainPreset(t.augment, split.image_size, split.color_mode)),
        batch_size=t.batch_size,
        seed=0,
    )
    scheduler = build_scheduler(optimizer, warmup_steps=len(loader), total_steps=(epochs + 1) * len(loader))
    settings = LoopSettings(torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    images_per_epoch = (len(split) // t.batch_size) * t.batch_size
    plain_times, cnnops_times = [], []
    for epoch in range(epochs + 1):  # epoch 0 warms up both
        started = time.perf_counter()
        plain_epoch(plain_model, split.images, split.labels, plain_opt, t.batch_size)
        plain = time.perf_counter() - started
        loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train_one_epoch(cnnops_model, criterion, optimizer, scheduler, loader, settings, scaler=scaler)
        ours = time.perf_counter() - started
        if epoch:
            plain_times.append(plain)
            cnnops_times.append(ours)
    return images_per_epoch / statistics.median(plain_times), images_per_epoch / statistics.median(
        cnnops_times
    )


def loading_ratio(data: Path, prepared: Path, color_mode: str, size: tuple[int, int]) -> tuple[float, float]:
    """Seconds for one pass over every image: ImageFolder with PIL decoding, then prepared tensors."""
    to_mode = v2.Grayscale() if color_mode == "L" else v2.RGB()
    steps = [
        v2.PILToTensor(),
        to_mode,
        v2.Resize(size, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ]
    pil = datasets.ImageFolder(str(data), transform=v2.Compose(steps))
    started = time.perf_counter()
    for _ in DataLoader(pil, batch_size=256):
        pass
    folder_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for name in ("train", "val", "test"):
        for images, _ in eval_loader(
            SplitDataset(PreparedSplit.load(prepared, name), EvalPreset()), batch_size=256
        ):
            images.float().div_(255)  # what the loop does on the device, for a like-for-like pass
    return folder_seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="ImageFolder root (default: the digits example)"
    )
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = args.data or root / "data"
        if args.data is None:
            write_digits(data)
        params = parse_params(
            {
                "data": {"color_mode": "L"},
                "train": {
                    "epochs": args.epochs,
                    "batch_size": 32,
                    "label_smoothing": 0.0,
                    "early_stopping_patience": None,
                    "augment": {"random_resized_crop": False},
                },
                "tracking": {
                    "uri": f"sqlite:///{root / 'mlflow.db'}",
                    "artifact_location": str(root / "art"),
                },
            }
        )
        prepare.run(params, prepare.PreparePaths(data, root / "prepared", root / "prepare.json"))
        split = PreparedSplit.load(root / "prepared", "train")
        plain, ours = loop_ratio(split, params, args.epochs)
        batch = params.train.batch_size
        print(f"training: {len(split)} images {split.image_size}, batch {batch}, {args.epochs} epochs")
        print(f"  plain loop          {plain:8.0f} images/s")
        print(
            f"  cnnops loop         {ours:8.0f} images/s   overhead {plain / ours - 1:+.1%} (target <= +5%)"
        )
        started = time.perf_counter()
        result = train.run(params, train.TrainPaths(
            prepared=root / "prepared", model=root / "m.pt", report=root / "r.json",
            history=root / "h.csv", curves=root / "h.png", state=root / "state.pt"))  # fmt: skip
        stage = (
            result.report["epochs_run"] * (len(split) // params.train.batch_size) * params.train.batch_size
        )
        print(
            f"  cnnops train stage  {stage / result.report['train_seconds']:8.0f} images/s   "
            f"(+ validation, checkpoint, MLflow each epoch; {time.perf_counter() - started:.1f}s total)"
        )
        folder, tensors = loading_ratio(data, root / "prepared", "L", params.prepare.image_size)
        print("loading every image once")
        print(f"  ImageFolder + PIL   {folder:8.3f} s")
        print(f"  prepared tensors    {tensors:8.3f} s   {folder / tensors:.1f}x faster (target >= 3x)")
        what = f"{len(split)} train images {split.image_size}, batch {batch}"
        write_json(
            args.json,
            [
                row(
                    "train_throughput", f"cnnops training loop, {what}", f"{ours:.0f} img/s",
                    f"plain PyTorch loop {plain:.0f} img/s", ours / plain, ">= 0.952x (overhead <= 5%)",
                    plain / ours - 1 <= 0.05,
                ),
                row(
                    "train_throughput", "one pass over every image: prepared uint8 tensors",
                    f"{tensors:.3f} s", f"ImageFolder + PIL decoding {folder:.3f} s", folder / tensors,
                    ">= 3x", folder / tensors >= 3,
                ),
            ],
        )  # fmt: skip


if __name__ == "__main__":
    main()
