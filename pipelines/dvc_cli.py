"""DVC from the flows: the stage order, one `dvc` call with its output streamed, and what a failure means.

Flows never import stage code: they run `dvc repro` so that dvc.lock stays the record of what ran.
Every call goes through the `dvc` of this interpreter's environment, with that environment's
`bin` first on PATH so the `cnnops` commands in dvc.yaml resolve to the same install.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from cnnops.errors import TRANSIENT_EXIT, CnnopsError
from pipelines import Logger

DVC_ERROR = "ERROR: "  # how DVC starts the line of its own error
DVC_FAILED = 255  # DVC's exit status for an error of its own (dvc/cli/__init__.py)
_STAGE = r"(failed to reproduce '[^']+': )?"
# DVC's own error, its last `ERROR: ` line, when the failure is about the moment: another DVC process
# holds the repo lock or a stage's lock (treeverse/dvc#10465), or the stage's `cnnops` command exited
# TRANSIENT_EXIT (a server or database that did not answer). Anything else (a validation error, a
# bad param, a bug) fails the same way on a retry, so it is never retried. Output is never searched
# for words: a stage's output names user files, and a file may be called "Connection refused.png".
TRANSIENT_ERRORS = (
    re.compile(_STAGE + r"Unable to acquire lock\. Most likely another DVC process is running .*"),
    re.compile(_STAGE + r"'[^']+' is busy, it is being blocked by:"),
    re.compile(_STAGE + rf"failed to run: .+, exited with {TRANSIENT_EXIT}"),
)
# What DVC prints after its busy error (the lock's holders, then a hint); nothing follows the others.
AFTER_BUSY = re.compile(
    r"\(PID \d+\): .*"
    r"|If there are no processes with such PIDs, you can manually remove '[^']+' and try again\."
)
TAIL_LINES = 40
PID_FILE = Path(".dvc/tmp/cnnops-dvc.pid")  # process group of the `dvc` a flow is running here
CNNOPS = "cnnops.cli"  # `run`'s module for a cnnops command that is not a DVC stage (check-incoming)
GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL when stopping a DVC process group


if TYPE_CHECKING:
    from dvc.stage import PipelineStage as PipelineStageT


class DvcCommandError(CnnopsError):
    """A `dvc` command exited non-zero; the message names the command and its last error line."""

    def __init__(self, what: str, returncode: int, tail: Sequence[str]) -> None:
        self.what = what
        self.returncode = returncode
        self.tail = list(tail)
        super().__init__(f"{what} failed (exit {returncode}): {_reason(self.tail)}")

    def __reduce__(self) -> tuple[type, tuple[str, int, list[str]]]:
        """Rebuild from the same arguments: Prefect may pickle a failed task's exception."""
        return type(self), (self.what, self.returncode, self.tail)


class TransientDvcError(DvcCommandError):
    """A failure worth retrying (lock contention, a tracking server or remote that did not answer)."""


def failure(what: str, returncode: int, tail: Sequence[str]) -> DvcCommandError:
    """The error for a failed command: transient when DVC's own error says so (TRANSIENT_ERRORS)."""
    return (TransientDvcError if _transient(returncode, tail) else DvcCommandError)(what, returncode, tail)


def _transient(returncode: int, tail: Sequence[str]) -> bool:
    """DVC failed (its exit status) and its last error line, with what it printed after, is one of
    TRANSIENT_ERRORS. The stage's output comes before DVC's error, so a line a file name forged there
    is never the last one, and a forged one inside DVC's message leaves the rest of it after."""
    lines = [line.strip() for line in tail if line.strip()]
    last = max((i for i, line in enumerate(lines) if line.startswith(DVC_ERROR)), default=None)
    if returncode != DVC_FAILED or last is None:
        return False
    message = lines[last].removeprefix(DVC_ERROR)
    after = lines[last + 1 :]
    return any(p.fullmatch(message) for p in TRANSIENT_ERRORS) and all(AFTER_BUSY.fullmatch(a) for a in after)


def _reason(tail: Sequence[str]) -> str:
    """Why, from the output's end: the stage's own `cnnops <stage>: error: ...` message when it
    printed one, else DVC's last ERROR (with the output line before it, e.g. an exception)."""
    lines = [line.strip() for line in tail if line.strip()]
    dvc_errors = [i for i, line in enumerate(lines) if line.startswith("ERROR")]
    end = dvc_errors[-1] if dvc_errors else len(lines)
    stage_errors = [i for i, line in enumerate(lines[:end]) if ": error:" in line]
    if stage_errors:
        return " ".join(lines[stage_errors[-1] : end])
    if dvc_errors:
        before = f" (output before it: {lines[end - 1]})" if end > 0 else ""
        return " ".join(lines[end:]) + before
    return lines[-1] if lines else "no output"


def _level(line: str) -> int:
    """The severity a line announces (DVC's `ERROR:`, a stage's `WARNING`), kept in the Prefect logs."""
    head = line[:60]
    if "ERROR" in head or ": error:" in line:
        return logging.ERROR
    return logging.WARNING if "WARNING" in head else logging.INFO


def environment() -> dict[str, str]:
    """The child environment: this venv's bin first (dvc.yaml runs `cnnops`), DVC analytics off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(args: Sequence[str], root: Path, logger: Logger, what: str, module: str = "dvc") -> None:
    """Run `dvc <args>` (or `python -m <module> <args>`, e.g. CNNOPS) in `root`, logging each line.

    DVC and the stage command it starts get a process group of their own, recorded in PID_FILE
    while they run: stopping this call stops the whole group, and a run killed too abruptly to
    do that leaves the file for `stop_orphans` to act on. Raises TransientDvcError or
    DvcCommandError (named `what`) on a non-zero exit.
    """
    logger.info("$ %s %s", "cnnops" if module == CNNOPS else module, " ".join(args))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    pid_file = root / PID_FILE
    with subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,
    ) as proc:
        pid_file.write_text(str(proc.pid))
        try:
            assert proc.stdout is not None  # set by stdout=PIPE, not user input
            for raw in proc.stdout:
                tail.append(raw.rstrip("\n"))
                logger.log(_level(tail[-1]), "%s", tail[-1])
            returncode = proc.wait()
        except BaseException:  # cancelled, timed out or interrupted: take DVC and its stage down too
            _stop_group(proc.pid, _child_exits(proc))
            raise
        finally:
            pid_file.unlink(missing_ok=True)
    if returncode != 0:
        raise failure(what, returncode, tail)


def stop_orphans(root: Path, logger: Logger) -> None:
    """Stop a DVC process group left running by a flow that was killed (SIGKILL, OOM, power cut).

    Call it holding the workspace lock: then no live flow owns a DVC run here, so a group still
    alive under PID_FILE is an orphan that would race the next run for the workspace.
    """
    pid_file = root / PID_FILE
    if not pid_file.exists():
        return
    pgid = int(pid_file.read_text().strip() or 0)
    try:
        alive = pgid > 0 and bool({"dvc", CNNOPS} & set(psutil.Process(pgid).cmdline()))
    except psutil.Error:
        alive = False
    if alive:
        logger.warning("stopping DVC (process group %d) left running by an interrupted flow run", pgid)
        _stop_group(pgid, _group_exits(pgid))
    pid_file.unlink(missing_ok=True)


def _stop_group(pgid: int, wait: Callable[[float], bool]) -> None:
    """SIGTERM the process group; SIGKILL it if `wait(GRACE_SECONDS)` says it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if wait(GRACE_SECONDS):
            return


def _child_exits(proc: subprocess.Popen[str]) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    return wait


def _group_exits(pgid: int) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        return False

    return wait


def pipeline_stages(root: Path, target: str | None = None) -> list[str]:
    """dvc.yaml stages in dependency order (ties keep file order), from DVC's own graph.

    With `target`, only that stage and the stages it depends on, like `dvc repro <target>`.
    Reading DVC's graph instead of a list kept here means a stage added to dvc.yaml is run by the
    flows without editing them.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo, warnings.catch_warnings():
        # DVC's own graph code trips a pygtrie DeprecationWarning: noise for anyone running flows.
        warnings.simplefilter("ignore", DeprecationWarning)
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        names = {_address(stage, root): stage for stage in stages}
        graph = repo.index.graph.subgraph(stages).reverse()  # DVC's edges point at the dependency
        if target is not None:
            if target not in names:
                raise CnnopsError(f"stage {target!r} is not in dvc.yaml; its stages are {sorted(names)}")
            graph = graph.subgraph(nx.ancestors(graph, names[target]) | {names[target]})
        position = {stage: i for i, stage in enumerate(stages)}
        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: position[s])
        return [_address(stage, root) for stage in ordered]


def _address(stage: PipelineStageT, root: Path) -> str:
    """`name` for a stage of ./dvc.yaml, `sub/dvc.yaml:name` for one in a sub-folder."""
    dvcfile = os.path.relpath(stage.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def status(root: Path, logger: Logger) -> dict[str, list[object]]:
    """`dvc status --json`: what is out of date (data against data.dvc, stages against dvc.lock).

    Stages marked `always_changed` are left out: they would make every check say "changed".
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        env=environment(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    for line in proc.stderr.splitlines():
        logger.info("%s", line)
    if proc.returncode != 0:
        raise failure("dvc status", proc.returncode, proc.stderr.splitlines()[-TAIL_LINES:])
    report: dict[str, list[object]] = json.loads(proc.stdout or "{}")
    return {name: changes for name, changes in report.items() if changes != ["always changed"]}
