"""`cnnops prepare`: hash-stable, duplicate-aware splits of real images, cached as uint8 tensors."""

from __future__ import annotations

import json
import logging
import shutil
import tracemalloc
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from fixtures_data import run_prepare, run_validate
from PIL import Image

from cnnops.config import parse_params
from cnnops.data.splits import SPLITS, PreparedSplit, SplitWriter, load_splits
from cnnops.errors import DataError, StageInputError
from cnnops.stages import prepare


def _run(data: Path, out: Path, raw: dict | None = None, **kwargs) -> dict:
    return run_prepare(data, out, parse_params({"data": {"color_mode": "L"}, **(raw or {})}), **kwargs)


def _split_of(out: Path) -> dict[str, str]:
    return {path: name for name, split in load_splits(out / "prepared").items() for path in split.paths}


def test_prepared_digits_fixture_is_a_complete_split(prepared_digits: Path, digits_folder: Path) -> None:
    splits = load_splits(prepared_digits)
    report = json.loads((prepared_digits.parent / "prepare.json").read_text())
    paths = [p for split in splits.values() for p in split.paths]
    assert sorted(paths) == sorted(
        p.relative_to(digits_folder).as_posix() for p in digits_folder.rglob("*.png")
    )
    for name, split in splits.items():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 32, 32)
        assert split.class_names == [str(d) for d in range(10)] and split.color_mode == "L"
        assert sorted(set(split.labels.tolist())) == list(range(10))  # every class in every split
        assert report["totals"][name] == len(split)
        assert [split.class_names[i] for i in split.labels] == [p.split("/")[0] for p in split.paths]


def test_split_is_stable_when_images_are_added(tmp_path: Path, digits_folder: Path) -> None:
    small = tmp_path / "small"
    for path in sorted(digits_folder.rglob("*.png")):
        if sorted(path.parent.iterdir()).index(path) < 20:
            (small / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, small / path.parent.name / path.name)
    before_report = _run(small, tmp_path / "before")
    after_report = _run(digits_folder, tmp_path / "after")
    before, after = _split_of(tmp_path / "before"), _split_of(tmp_path / "after")
    assert len(before) == 200 and len(after) == 400
    moved = {m["class"] for m in before_report["coverage_moves"] + after_report["coverage_moves"]}
    checked = [p for p in before if p.split("/")[0] not in moved]
    assert len(checked) >= 160
    assert {p: before[p] for p in checked} == {p: after[p] for p in checked}


def test_exact_and_near_duplicates_never_cross_splits(tmp_path: Path, digits_folder: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_folder, data)
    planted = []
    for path in sorted(data.rglob("*.png"))[::10]:  # 40 originals, each with an exact and a near copy
        exact = path.with_name(f"{path.stem}_copy.png")
        near = path.with_name(f"{path.stem}_touched.png")
        shutil.copy(path, exact)
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] ^= 8
        Image.fromarray(pixels).save(near)
        planted.append([p.relative_to(data).as_posix() for p in (path, exact, near)])
    report = _run(data, tmp_path, {"data": {"color_mode": "L", "near_duplicate_distance": 4}})
    split_of = _split_of(tmp_path)
    for trio in planted:
        assert len({split_of[p] for p in trio}) == 1, trio
    grouped = [set(g["files"]) for g in report["duplicate_groups"]]
    assert all(any(set(trio) <= g for g in grouped) for trio in planted)
    assert len({split_of[trio[0]] for trio in planted}) == 3  # the trios themselves are spread over splits


def test_every_class_gets_every_split_when_it_has_three_groups(caplog: pytest.LogCaptureFixture) -> None:
    sha = [f"{i:064x}" for i in range(5)]
    labels = ["big", "big", "big", "small", "small"]
    splits, moves = prepare.assign_splits(
        sha, labels, np.arange(5), val_fraction=0.01, test_fraction=0.01, seed=0
    )
    assert set(splits[:3]) == set(SPLITS)  # thresholds alone would put all three in train
    assert {(m[0], m[2]) for m in moves} == {("big", "val"), ("big", "test")}
    assert "class 'small' has 2 distinct image groups" in caplog.text


def test_split_depends_on_content_and_seed_only() -> None:
    sha = [f"{i:064x}" for i in range(300)]
    labels = ["x"] * 300
    kwargs = {"val_fraction": 0.2, "test_fraction": 0.2}
    first, _ = prepare.assign_splits(sha, labels, np.arange(300), seed=0, **kwargs)
    shuffled = list(reversed(range(300)))
    second, _ = prepare.assign_splits([sha[i] for i in shuffled], labels, np.arange(300), seed=0, **kwargs)
    assert [second[shuffled.index(i)] for i in range(300)] == first  # order does not matter
    reseeded, _ = prepare.assign_splits(sha, labels, np.arange(300), seed=1, **kwargs)
    assert reseeded != first
    share = {s: first.count(s) / 300 for s in SPLITS}
    assert 0.12 < share["test"] < 0.28 and 0.12 < share["val"] < 0.28


def _small_folder(root: Path) -> Path:
    for c in range(2):
        for i in range(6):
            pixels = np.random.default_rng(10 * c + i).integers(0, 256, (16, 16), dtype=np.uint8)
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def test_undecodable_file_is_an_error_or_a_warned_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _small_folder(tmp_path / "data")
    (data / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="do not decode") as info:
        _run(data, tmp_path / "strict")
    assert str(data / "c0" / "broken.png") in str(info.value)
    assert not (tmp_path / "strict" / "prepare.json").exists()
    with caplog.at_level(logging.WARNING):
        report = _run(data, tmp_path / "lenient", {"validate": {"severity": {"decodes": "warning"}}})
    assert [s["path"] for s in report["skipped"]] == ["c0/broken.png"]
    assert "skipping c0/broken.png" in caplog.text
    assert sum(report["totals"].values()) == 12


def test_refuses_data_that_changed_or_failed_since_validate(tmp_path: Path) -> None:
    data = _small_folder(tmp_path / "data")
    params = parse_params({"data": {"color_mode": "L"}, "validate": {"min_images_per_class": 2}})
    run_validate(data, tmp_path, params)
    report = tmp_path / "validation.json"
    assert _run(data, tmp_path / "ok", validation=report)["totals"]

    Image.new("L", (16, 16), 9).save(data / "c1" / "3.png")
    with pytest.raises(StageInputError, match="changed or appeared since") as info:
        _run(data, tmp_path / "changed", validation=report)
    assert str(data / "c1" / "3.png") in str(info.value)

    failed = json.loads(report.read_text()) | {"success": False, "failed_errors": ["decodes"]}
    report.write_text(json.dumps(failed))
    with pytest.raises(StageInputError, match=r"failed error-level checks \(decodes\)"):
        _run(data, tmp_path / "failed", validation=report)
    with pytest.raises(StageInputError, match="validation report not found"):
        _run(data, tmp_path / "missing", validation=tmp_path / "nope.json")


def test_prepare_records_itself_in_a_data_run(tmp_path: Path) -> None:
    """No model exists yet: prepare logs its report to a run of `<experiment>-data`, with lineage."""
    data = _small_folder(tmp_path / "data")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params(
        {
            "data": {"color_mode": "L"},
            "tracking": {"uri": store, "artifact_location": str(tmp_path / "art"), "experiment": "p"},
        }
    )
    paths = prepare.PreparePaths(data, tmp_path / "prepared", tmp_path / "prepare.json")
    result = prepare.run(params, paths)
    client = mlflow.MlflowClient(store)
    run = client.get_run(result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "p-data" and run.info.run_name == "prepare"
    assert run.data.metrics["train_images"] == result.report["totals"]["train"]
    assert {"cnnops.data_version", "cnnops.git_commit", "cnnops.dvc_stage"} <= set(run.data.tags)
    assert "prepare.image_size" in run.data.params and "train.lr" not in run.data.params
    assert [a.path for a in client.list_artifacts(result.run_id, "prepare")] == ["prepare/prepare.json"]


def _photos(root: Path, n: int, size: tuple[int, int] = (80, 96)) -> Path:
    rng = np.random.default_rng(n)
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 4}" / f"{i}.jpg")
    return root


def test_prepare_streams_images_to_disk_with_memory_that_does_not_grow_with_them(tmp_path: Path) -> None:
    """1,200 RGB JPEGs decoded by the pool into memory-mapped split files: the parent process's
    peak heap stays far below the 14 MiB of pixels it writes (measured: 4.4 MiB)."""
    params = parse_params(
        {"data": {"color_mode": "RGB", "near_duplicate_distance": 0}, "prepare": {"image_size": [64, 64]}}
    )
    run_prepare(_photos(tmp_path / "warm", 8), tmp_path / "warm-out", params)  # MLflow's own set-up
    data = _photos(tmp_path / "data", 1200)
    tracemalloc.start()
    report = run_prepare(data, tmp_path / "out", params)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pixels = 1200 * 3 * 64 * 64
    assert sum(report["totals"].values()) == 1200 and peak < pixels / 2, f"peak {peak / 2**20:.1f} MiB"
    tracemalloc.start()
    splits = load_splits(tmp_path / "out" / "prepared")  # mapped, not read: pages come on access
    loaded = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(len(s) for s in splits.values()) == 1200 and loaded < pixels / 20
    assert not list((tmp_path / "out" / "prepared").glob(".*"))  # no staging file left behind


def test_broken_or_old_splits_are_refused_by_name(tmp_path: Path, prepared_digits: Path) -> None:
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_digits, prepared)
    images = prepared / "test.npy"
    images.write_bytes(images.read_bytes()[:-100])  # truncated on disk
    with pytest.raises(StageInputError, match=r"test.npy: unreadable or truncated .*re-run `cnnops prepare`"):
        PreparedSplit.load(prepared, "test")
    (prepared / "val.json").write_text('{"format": "something else"}')
    with pytest.raises(StageInputError, match=r"val.json: not a cnnops-split/2 split index"):
        PreparedSplit.load(prepared, "val")
    (prepared / "train.json").unlink()
    (prepared / "train.pt").write_bytes(b"old")
    with pytest.raises(StageInputError, match=r"train.pt: a prepared split of an older cnnops"):
        PreparedSplit.load(prepared, "train")


def test_a_split_that_does_not_fit_on_disk_fails_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    """The images file is allocated in full before it is written: a disk too small (here: a split of
    a billion 224-px images, 150 TB) is an error naming the split, not a SIGBUS mid-write."""
    with pytest.raises(
        StageInputError, match=r"train.npy: cannot allocate 1000000000 images of \[3, 224, 224\]"
    ):
        SplitWriter(tmp_path, "train", 10**9, (3, 224, 224))
    assert list(tmp_path.iterdir()) == []
