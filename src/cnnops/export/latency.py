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
    one = sample.unsqueeze(0).contiguous()
    many = sample.unsqueeze(0).expand(throughput_batch, -1, -1, -1).contiguous()
    one_np, many_np = one.numpy(), many.numpy()

    @torch.inference_mode()
    def eager(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device)).cpu().numpy()

    batch_runs = max(5, runs // 5)
    ort_1, torch_1 = timings_ms([lambda: session.run(None, {name: one_np}), lambda: eager(one)], runs)
    ort_n, torch_n = timings_ms([lambda: session.run(None, {name: many_np}), lambda: eager(many)], batch_runs)
    result = {
        "ort_batch1_p50_ms": float(np.percentile(ort_1, 50)),
        "ort_batch1_p95_ms": float(np.percentile(ort_1, 95)),
        "torch_batch1_p50_ms": float(np.percentile(torch_1, 50)),
        "torch_batch1_p95_ms": float(np.percentile(torch_1, 95)),
        "ort_images_per_s": throughput_batch * 1000.0 / float(np.median(ort_n)),
        "torch_images_per_s": throughput_batch * 1000.0 / float(np.median(torch_n)),
    }
    result["speedup_batch1"] = result["torch_batch1_p50_ms"] / result["ort_batch1_p50_ms"]
    result["speedup_throughput"] = result["ort_images_per_s"] / result["torch_images_per_s"]
    model.to("cpu")
    return result
