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
# Files DVC itself writes (its lock file, the .gitignore entries of stage outputs, the `.dvc` data
# pointers that `dvc add` and a retrain rewrite, whose hash every run records as its data version),
# plus every output dvc.yaml declares (`dvc_outputs`: the committed metrics and plots among them):
# changes there say nothing about the code, so they don't make a commit dirty.
DVC_WRITES = (":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore", ":(exclude,glob)**/*.dvc")


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
        excluded = [f":(exclude){path}" for path in dvc_outputs(repo)]
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", *DVC_WRITES, *excluded)
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning(
            "git commit unknown: %s is not a git work tree with a commit (%s)", Path(repo).resolve(), exc
        )
        return UNKNOWN
    return f"{sha}-dirty" if dirty else sha


def dvc_outputs(repo: str | Path = ".") -> list[str]:
    """Every path dvc.yaml's stages write (outs, metrics, plots), relative to the repo."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        return []
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    return [
        next(iter(entry)) if isinstance(entry, dict) else str(entry)
        for stage in stages.values()
        for key in ("outs", "metrics", "plots")
        for entry in stage.get(key) or []
    ]


def data_version(dvc_file: str | Path = "data.dvc") -> str | None:
    """The md5 `dvc add data` recorded in `dvc_file`; None when the file is missing or records none,
    so each caller decides what untracked data means (lineage: `unknown`; a flow: run `dvc add`)."""
    path = Path(dvc_file)
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    md5 = outs[0].get("md5") if outs else None
    return str(md5) if md5 else None


def lineage(repo: str | Path = ".", dvc_file: str | Path = "data.dvc") -> Lineage:
    """The commit and data version a model comes from; `unknown` (with a warning) for either not found."""
    version = data_version(dvc_file)
    if version is None:
        path = Path(dvc_file)
        why = "has no outs[0].md5; run `dvc add data`" if path.exists() else "not found; run `dvc add data`"
        log.warning("data version unknown: %s %s", path, why)
    return Lineage(git_commit(repo), version or UNKNOWN)


def _git(repo: str | Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()
