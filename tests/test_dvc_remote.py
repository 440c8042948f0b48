"""A second DVC remote by configuration alone: a local folder outside the repo (a shared disk).

The project's default remote is the in-repo `dvc-remote/`; `dvc remote add backup <folder>` and
`-r backup` move the data elsewhere and bring it back into an empty cache, with the real DVC.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures_prefect import tool_env

from cnnops.data.example import write_digits


def run(root: Path, *command: str) -> str:
    proc = subprocess.run(command, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


@pytest.mark.integration
def test_push_to_a_folder_remote_and_pull_into_an_empty_cache(tmp_path: Path) -> None:
    root, backup = tmp_path / "repo", tmp_path / "shared-disk" / "cnnops-remote"
    root.mkdir()
    write_digits(root / "data", per_class=3)
    shutil.copytree(root / "data", tmp_path / "original")
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    run(root, "dvc", "remote", "add", "-d", "local", "./dvc-remote")  # the project's layout
    run(root, "dvc", "remote", "add", "backup", str(backup))
    run(root, "dvc", "add", "-q", "data")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "data")

    run(root, "dvc", "push", "-r", "backup")
    assert any(p.is_file() for p in backup.rglob("*")), "nothing was pushed to the backup remote"
    assert not (root / "dvc-remote").exists(), "-r backup must not write to the default remote"

    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    run(root, "dvc", "pull", "-r", "backup")
    assert same_tree(root / "data", tmp_path / "original")
    assert "in sync" in run(root, "dvc", "status", "-c", "-r", "backup")
