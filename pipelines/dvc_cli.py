"""DVC from the flows: the stage order, one `dvc` call with its output streamed, and what a failure means.

Flows never import stage code: they run `dvc repro` so that dvc.lock stays the record of what ran.
Every call goes through the `dvc` of this interpreter's environment, with that environment's
`bin` first on PATH so the `cnnops` commands in dvc.yaml resolve to the same install.
"""

from __future__ import annotations

import json
import logging
import os
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

from cnnops.errors import CnnopsError
from pipelines import Logger

# Output that says the failure is about the moment, not the inputs: another DVC process holds the
# workspace lock (treeverse/dvc#10465), or a tracking server / remote did not answer. Anything else
# (a validation error, a bad param, a bug) fails the same way on a retry, so it is never retried.
TRANSIENT_MARKERS = (
    "Unable to acquire lock",
    "is busy, it is being blocked by",
    "database is locked",
    "Connection refused",
    "Connection reset by peer",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "503 Service Unavailable",
    "502 Bad Gateway",
    "504 Gateway Time-out",
)
TAIL_LINES = 40
PID_FILE = Path(".dvc/tmp/cnnops-dvc.pid")  # process group of the `dvc` a flow is running here
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
    """The error for a failed command: transient when its output carries a TRANSIENT_MARKERS line."""
    transient = any(marker in line for line in tail for marker in TRANSIENT_MARKERS)
    return (TransientDvcError if transient else DvcCommandError)(what, returncode, tail)


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


def run(args: Sequence[str], root: Path, logger: Logger, what: str) -> None:
    """Run `dvc <args>` in `root`, logging each output line as it comes.

    DVC and the stage command it starts get a process group of their own, recorded in PID_FILE
    while they run: stopping this call stops the whole group, and a run killed too abruptly to
    do that leaves the file for `stop_orphans` to act on. Raises TransientDvcError or
    DvcCommandError (named `what`) on a non-zero exit.
    """
    logger.info("$ dvc %s", " ".join(args))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    pid_file = root / PID_FILE
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
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
        alive = pgid > 0 and "dvc" in psutil.Process(pgid).cmdline()
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
