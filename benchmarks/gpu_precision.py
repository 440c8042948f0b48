"""AMP and channels_last against float32 on CUDA: training images/s of cnnops' own loop.

The same model (ResNet-18 at 224x224 RGB by default) trains on in-memory random images with
`engine.train_one_epoch` under four `LoopSettings`: float32, AMP (bf16 where the GPU supports it,
else fp16 with a gradient scaler, as `train.amp: auto` picks), channels_last, and both. Settings
take turns epoch by epoch, so a change of clock or load hits them alike; the figure is the median
epoch. No target is set by the issues: the ratios are what the hardware gives.

Without a CUDA device nothing is measured (AMP and channels_last are CUDA-only in `train`): the
script says so and writes no figures. `--device cpu` runs the same code on CPU, for checking it.

    .venv/bin/python benchmarks/gpu_precision.py --model resnet18 --size 224 --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from figures import add_json_argument, row, write_json
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnops.models import create_classifier, default_spec
from cnnops.training.engine import LoopSettings, train_one_epoch


def settings_under_test(device: torch.device) -> dict[str, LoopSettings]:
    """float32 and the three faster variants `train` uses on CUDA (see stages.train._loop_settings)."""
    amp = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return {
        "float32": LoopSettings(device),
        f"AMP {str(amp).removeprefix('torch.')}": LoopSettings(device, amp),
        "channels_last": LoopSettings(device, None, True),
        f"AMP {str(amp).removeprefix('torch.')} + channels_last": LoopSettings(device, amp, True),
    }


def images_per_second(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    classes = [str(i) for i in range(10)]
    images = torch.rand(args.batch * args.steps, 3, args.size, args.size)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 10, (len(images),))), batch_size=args.batch)
    runs = {}
    for name, settings in settings_under_test(device).items():
        torch.manual_seed(0)
        model = create_classifier(default_spec(args.model, classes, "RGB", (args.size, args.size)))
        model.to(
            device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler(device.type, enabled=settings.amp_dtype == torch.float16)
        runs[name] = (model, optimizer, scheduler, scaler, settings)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.rounds + 1):  # round 0 warms up (cuDNN autotuning, allocator)
        for name, (model, optimizer, scheduler, scaler, settings) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            train_one_epoch(model, criterion, optimizer, scheduler, loader, settings, scaler=scaler)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch:
                seconds[name].append(time.perf_counter() - started)
    return {name: len(images) / statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per setting")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the code only)")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: AMP and channels_last are CUDA-only, nothing measured")
        write_json(args.json, [])
        return
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    speeds = images_per_second(args, device)
    base = speeds["float32"]
    what = f"{args.model} {args.size}x{args.size} batch {args.batch}, {where}"
    print(f"training images/s, {what}")
    rows = []
    for name, speed in speeds.items():
        print(f"  {name:<28} {speed:8.1f} img/s   {speed / base:.2f}x float32")
        if name != "float32":
            rows.append(
                row(
                    "gpu_precision",
                    f"training throughput with {name}, {what}",
                    f"{speed:.1f} img/s",
                    f"float32 {base:.1f} img/s",
                    speed / base,
                )
            )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
