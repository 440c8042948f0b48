"""The audit at lab scale: memory bounded by the audited images, never by a split's size, and batches
that change no figure.

A lab's splits are memory-mapped (100k photos) and read a batch at a time. Here a split's images are
`Watched`: they can only be indexed, so a whole-split copy (`floats()`, `.float()`, `torch.stack`)
fails by construction, and the largest read is recorded. Torch's CPU allocations are counted from
the profiler's memory events (tracemalloc does not see them), numpy's with tracemalloc.
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Callable

import numpy as np
import torch
from fixtures_model import one_thread
from torch.profiler import ProfilerActivity, profile

from cnnops.audit import evidence, gallery
from cnnops.audit.regions import candidate_regions
from cnnops.audit.saliency import saliency
from cnnops.config import parse_params
from cnnops.data.splits import PreparedSplit
from cnnops.models import create_classifier, default_spec
from cnnops.stages import audit

CLASSES = ["a", "b", "c", "d"]


class Enough(Exception):
    """Raised by a forward hook to end a long run once the memory to measure has been allocated."""


def torch_peak(fn: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator while `fn` runs, above what it held before: the
    running sum of the profiler's memory events (allocations and frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, contextlib.suppress(Enough):
        fn()
    events = prof.profiler.kineto_results.events()
    held = np.cumsum(
        [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()) if e.name() == "[memory]"]
    )
    return int(held.max(initial=0))


class Watched:
    """uint8 images that can only be indexed, as a memory-mapped split is read; records the most
    images one read returned. Anything else (`.float()`, `torch.stack`, `.numpy()`) raises."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.largest = images, 0
        self.dtype, self.ndim, self.shape = images.dtype, images.ndim, images.shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: object) -> torch.Tensor:
        out = self.images[index]
        self.largest = max(self.largest, len(out) if out.ndim == 4 else 1)
        return out


def _split(n: int, seed: int) -> PreparedSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % len(CLASSES)
    return PreparedSplit(Watched(images), labels, [f"{i}.png" for i in range(n)], CLASSES, "L")  # type: ignore[arg-type]


def _convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_classifier(default_spec("convnet", CLASSES, "L", (32, 32))).eval()


def _audit_peaks(n: int) -> tuple[int, int]:
    """torch's and numpy's peaks while the audit examines a test and a train split of `n` images each,
    6 a class audited; checks what it read and what it reports."""
    a = parse_params(
        {"audit": {"methods": ["gradcam", "gradcam++"], "max_images_per_class": 6, "batch_size": 8,
                   "gallery_images_per_class": 2}},
        "memory test",
    ).audit  # fmt: skip
    model, test, train = _convnet(), _split(n, 0), _split(n, 1)
    with one_thread():
        tracemalloc.start()
        report, shown = audit.examine(model, test, train, None, a, None)
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        torch_held = torch_peak(lambda: audit.examine(model, test, train, None, a, None))
    assert test.images.largest == len(CLASSES) * 6 and train.images.largest == 8  # the subset, a batch
    assert report.n_images == 24 and all(f.n_correct + f.n_errors == 6 for f in report.classes.values())
    overlays = [[f for f, _, _ in v if not f.startswith(gallery.PATCH)] for v in shown.values()]
    assert [len(v) for v in overlays] == [2] * len(CLASSES)  # then any recurring patch's exemplars
    return torch_held, numpy_peak


def test_a_large_split_is_read_in_batches_and_memory_does_not_grow_with_it() -> None:
    """The same torch peak for 1000 images as for 4000; numpy adds only the probe's 9 features an
    image, far less than an image (1024 bytes here)."""
    (torch_small, numpy_small), (torch_large, numpy_large) = _audit_peaks(1000), _audit_peaks(4000)
    assert torch_large <= torch_small * 1.05, (torch_small, torch_large)
    assert numpy_large - numpy_small < 3000 * 32 * 32 / 4, (numpy_small, numpy_large)


def test_batch_size_and_uint8_images_change_no_figure() -> None:
    """Every test of a class, its interventions a few images at a time from uint8, against all of
    them in one batch from floats."""
    model, g = _convnet(), torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8, generator=g)
    preds = evidence.predict_proba(model, images, 64).argmax(1).numpy()
    labels = np.where(np.arange(40) % 9 == 0, (preds + 1) % len(CLASSES), preds)  # a few errors
    maps = np.random.default_rng(0).random((40, 32, 32), dtype=np.float32)
    objects, annotated = maps > 0.3, np.zeros(40, dtype=bool)
    regions = candidate_regions(32, 32, 0.1, 0.3)

    def figures(x: torch.Tensor, batch_size: int) -> list[object]:
        batch = evidence.Batch(x, evidence.mean_image(x, batch_size), labels, preds, maps, objects, annotated)
        rng = np.random.default_rng(0)
        return [
            evidence.class_figures(
                model,
                batch,
                c,
                top_fraction=0.05,
                regions=regions,
                max_images=8,
                batch_size=batch_size,
                rng=rng,
            )
            for c in range(len(CLASSES))
        ]

    with one_thread():
        assert figures(images, 3) == figures(images.float() / 255, 64)


def test_score_cam_on_resnet18_at_224_px_holds_one_batch_of_masked_images() -> None:
    """2 images a class through ResNet-18's 512 channels: made at once, the masked images alone take
    1.2 GB (the first version of the audit peaked at 2.9 GB here). A whole run is 2048 forwards at
    224 px, minutes on a CPU, so it stops after three masked batches: made at once, every masked
    image would exist by then."""
    torch.manual_seed(0)
    model = create_classifier(default_spec("resnet18", ["a", "b"], "RGB", (224, 224))).eval()
    batches: list[int] = []

    def count(_m: torch.nn.Module, args: tuple[torch.Tensor]) -> None:
        batches.append(len(args[0]))
        if len(batches) == 5:  # the layer search, the images' own forward, three masked batches
            raise Enough

    model.register_forward_pre_hook(count)  # saliency's copy of the model keeps it
    x = torch.rand(4, 3, 224, 224)
    with one_thread():
        held = torch_peak(
            lambda: saliency(model, x, torch.tensor([0, 0, 1, 1]), method="scorecam", batch_size=4)
        )
    assert batches == [1, 4, 4, 4, 4]
    at_once = 4 * 512 * x[0].numel() * 4  # bytes of every masked image, float32
    assert held < at_once / 5, held
