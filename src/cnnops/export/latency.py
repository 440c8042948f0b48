"""Latency of ONNX Runtime beside PyTorch eager, measured in the same process on the same inputs.

Used by the export stage (reports/export.json) and by benchmarks/onnx_latency.py, so the figures
the pipeline records and the benchmark prints come from one method.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cnnops.export.onnx_model import CPU


def timings_ms(fns: list[Callable[[], object]], runs: int, warmup: int = 3) -> list[np.ndarray]:
    """Wall times of each fn over `runs` rounds, interleaved round by round so that a change in
    machine load (other processes) hits every engine alike instead of biasing the ratio."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = np.empty((len(fns), runs))
    for i in range(runs):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[j, i] = (time.perf_counter() - start) * 1000.0
    return list(times)


def compare(
    model: nn.Module,
    session: ort.InferenceSession,
    sample: torch.Tensor,
    *,
    provider: str = CPU,
    runs: int = 50,
    throughput_batch: int = 32,
) -> dict[str, float]:
    """Batch-1 p50/p95 and batch-N images/s of ORT and eager PyTorch on one device, with their ratios.

    `sample` is one CHW float image. Both sides include host-to-device copies and return host
    arrays, so on CUDA the comparison is end to end.
    """
    device = torch.device("cpu" if provider == CPU else "cuda")
    model = model.to(device).eval()
    name = session.get_inputs()[0].name

    @torch.inference_mode()
    def eager(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device)).cpu().numpy()

    ort, eager_figures = _profile(
        [lambda x: session.run(None, {name: x.numpy()}), eager], sample, runs, throughput_batch
    )
    result = {f"ort_{k}": v for k, v in ort.items()} | {f"torch_{k}": v for k, v in eager_figures.items()}
    result["speedup_batch1"] = result["torch_batch1_p50_ms"] / result["ort_batch1_p50_ms"]
    result["speedup_throughput"] = result["ort_images_per_s"] / result["torch_images_per_s"]
    model.to("cpu")
    return result


def compare_sessions(
    fp32: ort.InferenceSession,
    compressed: ort.InferenceSession,
    sample: torch.Tensor,
    *,
    runs: int = 50,
    throughput_batch: int = 32,
) -> dict[str, float]:
    """A compressed copy against its fp32 original, both in ONNX Runtime, timed like `compare`:
    batch-1 p50/p95 and batch-N images/s of each, interleaved, and the copy's speedups."""
    name = fp32.get_inputs()[0].name
    fns = [lambda x, s=s: s.run(None, {name: x.numpy()}) for s in (fp32, compressed)]
    base, small = _profile(fns, sample, runs, throughput_batch)
    result = {f"fp32_{k}": v for k, v in base.items()} | {f"compressed_{k}": v for k, v in small.items()}
    result["speedup_batch1"] = base["batch1_p50_ms"] / small["batch1_p50_ms"]
    result["speedup_throughput"] = small["images_per_s"] / base["images_per_s"]
    return result


def _profile(
    fns: list[Callable[[torch.Tensor], object]], sample: torch.Tensor, runs: int, throughput_batch: int
) -> list[dict[str, float]]:
    """Per engine: batch-1 p50 and p95 over `runs` rounds, images/s over a fifth of them (at least 5)."""
    one = sample.unsqueeze(0).contiguous()
    many = sample.unsqueeze(0).expand(throughput_batch, -1, -1, -1).contiguous()
    singles = timings_ms([lambda fn=fn: fn(one) for fn in fns], runs)
    batches = timings_ms([lambda fn=fn: fn(many) for fn in fns], max(5, runs // 5))
    return [
        {
            "batch1_p50_ms": float(np.percentile(single, 50)),
            "batch1_p95_ms": float(np.percentile(single, 95)),
            "images_per_s": throughput_batch * 1000.0 / float(np.median(batch)),
        }
        for single, batch in zip(singles, batches, strict=True)
    ]
