"""Content digests of files: the one way cnnops names a file's bytes (a split, a model, an export).

Read in 1 MiB chunks, so a split of several GiB or a large checkpoint never sits in memory whole.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def update_digest(digest: hashlib._Hash, path: Path) -> None:
    """Feed the bytes of `path` into `digest` (several files can share one digest)."""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes, as hex."""
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()
