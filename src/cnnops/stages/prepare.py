"""`cnnops prepare`: a hash-stable, duplicate-aware train/val/test split cached as uint8 tensors.

Split rule (`assign_splits`): images are first grouped into duplicate groups (identical bytes or
perceptual hashes within `data.near_duplicate_distance`, see `cnnops.data.manifest`). Each group gets a
number u in [0, 1) from SHA-256 of (seed, the smallest SHA-256 of its files); u < test_fraction
is test, u < test_fraction + val_fraction is val, the rest train. So an image's split depends only
on its own content and the seed: adding images never moves existing ones (unless a new image joins
an existing duplicate group), and a duplicate group never straddles two splits. With
data/groups.csv (`cnnops.data.groups`), images of one user group (a patient, a site) are joined to
one component with their duplicates, placed by the group's name: a patient's scans share a split,
and a new scan of the patient does not move it.

Coverage: when the thresholds leave a split without any image of a class that has at least three
groups, the group holding images of it whose u lies nearest to the empty split's interval is moved there
(reported under `coverage_moves`). Only small classes need this, and only they can see an image
move when images are added.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnops import atomic
from cnnops.config import Params, ValidateParams
from cnnops.data.decode import HIGH_BIT_MODES, Window
from cnnops.data.folder import GROUPS_FILE, FolderScan, scan_image_folder
from cnnops.data.groups import load_groups, merged_components
from cnnops.data.manifest import ManifestEntry, describe_all, duplicate_groups
from cnnops.data.splits import SPLITS, SplitWriter
from cnnops.data.window import measure_window
from cnnops.errors import DataError, StageInputError
from cnnops.models import CHANNELS
from cnnops.progress import progress_bar
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs

log = logging.getLogger(__name__)


def split_position(key: str, seed: int) -> float:
    """A content key's place in [0, 1): the first 64 bits of SHA-256(seed:key)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / 2.0**64


def assign_splits(
    sha256: Sequence[str],
    labels: Sequence[str],
    groups: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    names: Sequence[str | None] | None = None,
) -> tuple[list[str], list[tuple[str, str, str, list[int]]]]:
    """Split name per image (by its group), and the coverage moves made (module docstring).

    `groups` are components (duplicates, joined with data/groups.csv's groups); `names` the user
    group of each image, if any: a component holding one is placed by its smallest group name, so a
    patient's split does not move when scans are added. A move is (class, from split, to split,
    indices of the moved group's images).
    """
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[int(group)].append(index)
    bounds = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction)}
    bounds["train"] = (test_fraction + val_fraction, 1.0)
    position = {g: split_position(_split_key(idx, sha256, names), seed) for g, idx in members.items()}
    split_of = {g: next(s for s, (lo, hi) in bounds.items() if lo <= u < hi) for g, u in position.items()}

    by_class: dict[str, list[int]] = defaultdict(list)  # the groups holding images of each class
    for g, idx in members.items():
        for label in {labels[i] for i in idx}:
            by_class[label].append(g)
    moves: list[tuple[str, str, str, list[int]]] = []
    for label, class_groups in sorted(by_class.items()):
        if len(class_groups) < len(SPLITS):
            log.warning(
                "class %r has %d distinct image groups: it cannot be in all 3 splits",
                label,
                len(class_groups),
            )
            continue
        for split in SPLITS:
            count = Counter(split_of[g] for g in class_groups)
            if count[split]:
                continue
            lo, hi = bounds[split]
            donors = [g for g in class_groups if count[split_of[g]] > 1]
            moved = min(donors, key=lambda g: min(abs(position[g] - lo), abs(position[g] - hi)))
            moves.append((label, split_of[moved], split, members[moved]))
            split_of[moved] = split
    return [split_of[int(g)] for g in groups], moves


def _split_key(idx: list[int], sha256: Sequence[str], names: Sequence[str | None] | None) -> str:
    named = [names[i] for i in idx if names[i] is not None] if names is not None else []
    return f"group:{min(named)}" if named else min(sha256[i] for i in idx)


@dataclass(frozen=True)
class PreparePaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    data: Path = path_arg("data", "ImageFolder root", POSITIONAL)
    out: Path = path_arg("prepared", "folder for the {train,val,test} splits (.npy images, .json index)")
    report: Path = path_arg("reports/prepare.json", "JSON report")
    validation: Path | None = path_arg(None, "validate's report: refuse data it did not pass")


@dataclass(frozen=True)
class PrepareResult:
    report: dict[str, Any]  # what `paths.report` holds: per-class counts per split, duplicate groups
    run_id: str  # the MLflow run that records it (experiment `<experiment>-data`)


@dataclass(frozen=True)
class _Decoded:
    """The folder read through the data contract: kept entries, their images staged on disk (row
    `rows[i]` of `staged` for entry i, in scan order), and what was skipped."""

    class_names: list[str]
    entries: list[ManifestEntry]
    staged: np.ndarray  # uint8 N x C x H x W, memory-mapped, one row per scanned file
    rows: list[int]
    skipped: list[dict[str, str]]


STAGING = ".staging"  # `<out>/..staging.npy.tmp`: every decoded image, until the splits are written
COPY_CHUNK = 256  # images copied from the staging file into a split at a time


def run(params: Params, paths: PreparePaths = PreparePaths()) -> PrepareResult:
    """Split `paths.data`, write `<paths.out>/<split>.{npy,json}` and the report, log it to MLflow.

    Images are decoded once, by a pool of processes, into a memory-mapped staging file, then
    copied into their split's file: peak memory does not grow with the number of images. With
    `paths.validation`, refuses data that failed validation or changed since it ran. Undecodable
    files raise a DataError naming them, unless `validate.severity.decodes` is not "error": then
    they are skipped with a warning and listed under `skipped`.
    """
    scan = scan_image_folder(paths.data, hidden_files=params.data.hidden_files, min_classes=2)
    shape = (CHANNELS[params.data.color_mode], *params.prepare.image_size)
    with SplitWriter(paths.out, STAGING, len(scan.records), shape) as staging:
        decoded = _decode(scan, staging.images, paths, params)
        groups, names, splits, moves = _assign(decoded.entries, paths.data, params)
        window = _window(scan, decoded, splits, params)
        counts = _write_splits(paths.out, decoded, splits, names, window, params)
    report = _report(params, decoded, groups, splits, moves, counts)
    report["groups"] = None if names is None else _group_counts(names, splits)
    report["window"] = None if window is None else list(window)
    atomic.write_json(paths.report, report)
    with runs.data_run(params, "prepare", ("base", "data", "prepare")) as mlflow_run:
        runs.log_metrics({f"{split}_images": n for split, n in report["totals"].items()})
        runs.log_files([paths.report], "prepare")
    return PrepareResult(report, mlflow_run.info.run_id)


def _assign(
    entries: list[ManifestEntry], data: Path, params: Params
) -> tuple[np.ndarray, list[str | None] | None, list[str], list[tuple[str, str, str, list[int]]]]:
    """Duplicate groups, data/groups.csv's group per image (None without the file), split per image
    and the coverage moves."""
    shas = [str(e.sha256) for e in entries]
    groups = duplicate_groups(shas, [str(e.phash) for e in entries], params.data.near_duplicate_distance)
    named = load_groups(data, [e.path for e in entries])
    names = None if named is None else [named.get(e.path) for e in entries]
    splits, moves = assign_splits(
        shas,
        [e.label for e in entries],
        groups if names is None else merged_components(groups, names),
        val_fraction=params.prepare.val_fraction,
        test_fraction=params.prepare.test_fraction,
        seed=params.base.seed,
        names=names,
    )
    return groups, names, splits, moves


def _window(scan: FolderScan, decoded: _Decoded, splits: list[str], params: Params) -> Window | None:
    """The high-bit window the splits hold (`data.window`); with `percentiles`, measured on the train
    split, then the high-bit images are decoded again through it into their staged rows."""
    d = params.data
    if d.window != "percentiles":
        return d.window if isinstance(d.window, tuple) else None
    records = [scan.records[row] for row in decoded.rows]
    train = [r.path for r, split in zip(records, splits, strict=True) if split == "train"]
    window = measure_window(
        train,
        d.window_percentiles,
        sample=d.window_sample,
        max_pixels=d.max_image_pixels,
        seed=params.base.seed,
    )
    high = [i for i, e in enumerate(decoded.entries) if e.mode in HIGH_BIT_MODES]
    if window is None or not high:
        return window
    again = describe_all(
        [records[i] for i in high],
        color_mode=d.color_mode,
        max_pixels=d.max_image_pixels,
        into=decoded.staged,
        rows=[decoded.rows[i] for i in high],
        window=window,
    )
    with progress_bar("prepare: windowing", len(high), unit="img") as advance:
        for _ in again:
            advance()
    return window


def _report(
    params: Params,
    decoded: _Decoded,
    groups: np.ndarray,
    splits: list[str],
    moves: list[tuple[str, str, str, list[int]]],
    counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """What reports/prepare.json holds: counts per split and class, duplicate groups, moves, skips."""
    entries = decoded.entries
    group_files: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        group_files[int(g)].append(i)
    return {
        "classes": decoded.class_names,
        "color_mode": params.data.color_mode,
        "image_size": list(params.prepare.image_size),
        "totals": {split: sum(counts[split].values()) for split in SPLITS},
        "counts": counts,
        "duplicate_groups": [
            {"split": splits[idx[0]], "files": [entries[i].path for i in idx]}
            for idx in group_files.values()
            if len(idx) > 1
        ],
        "coverage_moves": [
            {"class": label, "from": source, "to": target, "files": [entries[i].path for i in idx]}
            for label, source, target, idx in moves
        ],
        "skipped": decoded.skipped,
    }


def _decode(scan: FolderScan, staged: np.ndarray, paths: PreparePaths, params: Params) -> _Decoded:
    """Every image of the folder at the prepared size into `staged`; checks decoding and the
    validation report."""
    data = params.data
    entries: list[ManifestEntry] = []
    rows: list[int] = []
    undecodable: list[ManifestEntry] = []
    fixed = data.window if isinstance(data.window, tuple) else None  # percentiles: after the split
    found = describe_all(
        scan.records, color_mode=data.color_mode, max_pixels=data.max_image_pixels, into=staged, window=fixed
    )
    with progress_bar("prepare: decoding", len(scan.records), unit="img") as advance:
        for row, entry in enumerate(found):
            advance()
            if entry.error is not None:
                undecodable.append(entry)
                continue
            entries.append(entry)
            rows.append(row)
    _check_decoding(undecodable, params.validate, scan.root)
    if paths.validation is not None:
        _check_validated(paths.validation, entries, scan.root)
    skipped = [{"path": p, "reason": why} for p, why in scan.skipped]
    skipped += [{"path": e.path, "reason": str(e.error)} for e in undecodable]
    return _Decoded(scan.class_names, entries, staged, rows, skipped)


def _group_counts(names: list[str | None], splits: list[str]) -> dict[str, Any]:
    """data/groups.csv's groups per split (each group lies in exactly one) and the ungrouped images."""
    per_split: dict[str, set[str]] = {split: set() for split in SPLITS}
    for name, split in zip(names, splits, strict=True):
        if name is not None:
            per_split[split].add(name)
    return {
        "file": GROUPS_FILE,
        "groups": {split: len(found) for split, found in per_split.items()},
        "ungrouped_images": sum(n is None for n in names),
    }


def _write_splits(
    out_dir: Path,
    decoded: _Decoded,
    splits: list[str],
    names: list[str | None] | None,
    window: Window | None,
    params: Params,
) -> dict[str, dict[str, int]]:
    """Write each split's files from the staged images; returns the per-class image counts of each."""
    classes = decoded.class_names
    labels = [e.label for e in decoded.entries]
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        index = [i for i, s in enumerate(splits) if s == split]
        with SplitWriter(out_dir, split, len(index), decoded.staged.shape[1:]) as writer:
            rows = np.array([decoded.rows[i] for i in index], dtype=np.int64)
            for start in range(0, len(rows), COPY_CHUNK):
                writer.images[start : start + COPY_CHUNK] = decoded.staged[rows[start : start + COPY_CHUNK]]
            writer.finish(
                [classes.index(labels[i]) for i in index],
                [decoded.entries[i].path for i in index],
                classes,
                params.data.color_mode,
                groups=None if names is None else [names[i] for i in index],
                window=window,
            )
        per_class = Counter(labels[i] for i in index)
        counts[split] = {name: per_class.get(name, 0) for name in classes}
        log.info("%s: %d images -> %s", split, len(index), writer.images_file)
    return counts


def _check_decoding(undecodable: list[ManifestEntry], validate: ValidateParams, root: Path) -> None:
    if undecodable and validate.severity.decodes == "error":
        raise DataError(
            f"{len(undecodable)} file(s) under {root} do not decode:\n"
            + "\n".join(str(e.error) for e in undecodable)
            + "\nfix or remove them (or set validate.severity.decodes: warning to skip them)"
        )
    for entry in undecodable:
        log.warning("skipping %s (validate.severity.decodes is not 'error'): %s", entry.path, entry.error)


def _check_validated(path: Path, entries: list[ManifestEntry], root: Path) -> None:
    """The data must be the data that `validate` passed: same files, same bytes."""
    if not path.exists():
        raise StageInputError(
            f"{path}: validation report not found; run `cnnops validate` (or `dvc repro`) first"
        )
    try:
        report = json.loads(path.read_text())
        validated = {row["path"]: row["sha256"] for row in report["manifest"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise StageInputError(
            f"{path}: not a cnnops validation report ({exc}); re-run `cnnops validate`"
        ) from None
    if not report.get("success", False):
        raise StageInputError(
            f"{path}: records failed error-level checks ({', '.join(report.get('failed_errors', []))}); "
            "fix the data and re-run `cnnops validate`"
        )
    changed = [e.path for e in entries if validated.get(e.path) != e.sha256]
    if changed:
        raise StageInputError(
            f"{len(changed)} file(s) under {root} changed or appeared since {path} was written "
            f"(first: {root / changed[0]}); re-run `cnnops validate` (or `dvc repro`)"
        )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="hash-stable, duplicate-aware split cached as uint8 tensors"
    )
    add_path_arguments(parser, PreparePaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(PreparePaths, args))
    return 0
