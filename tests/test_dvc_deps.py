"""dvc.yaml's code deps are true: every module a stage's command imports is covered by its deps.

The import closure is read with `ast` from src/cnnops, starting at the CLI and the stage's module,
so a new import that the deps miss fails here by name instead of leaving `dvc status` clean.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
SRC = PROJECT / "src"
STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The file of module `cnnops...` (a package's __init__.py), or None when it is not one of ours."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path) -> set[str]:
    """The cnnops modules `path` imports anywhere (top level or inside functions), with their packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    ours = {name for name in names if name.split(".")[0] == "cnnops" and module_file(name)}
    return {".".join(name.split(".")[:i]) for name in ours for i in range(1, name.count(".") + 2)}


def closure(*roots: str) -> set[Path]:
    """Every file of ours that importing `roots` executes."""
    seen: set[str] = set()
    todo = [".".join(root.split(".")[:i]) for root in roots for i in range(1, root.count(".") + 2)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported(module_file(name)) - seen)
    return {module_file(name) for name in seen}


def stage_module(cmd: str) -> str:
    """`cnnops <command> ...` -> the module the CLI hands that command to."""
    from cnnops.cli import COMMANDS

    return COMMANDS[cmd.split()[1]]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(PROJECT)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_its_command_imports(stage: str) -> None:
    spec = STAGES[stage]
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in spec["deps"]]
    files = closure("cnnops.cli", stage_module(spec["cmd"]))
    missing = sorted(str(f.relative_to(PROJECT)) for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports these but does not depend on them: {missing}"


def test_closure_follows_imports_inside_packages() -> None:
    """The walker itself: the audit stage reaches the saliency module through `from cnnops.audit import`."""
    files = {f.relative_to(SRC).as_posix() for f in closure("cnnops.stages.audit")}
    assert {"cnnops/audit/saliency.py", "cnnops/audit/__init__.py", "cnnops/models.py"} <= files
    assert "cnnops/stages/release.py" not in files


def uncached_outputs() -> list[str]:
    """The metrics and plots files dvc.yaml keeps out of the cache: git holds them instead."""
    return [
        next(iter(entry))
        for spec in STAGES.values()
        for key in ("metrics", "plots", "outs")
        for entry in spec.get(key) or []
        if isinstance(entry, dict)
        and next(iter(entry.values())).get("cache") is False
        and Path(next(iter(entry))).suffix in (".json", ".csv")
    ]


def test_lock_and_uncached_metrics_and_plots_are_committed() -> None:
    """A fresh clone has a baseline: `dvc exp show`, `dvc metrics diff` and `dvc plots diff` compare
    against the committed dvc.lock and the example's committed reports."""
    files = ["dvc.lock", *uncached_outputs()]
    assert "reports/metrics.json" in files and "reports/plots/confusion.csv" in files
    tracked = subprocess.run(
        ["git", "ls-files", "--", *files], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(tracked) == sorted(files), f"not committed: {sorted(set(files) - set(tracked))}"
