"""A cure's completed rounds kept on disk, so a cure killed in round N resumes at round N.

Train's resume state (`resume`) covers one training run, epoch by epoch; a cure trains, evaluates
and re-audits a new model each round, and a kill in round 2 would otherwise train and re-audit round
1 again. A round's outcome is its checkpoint and its folder of reports (train, evaluate, the
re-audit and its gallery): copied into `<store>/<round>/` with a `round.json` beside them (the key
of the cure's inputs, the round's MLflow run and its parent's, its plan, the checkpoint's SHA-256).
`round.json` is written last and atomically, so a kill while the copy is made leaves no record, and
the round is trained again. The store lives outside DVC's outputs, like train's resume state (DVC
deletes a stage's outputs before running it). Nothing is unpickled: the checkpoint is copied back
byte for byte and checked against its digest; `round.json` is JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnops import atomic
from cnnops.data.digest import file_sha256

log = logging.getLogger(__name__)
RECORD = "round.json"
# what must match for a record to stand for the round about to run
EXPECTED = ("key", "parent_run_id", "plan")


@dataclass(frozen=True)
class Outputs:
    """Where a round's outputs live while the cure runs: its checkpoint and its reports folder."""

    checkpoint: Path
    folder: Path


def save(store: Path, number: int, record: dict[str, Any], outputs: Outputs) -> None:
    """Keep round `number`'s outputs and `record` (the EXPECTED keys and its `run_id`)."""
    kept = store / str(number)
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    shutil.copy2(outputs.checkpoint, kept / outputs.checkpoint.name)
    shutil.copytree(outputs.folder, kept / "reports")
    digest = file_sha256(kept / outputs.checkpoint.name)
    atomic.write_json(kept / RECORD, {**record, "round": number, "checkpoint_sha256": digest})


def restore(store: Path, number: int, expected: dict[str, Any], outputs: Outputs) -> dict[str, Any] | None:
    """Round `number`'s record, its outputs copied back into place, when it was kept for the same
    `expected` key, parent run and plan; else None (a warning says why when a record was there)."""
    kept = store / str(number)
    if not (kept / RECORD).is_file():
        return None
    try:  # the record is a file on disk like any other: an edited or broken one is not trusted
        record = json.loads((kept / RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        log.warning("%s: round %d's record is not readable JSON: the round is trained again", kept, number)
        return None
    wanted = json.loads(json.dumps(expected))  # compared as JSON reads it back (tuples are lists)
    stale = [name for name in EXPECTED if record.get(name) != wanted[name]]
    checkpoint = kept / outputs.checkpoint.name
    if not stale and (not checkpoint.is_file() or file_sha256(checkpoint) != record.get("checkpoint_sha256")):
        stale = ["checkpoint_sha256"]
    if stale:
        log.warning(
            "%s: round %d's record differs in %s (other params, data or an earlier round): the round is "
            "trained again", kept, number, ", ".join(stale),
        )  # fmt: skip
        return None
    _copy_back(kept, outputs)
    return record


def take_back(store: Path, number: int, outputs: Outputs) -> None:
    """Round `number`'s outputs, kept by this cure, copied back into place: the round a cure releases
    when a later round's model is worse (`stages.cure`'s `_kept_round`)."""
    _copy_back(store / str(number), outputs)


def _copy_back(kept: Path, outputs: Outputs) -> None:
    outputs.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kept / outputs.checkpoint.name, outputs.checkpoint)
    shutil.rmtree(outputs.folder, ignore_errors=True)
    shutil.copytree(kept / "reports", outputs.folder)


def clear(store: Path) -> None:
    """A finished cure leaves no rounds behind, so the next one trains afresh (as train's state)."""
    shutil.rmtree(store, ignore_errors=True)
