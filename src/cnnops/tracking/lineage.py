"""Lineage: which code and which data a model came from.

Read from git and from DVC's `data.dvc` pointer, so the ONNX metadata and the MLflow run can name
the exact commit and data version without importing either tool's internals.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# Files `dvc repro` itself rewrites while the pipeline runs (its lock file, and the .gitignore entries
# of stage outputs): changes there say nothing about the code, so they don't make a commit dirty.
DVC_WRITES = (":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore")


@dataclass(frozen=True)
class Lineage:
    git_commit: str  # HEAD's sha, "-dirty" when tracked files (but DVC's own writes) differ from it
    data_version: str  # the md5 DVC records for data/ in data.dvc

    def as_tags(self) -> dict[str, str]:
        return {"git_commit": self.git_commit, "data_version": self.data_version}


def git_commit(repo: str | Path = ".") -> str:
    """HEAD's commit, marked dirty when tracked files changed (not DVC_WRITES); `unknown` outside git."""
    try:
        sha = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", *DVC_WRITES)
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning(
            "git commit unknown: %s is not a git work tree with a commit (%s)", Path(repo).resolve(), exc
        )
        return UNKNOWN
    return f"{sha}-dirty" if dirty else sha


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 DVC stored for the data folder; `unknown` (with a warning) when data is not DVC-tracked."""
    path = Path(dvc_file)
    if not path.exists():
        log.warning("data version unknown: %s not found (track the data with `dvc add data`)", path)
        return UNKNOWN
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    md5 = outs[0].get("md5") if outs else None
    if not md5:
        log.warning("data version unknown: %s has no outs[0].md5; run `dvc add data`", path)
        return UNKNOWN
    return str(md5)


def lineage(repo: str | Path = ".", dvc_file: str | Path = "data.dvc") -> Lineage:
    return Lineage(git_commit(repo), data_version(dvc_file))


def _git(repo: str | Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()
