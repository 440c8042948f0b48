"""The workspace a flow runs DVC in: one flow at a time, new images merged in so a crash can't half-do it.

A workspace is a DVC project folder (dvc.yaml, params.yaml, data/, data.dvc). Two `dvc repro` in one
workspace fail on DVC's lock (treeverse/dvc#10465) or, worse, mix each other's outputs, so every flow
holds an OS file lock on the workspace while it touches it; the OS releases it when the holder dies,
so a killed run never leaves it stale.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cnnops.errors import CnnopsError, DataError
from pipelines import Logger

LOCK_FILE = Path(".dvc/tmp/cnnops-workspace.lock")
OWNER_FILE = Path(".dvc/tmp/cnnops-workspace.owner.json")
PENDING_FILE = Path(".dvc/tmp/cnnops-retrain-pending.json")  # a retrain whose record is not written yet
TMP_SUFFIX = ".cnnops-tmp"  # `.<name>.cnnops-tmp`: a copy into data/ not yet renamed into place


class WorkspaceBusy(CnnopsError):
    """Another flow holds the workspace lock for longer than this run agreed to wait."""


@dataclass(frozen=True)
class MergeResult:
    """What merging the incoming folder did: files copied into data/ and files already there."""

    copied: list[Path] = field(default_factory=list)
    identical: list[Path] = field(default_factory=list)

    @property
    def sources(self) -> list[Path]:
        return [*self.copied, *self.identical]


def check_workspace(root: Path) -> None:
    """Refuse a folder that is not a DVC project with a pipeline, naming what is missing."""
    for name in (".dvc", "dvc.yaml", "params.yaml"):
        if not (root / name).exists():
            raise CnnopsError(
                f"{root}: not a cnnops workspace ({name} is missing); pass the project folder "
                "(where dvc.yaml and params.yaml are) as the flow's `workspace` parameter"
            )


def _owner(root: Path) -> str:
    try:
        owner = json.loads((root / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return "another process"
    return f"pid {owner.get('pid')} (flow run {owner.get('flow_run') or '-'}, since {owner.get('since')})"


@contextmanager
def workspace_lock(root: Path, timeout: float, holder: str, logger: Logger) -> Iterator[None]:
    """Hold the workspace for one flow; wait at most `timeout` seconds (0: refuse at once if taken)."""
    lock = FileLock(root / LOCK_FILE)
    (root / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout <= 0:
            raise WorkspaceBusy(
                f"{root} is busy: {_owner(root)} holds {LOCK_FILE}; this run does nothing. "
                "Run again when that one has finished, or set orchestrate.lock_timeout to wait"
            ) from None
        logger.warning(
            "%s is busy: %s holds %s; waiting up to %.0f s", root, _owner(root), LOCK_FILE, timeout
        )
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise WorkspaceBusy(
                f"{root} stayed busy for {timeout:.0f} s: {_owner(root)} holds {LOCK_FILE}; this run did "
                "nothing. If no flow is running there, the holder is stuck: stop it, or raise "
                "orchestrate.lock_timeout"
            ) from None
    try:
        owner = {
            "pid": os.getpid(),
            "flow_run": holder,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (root / OWNER_FILE).write_text(json.dumps(owner))
        yield
    finally:
        (root / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def recover(root: Path, data_dir: Path, logger: Logger) -> None:
    """Undo what an interrupted run can leave behind: copies into data/ that never got renamed.

    DVC's own leftovers need nothing here: its rwlock entries of dead processes are dropped by DVC,
    and a stage whose outputs don't match dvc.lock simply runs again.
    """
    for leftover in sorted(data_dir.rglob(f".*{TMP_SUFFIX}")):
        logger.warning(
            "removing %s, left by an interrupted merge of incoming images", leftover.relative_to(root)
        )
        leftover.unlink()


def merge_incoming(incoming: Path, data_dir: Path, logger: Logger) -> MergeResult:
    """Copy incoming/<class>/<file> into data/<class>/<file>, each copy renamed into place whole.

    Idempotent, so a run killed half-way is finished by the next one: a file already in data/ with
    the same bytes is left alone. The same name with other bytes is refused, never overwritten.
    """
    if not incoming.is_dir():
        raise DataError(
            f"orchestrate.incoming: {incoming} is not a folder; create it or set incoming to null"
        )
    result = MergeResult()
    for source in sorted(p for p in incoming.rglob("*") if p.is_file()):
        relative = source.relative_to(incoming)
        if any(part.startswith(".") for part in relative.parts):
            logger.warning("not merging %s: hidden files are not images (delete it to silence this)", source)
            continue
        if len(relative.parts) != 2:
            raise DataError(
                f"{source}: incoming images must sit in a class folder, <incoming>/<class>/<image>; "
                "move it into the folder of its class"
            )
        target = data_dir / relative
        if target.exists():
            if not filecmp.cmp(source, target, shallow=False):
                raise DataError(
                    f"{source}: {target} already exists with other content; rename the incoming "
                    "file (or remove the old one from data/ and run `dvc add data`)"
                )
            result.identical.append(source)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}{TMP_SUFFIX}")
        shutil.copy2(source, partial)
        os.replace(partial, target)
        result.copied.append(source)
    if result.copied:
        logger.info("merged %d new file(s) from %s into %s", len(result.copied), incoming, data_dir)
    return result


def clear_incoming(merged: MergeResult, incoming: Path, logger: Logger) -> None:
    """Remove incoming files once their copies in data/ are versioned, and the emptied class folders."""
    for source in merged.sources:
        source.unlink(missing_ok=True)
    for folder in sorted({s.parent for s in merged.sources}):
        if folder != incoming and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if merged.sources:
        logger.info(
            "removed %d merged file(s) from %s: data.dvc now versions them", len(merged.sources), incoming
        )


def pending_retrain(root: Path) -> dict[str, Any] | None:
    """What a retrain noted before running the pipeline, if it never got to write its record."""
    path = root / PENDING_FILE
    return json.loads(path.read_text()) if path.exists() else None


def note_retrain(root: Path, note: dict[str, Any] | None) -> None:
    """Note a retrain about to run the pipeline (None: its record is written, forget it)."""
    path = root / PENDING_FILE
    if note is None:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(note))
    os.replace(partial, path)
