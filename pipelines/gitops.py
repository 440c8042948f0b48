"""Commit the new data and pipeline versions (data.dvc, dvc.lock) to a branch, leaving the checkout alone.

Git plumbing with a private index file writes the commit without touching the user's working tree,
index or current branch (a scheduled run must not switch branches under someone's feet), and
`update-ref` moves the branch in one atomic step, so an interrupted commit leaves nothing half-done.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cnnops.errors import CnnopsError


def _git(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise CnnopsError(
            f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout.strip()


def commit_to_branch(root: Path, branch: str, paths: Sequence[str], message: str) -> str:
    """Commit `paths` as they are now onto `branch` (created from HEAD if missing); returns the commit id.

    The commit's tree is HEAD's tree with `paths` replaced; its parent is the branch tip, plus HEAD
    when HEAD has moved on since, so the branch carries both the code and the data versions.
    """
    _git(root, "check-ref-format", "--branch", branch)
    head = _git(root, "rev-parse", "--verify", "HEAD^{commit}")
    tip = _git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False) or None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "read-tree", head, env=env)
        _git(root, "update-index", "--add", "--", *paths, env=env)
        tree = _git(root, "write-tree", env=env)
    parents = [tip or head]
    if tip and subprocess.run(["git", "merge-base", "--is-ancestor", head, tip], cwd=root).returncode != 0:
        parents.append(head)
    parent_args = [arg for parent in parents for arg in ("-p", parent)]
    commit = _git(root, "commit-tree", tree, *parent_args, "-m", message)
    _git(root, "update-ref", f"refs/heads/{branch}", commit, *([tip] if tip else []))
    return commit
