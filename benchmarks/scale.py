"""Lab scale: do validate and prepare keep memory flat and use every core as the data grows?

For each N (288-px JPEGs cut from scikit-image's colour photographs, `cnnops make-example --photos`):
1. `cnnops validate` and `cnnops prepare` (224 px RGB) as the pipeline runs them, start-up included:
   images/s against one process doing the same work per file (read, convert, sha256 and perceptual
   hash; prepare also resizes) measured beside them, and the peak resident anonymous memory of each
   command's process tree (heap and stacks; pages of memory-mapped files are not counted, as the
   kernel can drop them). Target: flat in N, under 2 GiB at every N.
2. Near-duplicate search on 100k perceptual hashes: multi-index hashing (`near_pairs`) against the
   blocked pairwise search it replaced, on the same hashes. Target: under 10 s.
3. Training input at 224 px: images/s of one epoch of the train DataLoader over the memory-mapped
   split against torchvision's ImageFolder decoding the same JPEGs with PIL, same transforms and
   workers.
4. The audit of a ResNet-50 at 224 px (random weights; the audit's cost does not depend on them):
   time and peak memory of `cnnops audit` with `--audit-per-class` images a class.

Not a test: timings depend on the machine and its load; only ratios from the same run mean anything.

    .venv/bin/python benchmarks/scale.py --sizes 2000 10000 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from figures import add_json_argument, row, write_json
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from cnnops.config import parse_params
from cnnops.data.decode import DEFAULT_MAX_PIXELS, to_tensor
from cnnops.data.example import write_photos
from cnnops.data.folder import scan_image_folder
from cnnops.data.loaders import SplitDataset, resolve_workers, train_loader
from cnnops.data.manifest import describe, near_pairs
from cnnops.data.splits import PreparedSplit
from cnnops.data.transforms import TrainPreset
from cnnops.models import create_classifier, default_spec, save_checkpoint

MEMORY_TARGET_MIB = 2048
SIZE = 224
STORED_SIDE = 288  # the JPEGs' side: larger than the 224 px prepare stores, as a lab's photos are
CLASSES = 4
PARAMS = {
    "data": {"color_mode": "RGB"},
    "prepare": {"image_size": [SIZE, SIZE]},
    "validate": {"max_imbalance_ratio": 10.0},
    "train": {"model": "resnet50", "batch_size": 32},
    "audit": {"methods": ["gradcam"]},
}


class PeakMemory:
    """Samples the resident anonymous memory (RssAnon) of a process and its children every 0.1 s.

    Written here because no library reports it for a process tree (psutil's rss counts the pages of
    memory-mapped files, which prepare and the later stages touch on purpose)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(OSError):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return pids

    @staticmethod
    def _anon_kib(pid: int) -> int:
        try:
            line = next(
                x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("RssAnon:")
            )
        except (OSError, StopIteration):
            return 0
        return int(line.split()[1])

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self.peak_kib = max(self.peak_kib, sum(self._anon_kib(p) for p in self._tree()))

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak_kib / 1024


def measured(command: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak MiB) of a command; fails loudly if the command does."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(proc.pid)
    _, stderr = proc.communicate()
    peak = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{stderr[-2000:]}")
    return time.perf_counter() - started, peak


def project(root: Path, photos: Path, n: int) -> Path:
    """A cnnops project whose data/ holds the first n / CLASSES photos of each class (hard links: no
    copy of the bytes)."""
    data = root / "data"
    files = [f for folder in sorted(photos.iterdir()) for f in sorted(folder.glob("*.jpg"))[: n // CLASSES]]
    for path in files:
        target = data / path.relative_to(photos)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return root


def decode_rate(data: Path, limit: int, resize: bool) -> float:
    """Images/s of one process doing a stage's work per file, as its pool workers do: the manifest
    entry (decode, convert, sha256, perceptual hash), and for prepare the resize to 224 px."""
    records = scan_image_folder(data).records[:limit]
    started = time.perf_counter()
    for record in records:
        _, image = describe(record, color_mode="RGB", max_pixels=DEFAULT_MAX_PIXELS)
        if resize:
            to_tensor(image, (SIZE, SIZE))
    return len(records) / (time.perf_counter() - started)


def stage_rows(root: Path, n: int, baselines: dict[str, float]) -> list[dict]:
    reports = root / "reports"
    validate = [
        "cnnops",
        "validate",
        "data",
        "--report",
        str(reports / "v.json"),
        "--docs",
        str(reports / "d"),
    ]
    prepare = [
        "cnnops",
        "prepare",
        "data",
        "--validation",
        str(reports / "v.json"),
        "--report",
        str(reports / "p.json"),
    ]
    rows = []
    for name, command in (("validate", validate), ("prepare", prepare)):
        seconds, peak = measured(command, root)
        rate, baseline = n / seconds, baselines[name]
        print(f"{name:9s} N={n:6d}: {rate:7.0f} img/s ({baseline:.0f} one process), peak {peak:7.0f} MiB")
        rows.append(
            row(
                "scale",
                f"{name} images/s, {n} JPEGs",
                f"{rate:.0f} img/s",
                f"one-process decode loop {baseline:.0f} img/s",
                rate / baseline,
            )
        )
        rows.append(
            row(
                "scale",
                f"{name} peak memory, {n} JPEGs",
                f"{peak:.0f} MiB",
                "",
                None,
                f"< {MEMORY_TARGET_MIB} MiB",
                peak < MEMORY_TARGET_MIB,
            )
        )
    return rows


def pairwise(hashes: np.ndarray, max_distance: int, block: int = 2048) -> int:
    """The search near_pairs replaced: every hash against every other, a block of rows at a time."""
    count = 0
    for start in range(0, len(hashes), block):
        distance = np.bitwise_count(hashes[start : start + block, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distance <= max_distance)
        count += int((cols > rows + start).sum())
    return count


def near_duplicate_rows(n: int, max_distance: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, n, dtype=np.uint64
    )
    near = rng.choice(n, n // 10, replace=False)  # a tenth are near copies of another hash
    hashes[near] = hashes[rng.integers(0, n, len(near))] ^ (
        np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64)
    )
    started = time.perf_counter()
    found = len(near_pairs(hashes, max_distance))
    ours = time.perf_counter() - started
    started = time.perf_counter()
    expected = pairwise(hashes, max_distance)
    theirs = time.perf_counter() - started
    assert found == expected, f"near_pairs found {found} pairs, the pairwise search {expected}"
    print(f"near duplicates on {n} hashes: {ours:.2f} s, pairwise {theirs:.1f} s ({found} pairs each)")
    return [
        row(
            "scale",
            f"near-duplicate search, {n} hashes (distance {max_distance})",
            f"{ours:.2f} s",
            f"pairwise search {theirs:.1f} s",
            theirs / ours,
            "< 10 s",
            ours < 10,
        )
    ]


def input_rows(root: Path, photos_n: int) -> list[dict]:
    """One epoch of training input at 224 px: the memory-mapped split against ImageFolder + PIL."""
    params = parse_params(PARAMS)
    augment = params.train.augment.model_copy(update={"random_resized_crop": True})
    workers = resolve_workers("auto")
    split = PreparedSplit.load(root / "prepared", "train")
    ours = train_loader(
        SplitDataset(split, TrainPreset(augment, (SIZE, SIZE), "RGB")),
        batch_size=32,
        seed=0,
        num_workers=workers,
    )
    crop = v2.RandomResizedCrop(SIZE, scale=augment.crop_scale, antialias=True)
    steps = v2.Compose(
        [
            v2.PILToTensor(),
            v2.RGB(),
            v2.Resize(SIZE, antialias=True),
            crop,
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    folder = DataLoader(
        datasets.ImageFolder(str(root / "data"), transform=steps),
        batch_size=32,
        shuffle=True,
        num_workers=workers,
    )
    rates = {}
    for name, loader in (("memory-mapped split", ours), ("ImageFolder + PIL", folder)):
        started, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images.float().div_(255))  # ours arrive uint8: the loop scales them on the device
        rates[name] = count / (time.perf_counter() - started)
    mapped, pil = rates["memory-mapped split"], rates["ImageFolder + PIL"]
    print(f"train input at {SIZE} px, {workers} worker(s): {mapped:.0f} img/s, ImageFolder + PIL {pil:.0f}")
    return [
        row(
            "scale",
            f"train input at {SIZE} px, {workers} worker(s), train split of {photos_n} JPEGs",
            f"{mapped:.0f} img/s",
            f"ImageFolder + PIL {pil:.0f} img/s",
            mapped / pil,
        )
    ]


def audit_rows(root: Path, per_class: int) -> list[dict]:
    """`cnnops audit` of a ResNet-50 at 224 px on the first project's test split."""
    import mlflow

    split = PreparedSplit.load(root / "prepared", "test")
    spec = default_spec("resnet50", split.class_names, "RGB", (SIZE, SIZE))
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.set_experiment("cnnops")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        pass
    save_checkpoint(root / "model.pt", create_classifier(spec), {"run_id": run.info.run_id})
    (root / "train.json").write_text(json.dumps({"run_id": run.info.run_id}))
    params = {**PARAMS, "audit": {**PARAMS["audit"], "max_images_per_class": per_class}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    command = [
        "cnnops",
        "audit",
        "model.pt",
        "--train-report",
        "train.json",
        "--report",
        "audit.json",
        "--gallery",
        "gallery",
        "--validation",
        "reports/v.json",
    ]
    seconds, peak = measured(command, root)
    images = sum(min(per_class, int((split.labels == c).sum())) for c in range(len(split.class_names)))
    print(f"audit of resnet50 at {SIZE} px, {images} test images: {seconds:.0f} s, peak {peak:.0f} MiB")
    return [
        row(
            "scale",
            f"audit of resnet50 at {SIZE} px, {images} images (gradcam)",
            f"{seconds:.0f} s, peak {peak:.0f} MiB",
            "",
            None,
            f"< {MEMORY_TARGET_MIB} MiB",
            peak < MEMORY_TARGET_MIB,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 20000], help="numbers of JPEGs")
    parser.add_argument(
        "--hashes", type=int, default=100_000, help="perceptual hashes for the near-duplicate search"
    )
    parser.add_argument("--audit-per-class", type=int, default=100, help="audited test images a class")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnops-scale"), help="scratch folder (kept)")
    add_json_argument(parser)
    args = parser.parse_args()
    photos = args.work / "photos"
    if len(list(photos.rglob("*.jpg"))) < max(args.sizes):
        shutil.rmtree(photos, ignore_errors=True)
        write_photos(photos, per_class=-(-max(args.sizes) // CLASSES), classes=CLASSES, size=STORED_SIDE)
    rows = near_duplicate_rows(args.hashes)
    baselines = {"validate": decode_rate(photos, 500, False), "prepare": decode_rate(photos, 500, True)}
    first = None
    for n in sorted(args.sizes):
        root = args.work / f"n{n}"
        if not (root / "data").exists():
            project(root, photos, n)
        rows += stage_rows(root, n, baselines)
        first = first or root
    rows += input_rows(first, min(args.sizes))
    rows += audit_rows(first, args.audit_per_class)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
