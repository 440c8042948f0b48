"""data/groups.csv: which images belong together (a patient, a site, a scanner), so no group straddles
two splits.

Columns `path` (the image, relative to data/) and `group` (any name). Images of one group always land
in the same split, beside the duplicate grouping: a patient's scans, duplicates of them included,
stay together. The file is user input: it is read as UTF-8 within a size bound, every path must name
an image the scan found (a typo, a file that was deleted or one outside data/ is refused by line),
and one image cannot be in two groups. Images it does not list are each a group of their own,
which prepare reports with a warning.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cnnops.data.folder import GROUPS_FILE
from cnnops.errors import DataError

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 2**20  # a groups file larger than this is refused (millions of rows fit)
MAX_GROUP_CHARS = 200  # longest group name


def load_groups(root: str | Path, images: Collection[str]) -> dict[str, str] | None:
    """Group name per image path (relative to `root`) from `root`/groups.csv; None without one.

    `images` are the paths the folder scan found: a row naming any other path is an error.
    """
    csv_path = Path(root) / GROUPS_FILE
    if not csv_path.is_file():
        return None
    if csv_path.stat().st_size > MAX_BYTES:
        raise DataError(f"{csv_path}: larger than {MAX_BYTES // 2**20} MiB; one 'path,group' row per image")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"path", "group"} <= set(reader.fieldnames):
        raise DataError(f"{csv_path}: needs a header 'path,group'; got {reader.fieldnames}")
    known = set(images)
    groups: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        path, group = _row(row, csv_path, line)
        if path not in known:
            raise DataError(
                f"{csv_path}:{line}: path {path!r} is not an image under {root} (missing, outside a class "
                "folder or skipped); write each image's path relative to the data folder, e.g. cat/001.png"
            )
        if groups.setdefault(path, group) != group:
            raise DataError(
                f"{csv_path}:{line}: {path!r} is in group {groups[path]!r} and {group!r}; an image belongs "
                "to one group"
            )
    ungrouped = len(known) - len(groups)
    if ungrouped:
        log.warning(
            "%s lists no group for %d of %d images: each is a group of its own",
            csv_path,
            ungrouped,
            len(known),
        )
    return groups


def _row(row: dict[str | None, str | list[str] | None], csv_path: Path, line: int) -> tuple[str, str]:
    path, group = (str(row.get("path") or "").strip(), str(row.get("group") or "").strip())
    if None in row:
        raise DataError(f"{csv_path}:{line}: more fields than the header; quote names that hold commas")
    if not path or not group:
        raise DataError(f"{csv_path}:{line}: needs both a path and a group")
    if len(group) > MAX_GROUP_CHARS or not group.isprintable():
        raise DataError(
            f"{csv_path}:{line}: group {group[:40]!r}... must be printable and at most {MAX_GROUP_CHARS} "
            "characters"
        )
    return path, group


def merged_components(duplicates: np.ndarray, groups: Sequence[str | None]) -> np.ndarray:
    """Component id per image joining duplicate groups and user groups: two images share a component
    when a chain of "duplicates" or "same group" links them, so neither kind straddles splits."""
    n = len(duplicates)
    first_of: dict[tuple[str, object], int] = {}
    anchors = np.empty(2 * n, dtype=np.int64)
    for i, (dup, group) in enumerate(zip(duplicates.tolist(), groups, strict=True)):
        anchors[2 * i] = first_of.setdefault(("dup", dup), i)
        anchors[2 * i + 1] = first_of.setdefault(("group", group), i) if group is not None else i
    rows = np.repeat(np.arange(n), 2)
    graph = coo_matrix((np.ones(2 * n, dtype=np.int8), (rows, anchors)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
