"""Files written whole or not at all: a stage killed mid-write leaves the previous file, never a
torn one that a later stage would read.

Each writer goes to a temporary file beside the target (same folder, so the rename stays on one
file system) and `os.replace`s it into place; the standard library has no atomic write of its own.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write to; it replaces `path` when the block ends without an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # created as open() would (0o666 less the umask), not mkstemp's owner-only 0o600: a report
    # stays as readable as it was when written in place
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """A JSON report, pretty-printed with a final newline."""
    write_text(path, json.dumps(data, indent=indent) + "\n")
