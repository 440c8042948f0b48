"""ONNX Runtime against PyTorch eager: latency and throughput measured in one run, printed as ratios.

For each model (the small ConvNet and ResNet-18 by default) and image size, this exports the
Classifier exactly as `cnnops export` does and times both engines with `cnnops.export.latency.compare`,
the function whose figures go to reports/export.json, on CPU and, when torch sees a GPU, CUDA.
Target: ORT at least 1.5x faster than eager PyTorch at batch 1 on CPU. Not a test: timings depend
on the machine and its load, so only ratios taken in the same run mean anything.

    .venv/bin/python benchmarks/onnx_latency.py --models convnet resnet18 --sizes 32 224 --runs 100
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from figures import add_json_argument, row, write_json

from cnnops.export.latency import compare
from cnnops.export.onnx_model import OnnxMetadata, available_providers, export_classifier, open_session
from cnnops.models import create_classifier, default_spec

TARGET = 1.5


def bench(model_name: str, size: int, color_mode: str, runs: int, batch: int, threads: int) -> list[dict]:
    classes = [str(i) for i in range(10)]
    torch.manual_seed(0)
    model = create_classifier(default_spec(model_name, classes, color_mode, (size, size))).eval()
    meta = OnnxMetadata(classes, (size, size), color_mode, "logits", model_name, "bench", "bench", "bench")
    sample = torch.rand(meta.channels, size, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_classifier(model, path, opset=18, metadata=meta)
        for provider in available_providers():
            figures = compare(
                model,
                open_session(path, provider, threads),
                sample,
                provider=provider,
                runs=runs,
                throughput_batch=batch,
            )
            rows.append({"model": model_name, "size": size, "provider": provider, **figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["convnet", "resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--color-mode", choices=("RGB", "L"), default="RGB")
    parser.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per engine")
    parser.add_argument("--batch", type=int, default=32, help="batch of the throughput figures")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads of both engines (0: defaults)"
    )
    add_json_argument(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"torch threads {torch.get_num_threads()}; target: ORT/eager batch-1 speedup >= {TARGET}x on CPU")
    header = f"{'model':<10} {'size':>4} {'engine':<5} {'ORT p50':>9} {'p95':>8} {'eager p50':>10} {'p95':>8}"
    print(header + f" {'b1 ratio':>9} {'ORT img/s':>10} {'eager img/s':>12} {'bN ratio':>9}")
    for model_name in args.models:
        for size in args.sizes:
            for r in bench(model_name, size, args.color_mode, args.runs, args.batch, args.threads):
                engine = "cpu" if r["provider"].startswith("CPU") else "cuda"
                mark = " <target" if engine == "cpu" and r["speedup_batch1"] < TARGET else ""
                print(
                    f"{r['model']:<10} {r['size']:>4} {engine:<5} {r['ort_batch1_p50_ms']:>7.2f}ms "
                    f"{r['ort_batch1_p95_ms']:>6.2f}ms {r['torch_batch1_p50_ms']:>8.2f}ms "
                    f"{r['torch_batch1_p95_ms']:>6.2f}ms {r['speedup_batch1']:>8.2f}x "
                    f"{r['ort_images_per_s']:>10.0f} {r['torch_images_per_s']:>12.0f} "
                    f"{r['speedup_throughput']:>8.2f}x{mark}"
                )
                rows += json_rows(r, engine, args.color_mode, args.batch)
    write_json(args.json, rows)


def json_rows(r: dict, engine: str, color_mode: str, batch: int) -> list[dict]:
    """Batch-1 latency (with the target on CPU) and batch-N throughput, as rows for benchmarks/run_all."""
    what = f"{r['model']} {r['size']}x{r['size']} {color_mode}, {engine.upper()}"
    target = TARGET if engine == "cpu" else None
    return [
        row(
            "onnx_latency",
            f"ONNX Runtime batch-1 latency p50, {what}",
            f"{r['ort_batch1_p50_ms']:.2f} ms",
            f"PyTorch eager {r['torch_batch1_p50_ms']:.2f} ms",
            r["speedup_batch1"],
            f">= {TARGET}x" if target else "",
            r["speedup_batch1"] >= target if target else None,
        ),
        row(
            "onnx_latency",
            f"ONNX Runtime throughput at batch {batch}, {what}",
            f"{r['ort_images_per_s']:.0f} img/s",
            f"PyTorch eager {r['torch_images_per_s']:.0f} img/s",
            r["speedup_throughput"],
        ),
    ]


if __name__ == "__main__":
    main()
