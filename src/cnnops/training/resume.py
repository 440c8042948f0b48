"""The per-epoch resume state of `train`: what a SIGKILLed run needs to finish bit-identically.

It lives outside DVC's outputs (default `.cnnops/train/state.pt`, gitignored) because DVC deletes
a stage's outputs before running it. A fingerprint of the training params and the prepared data
guards against resuming a different run: a mismatch starts afresh with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from cnnops.data.digest import update_digest

log = logging.getLogger(__name__)


def fingerprint(settings: dict[str, Any], files: list[Path]) -> str:
    """Hash of the settings (JSON) and the bytes of the input files."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        update_digest(digest, path)
    return digest.hexdigest()


def save(path: Path, state: dict[str, Any]) -> None:
    """Write atomically, so a kill during the write leaves the previous epoch's state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state when it belongs to this run's params and data, else None."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint:
        log.warning(
            "%s: resume state is from other params or data; starting a new training run (delete the file "
            "to silence this)",
            path,
        )
        return None
    return state


def clear(path: Path) -> None:
    """A finished run leaves no resume state, so the next `cnnops train` starts a new run."""
    path.unlink(missing_ok=True)
