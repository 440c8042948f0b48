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
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cnnops import atomic
from cnnops.errors import CnnopsError, ConfigError, DataError
from pipelines import Logger

LOCK_FILE = Path(".dvc/tmp/cnnops-workspace.lock")
OWNER_FILE = Path(".dvc/tmp/cnnops-workspace.owner.json")
PENDING_FILE = Path(".dvc/tmp/cnnops-retrain-pending.json")  # a retrain whose record is not written yet
TMP_SUFFIX = ".cnnops-tmp"  # `.<name>.cnnops-tmp`: a copy into data/ not yet renamed into place
MERGE_FILE = Path(".dvc/tmp/cnnops-merge.json")  # copies in data/ not versioned yet -> their originals


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
    """Undo what an interrupted run can leave behind: copies into data/ that never got renamed, and
    a merge that never got versioned (its originals are still in the incoming folder: the next
    retrain merges them again, and validates them before versioning them).

    DVC's own leftovers need nothing here: its rwlock entries of dead processes are dropped by DVC,
    and a stage whose outputs don't match dvc.lock simply runs again.
    """
    for leftover in sorted(data_dir.rglob(f".*{TMP_SUFFIX}")):
        logger.warning(
            "removing %s, left by an interrupted merge of incoming images", leftover.relative_to(root)
        )
        leftover.unlink()
    rollback_merge(root, data_dir, logger)


def incoming_folder(root: Path, incoming: str | None, data_dir: Path) -> Path | None:
    """The folder of `orchestrate.incoming` (None when unset), refused when it is the data folder,
    inside it or holds it: retrain deletes the files it merged from there."""
    if incoming is None:
        return None
    folder, data = (root / incoming).resolve(), data_dir.resolve()
    if folder == data or folder.is_relative_to(data) or data.is_relative_to(folder):
        where = "is" if folder == data else "is inside" if folder.is_relative_to(data) else "holds"
        raise ConfigError(
            f"params.yaml: orchestrate.incoming = {incoming!r} ({folder}) {where} the data folder {data}. "
            "retrain deletes the images it merges from the incoming folder, so it must be a folder of "
            "its own: set orchestrate.incoming to one outside data/ (e.g. incoming), or to null"
        )
    return root / incoming


def merge_incoming(
    root: Path, incoming: Path, data_dir: Path, logger: Logger, only: Collection[Path] | None = None
) -> MergeResult:
    """Copy incoming/<class>/<file> into data/<class>/<file>, each copy renamed into place whole.

    Everything is checked before anything is copied: only regular files in class folders are merged,
    a file already in data/ with the same bytes is left alone, and the same name with other bytes is
    refused, never overwritten. With `only` (the files `cnnops check-incoming` passed), the others
    stay where they are. What it copies is noted in MERGE_FILE first, so `rollback_merge` can take it
    out again until `dvc add` has versioned it.
    """
    files = incoming_files(incoming, logger)
    if only is not None:
        wanted = set(only)
        left = [f for f in files if f not in wanted]
        if left:
            logger.warning("leaving %d file(s) the check refused in %s", len(left), incoming)
        files = [f for f in files if f in wanted]
    result, new = MergeResult(), []
    for source in files:
        target = data_dir / source.relative_to(incoming)
        if target.exists():
            if not filecmp.cmp(source, target, shallow=False):
                raise DataError(
                    f"{source}: {target} already exists with other content; rename the incoming "
                    "file (or remove the old one from data/ and run `dvc add data`)"
                )
            result.identical.append(source)
        else:
            new.append((source, target))
    _note_merge(root, data_dir, new)
    for source, target in new:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}{TMP_SUFFIX}")
        _copy_file(source, partial)
        os.replace(partial, target)
        result.copied.append(source)
    if result.copied:
        logger.info("merged %d new file(s) from %s into %s", len(result.copied), incoming, data_dir)
    return result


def incoming_files(incoming: Path, logger: Logger) -> list[Path]:
    """The files to merge. Anything but a regular file or a folder is refused, all of them named:
    a link would copy whatever it points at into data/, a pipe would block the merge."""
    if not incoming.is_dir():
        raise DataError(
            f"orchestrate.incoming: {incoming} is not a folder; create it or set incoming to null"
        )
    files, refused = [], []
    for folder, dirs, names in os.walk(incoming):  # never into linked folders: they are refused
        for path in sorted(Path(folder) / name for name in [*dirs, *names]):
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                refused.append(f"{path} ({_kind(path, mode)})")
    if refused:
        raise DataError(
            f"{incoming}: nothing merged, as incoming images must be regular files, and these are not: "
            f"{'; '.join(refused)}. Replace a link with a copy of the file it points at "
            "(`cp --dereference`), remove the rest, then run again"
        )
    merged = []
    for source in sorted(files):
        relative = source.relative_to(incoming)
        if any(part.startswith(".") for part in relative.parts):
            logger.warning("not merging %s: hidden files are not images (delete it to silence this)", source)
        elif len(relative.parts) != 2:
            raise DataError(
                f"{source}: incoming images must sit in a class folder, <incoming>/<class>/<image>; "
                "move it into the folder of its class"
            )
        else:
            merged.append(source)
    return merged


def _kind(path: Path, mode: int) -> str:
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    return "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _copy_file(source: Path, target: Path) -> None:
    """Copy bytes and modification time, never through a link (one swapped in since the check)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise DataError(f"{source}: cannot be read as a regular file ({exc.strerror}); run again") from None
    with open(fd, "rb") as src:
        status = os.fstat(src.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise DataError(f"{source}: is no longer a regular file; remove it and run again")
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))


def _note_merge(root: Path, data_dir: Path, new: list[tuple[Path, Path]]) -> None:
    """Add the copies about to be made (data/ path -> incoming original) to MERGE_FILE."""
    if new:
        noted = _merge_note(root) | {str(t.relative_to(data_dir)): str(s) for s, t in new}
        atomic.write_json(root / MERGE_FILE, noted)


def _merge_note(root: Path) -> dict[str, str]:
    path = root / MERGE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def rollback_merge(root: Path, data_dir: Path, logger: Logger) -> list[Path]:
    """Take out of data/ what merges copied there that `dvc add` has not versioned (MERGE_FILE), so
    data/ is as data.dvc has it again; the incoming originals stay. A copy that no longer has its
    original's bytes (changed by hand since) is kept, with a warning. Returns what it removed."""
    removed = []
    for relative, original in _merge_note(root).items():
        target = data_dir / relative
        if not target.is_file():
            continue  # gone already: nothing to take out
        inside = not Path(relative).is_absolute() and ".." not in Path(relative).parts
        if inside and Path(original).is_file() and filecmp.cmp(original, target, shallow=False):
            target.unlink()
            removed.append(target)
            if target.parent != data_dir and not any(target.parent.iterdir()):
                target.parent.rmdir()  # a class folder the merge created
        else:
            logger.warning(
                "keeping %s: not the copy merged from %s (changed since?); check it belongs in data/",
                target,
                original,
            )
    (root / MERGE_FILE).unlink(missing_ok=True)
    if removed:
        logger.warning(
            "took the %d file(s) merged from the incoming folder back out of %s", len(removed), data_dir
        )
    return removed


def clear_incoming(root: Path, merged: MergeResult, incoming: Path, logger: Logger) -> None:
    """Once data.dvc versions the merged files: forget the merge, then remove the incoming originals
    and the class folders they emptied."""
    (root / MERGE_FILE).unlink(missing_ok=True)
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
