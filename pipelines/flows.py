"""Prefect flows: `reproduce` the DVC pipeline on demand, `retrain` it when new data has arrived.

Prefect owns when and where; DVC owns the DAG. Each DVC stage is one task running
`dvc repro --single-item <stage>` in dependency order read from dvc.yaml, so dvc.lock stays the
record and a stage added to dvc.yaml needs no change here. Stage output goes to the Prefect logs
line by line; only failures worth retrying (lock contention, a server that did not answer) are
retried, with exponential backoff; any other failure ends the flow with the stage and its error.
Every task has a timeout, and a run that fails or crashes says so through the configured channels.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.tasks import Task, exponential_backoff

from cnnops.audit.cure_gallery import rates_text
from cnnops.config import OrchestrateParams, Params, TrackingParams, load_params
from cnnops.errors import StageInputError
from cnnops.tracking import runs
from cnnops.tracking.lineage import data_version
from pipelines import Logger, dvc_cli, gitops, notify
from pipelines.workspace import (
    MergeResult,
    check_workspace,
    clear_incoming,
    incoming_files,
    incoming_folder,
    merge_incoming,
    note_retrain,
    pending_retrain,
    recover,
    rollback_merge,
    workspace_lock,
)

DATA_DIR = "data"
DATA_DVC = "data.dvc"  # the pointer `dvc add data` writes
TRAIN_REPORT = Path("reports/train.json")
RELEASE_REPORT = Path("reports/release.json")
CURE_REPORT = Path("reports/cure.json")  # the cure stage's: skipped, or the before/after table
CURE_RAN = ("cured", "not cured")  # its statuses when it trained a model (else "skipped")
INCOMING_REPORT = Path(
    "reports/incoming.json"
)  # `cnnops check-incoming`'s, read for the artifact and messages
REFERENCE = ("--prepared", "prepared", "--validation", "reports/validation.json")  # dvc.yaml's outs
MAX_LISTED = 20  # bad files a message or artifact names; the report lists all
VERSIONED_FILES = (DATA_DVC, "dvc.lock")
CHECK_STAGE = "validate"  # retrain versions new data, and clears the incoming folder, once it passed
# Stages and `dvc add` stop after orchestrate.stage_timeout. The record's tasks (tagging the MLflow run,
# the git commit) get a fixed ten minutes: they touch small files and one server, whatever the data.
RECORD_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain did; `changed` False means it found nothing new and ran nothing."""

    changed: bool
    reason: str
    data_version: str | None = None
    mlflow_run_id: str | None = None
    release: dict[str, Any] | None = None
    new_champion: bool = False
    git_commit: str | None = None
    incoming_check: str | None = None  # what check-incoming said of the batch, drift included
    cure: dict[str, Any] | None = None  # reports/cure.json when the cure ran (a failed audit, auto_cure)


def _retry_transient(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """Retry only what can succeed on a second try (see dvc_cli.TRANSIENT_ERRORS)."""
    try:
        state.result()
    except dvc_cli.TransientDvcError:
        return True
    except Exception:
        return False
    return False


@task(task_run_name="{stage}")  # timeout and retries: _stage_task
def run_stage(root: Path, stage: str) -> None:
    """One DVC stage, and only it: its upstream stages ran as the tasks before."""
    dvc_cli.run(["repro", "--single-item", stage], root, get_run_logger(), f"stage {stage!r}")


@task(task_run_name="check-incoming")  # timeout: _check_incoming
def check_incoming(root: Path, incoming: Path) -> None:
    """`cnnops check-incoming`: the incoming files checked, and compared with the training data, before
    any of them is merged; its report says which files may be."""
    args = ["check-incoming", str(incoming), "--data", DATA_DIR, *REFERENCE, "--report", str(INCOMING_REPORT)]
    dvc_cli.run(args, root, get_run_logger(), "check-incoming", module=dvc_cli.CNNOPS)


@task
def version_data(root: Path) -> str | None:
    """`dvc add data`: the new data version goes into data.dvc (and the DVC cache)."""
    dvc_cli.run(["add", DATA_DIR], root, get_run_logger(), "dvc add data")
    return data_version(root / DATA_DVC)


@task(timeout_seconds=RECORD_TIMEOUT_SECONDS)
def tag_mlflow_run(tracking_params: TrackingParams, run_id: str, tags: dict[str, str], root: Path) -> None:
    """Point the MLflow run at this flow run (and its data version), so each record leads to the other.
    A relative local store is the workspace's (where DVC ran the stages), not this process's cwd."""
    runs.tag_run(tracking_params, run_id, tags, root)


@task(timeout_seconds=RECORD_TIMEOUT_SECONDS)
def commit_versions(root: Path, branch: str, message: str) -> str:
    commit = gitops.commit_to_branch(root, branch, VERSIONED_FILES, message)
    get_run_logger().info("committed %s to branch %s as %s", ", ".join(VERSIONED_FILES), branch, commit[:12])
    return commit


def _params(root: Path) -> Params:
    check_workspace(root)
    return load_params(root / "params.yaml")


def _stage_task(orchestrate: OrchestrateParams) -> Task[..., None]:
    """`run_stage` retried only on transient failures, and stopped after orchestrate.stage_timeout."""
    return run_stage.with_options(
        retries=orchestrate.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=orchestrate.retry_delay),
        retry_condition_fn=_retry_transient,
        timeout_seconds=orchestrate.stage_timeout,
    )


def _run_stages(root: Path, orchestrate: OrchestrateParams, stages: list[str]) -> None:
    stage_task = _stage_task(orchestrate)
    for stage in stages:
        stage_task(root, stage)


def _pipeline(root: Path, target: str | None = None) -> list[str]:
    """The stages of dvc.yaml (up to `target`) in order."""
    stages = dvc_cli.pipeline_stages(root, target)
    get_run_logger().info("pipeline: %s", " -> ".join(stages))
    return stages


def _check_new_data(root: Path, orchestrate: OrchestrateParams, stages: list[str], logger: Logger) -> int:
    """Run the stages up to CHECK_STAGE before data/ gets a new version; returns how many ran.

    If one of them fails (or the run is stopped), the merge is rolled back: data/ is as data.dvc has
    it, the incoming originals are still there, and no version holds the files that failed.
    """
    if CHECK_STAGE not in stages:
        raise StageInputError(
            f"dvc.yaml has no {CHECK_STAGE!r} stage: retrain checks new data with it before versioning "
            "it; put the stage back"
        )
    checks = stages[: stages.index(CHECK_STAGE) + 1]
    try:
        _run_stages(root, orchestrate, checks)
    except BaseException:
        rollback_merge(root, root / DATA_DIR, logger)
        raise
    return len(checks)


def _notify_failure(flow_: Any, flow_run: FlowRun, state: State) -> None:
    """on_failure and on_crashed hook: say which flow failed or crashed, where, and why (a failed
    run's message names the stage). A crashed run's hooks can run in the worker, outside the run,
    hence a logger made from the flow run."""
    logger = flow_run_logger(flow_run, flow_)
    try:
        params = _params(Path(flow_run.parameters.get("workspace", ".")).resolve())
    except Exception as exc:  # params themselves may be what failed: then there is no channel to use
        logger.error("no failure notification sent: the notification settings could not be read: %s", exc)
        return
    subject = f"cnnops {flow_.name} {state.name.lower()}: flow run {flow_run.name}"
    notify.send(params.orchestrate, "failure", subject, state.message or state.name, logger)


@contextmanager
def _workspace(root: Path, orchestrate: OrchestrateParams, lock_timeout: float | None) -> Iterator[None]:
    """Hold the workspace, then clear what a killed run left: a DVC still running, half-merged files."""
    logger = get_run_logger()
    timeout = orchestrate.lock_timeout if lock_timeout is None else lock_timeout
    with workspace_lock(root, timeout, str(current_flow_run.id), logger):
        dvc_cli.stop_orphans(root, logger)
        recover(root, root / DATA_DIR, logger)
        yield


@flow(name="reproduce", on_failure=[_notify_failure], on_crashed=[_notify_failure])
def reproduce(
    workspace: str = ".", target: str | None = None, lock_timeout: float | None = None
) -> list[str]:
    """Run the DVC pipeline in `workspace` (up to stage `target`); DVC skips stages up to date."""
    root = Path(workspace).resolve()
    params = _params(root)
    with _workspace(root, params.orchestrate, lock_timeout):
        stages = _pipeline(root, target)
        _run_stages(root, params.orchestrate, stages)
        return stages


@flow(name="retrain", on_failure=[_notify_failure], on_crashed=[_notify_failure])
def retrain(workspace: str = ".", lock_timeout: float | None = None) -> RetrainResult:
    """New data (in data/ or the incoming folder) -> validated, a new data version, pipeline, release, record.

    With nothing new it ends after one `dvc status`. New data is validated before it is versioned:
    if validate fails, the merge is rolled back and the incoming files stay where they are. It also
    finishes what an interrupted run left: stages out of date with dvc.lock (`dvc status` reports
    them) and a record not yet written (noted in PENDING_FILE, forgotten once the record is written).
    """
    root = Path(workspace).resolve()
    params = _params(root)
    orchestrate = params.orchestrate
    incoming = incoming_folder(root, orchestrate.incoming, root / DATA_DIR)
    logger = get_run_logger()
    with _workspace(root, orchestrate, lock_timeout):
        report = _check_incoming(root, orchestrate, incoming, logger) if incoming else None
        good = None if report is None else [incoming / p for p in report["good"]]
        merged = merge_incoming(root, incoming, root / DATA_DIR, logger, good) if incoming else MergeResult()
        pending = dvc_cli.status(root, logger)
        data_changed = DATA_DVC in pending or data_version(root / DATA_DVC) is None
        unrecorded = pending_retrain(root)  # an earlier run was stopped after its pipeline
        if not pending and not merged.copied and not unrecorded:
            if incoming:
                clear_incoming(root, merged, incoming, logger)
            version = data_version(root / DATA_DVC)
            reason = f"nothing new: data/ matches data.dvc ({version}) and every stage matches dvc.lock"
            if report and report["bad"]:
                reason += f"; {len(report['bad'])} bad incoming file(s) left in {incoming}"
            logger.info(reason)
            return RetrainResult(changed=False, reason=reason, data_version=version)
        reason = _describe(merged, data_changed, pending, unrecorded)
        logger.info("retraining: %s", reason)
        champion_before = unrecorded["champion_before"] if unrecorded else _champion(root)
        stages = _pipeline(root) if pending or merged.copied else []  # else only the record is missing
        checked = _check_new_data(root, orchestrate, stages, logger) if stages else 0
        timed = version_data.with_options(timeout_seconds=orchestrate.stage_timeout)
        version = timed(root) if data_changed else data_version(root / DATA_DVC)
        if incoming:
            clear_incoming(root, merged, incoming, logger)
        note_retrain(root, {"reason": reason, "champion_before": champion_before})
        _run_stages(root, orchestrate, stages[checked:])
        result = _record(root, params, reason, version, champion_before, _check_line(report))
        note_retrain(root, None)
    _announce_cure(orchestrate, result, logger)
    _announce_champion(orchestrate, result, logger)
    return result


def _check_incoming(
    root: Path, orchestrate: OrchestrateParams, incoming: Path, logger: Logger
) -> dict[str, Any] | None:
    """Run check-incoming on the incoming files (None: there are none) and publish its report as a
    markdown artifact, refused or not. A refused batch (a bad file in fail mode, drift past max_drift)
    fails the run here, before anything is merged; files skipped as bad are announced."""
    if not incoming_files(incoming, logger):
        return None
    path = root / INCOMING_REPORT
    path.unlink(missing_ok=True)  # never an earlier run's report
    try:
        check_incoming.with_options(timeout_seconds=orchestrate.stage_timeout)(root, incoming)
    finally:
        report = json.loads(path.read_text()) if path.exists() else None
        if report is not None:
            markdown = _incoming_markdown(report)
            create_markdown_artifact(
                key="incoming-check", markdown=markdown, description="cnnops check-incoming"
            )
    if report is None:
        raise StageInputError(f"{path}: `cnnops check-incoming` passed without writing its report")
    if report["bad"]:
        subject = f"cnnops retrain: {len(report['bad'])} bad incoming file(s) left in {incoming}"
        notify.send(orchestrate, "warning", subject, _bad_lines(report) + "\n" + _check_line(report), logger)
    return report


def _bad_lines(report: dict[str, Any]) -> str:
    lines = [f"{entry['path']}: {'; '.join(entry['reasons'])}" for entry in report["bad"][:MAX_LISTED]]
    more = len(report["bad"]) - MAX_LISTED
    return "\n".join(lines + ([f"and {more} more (see {INCOMING_REPORT})"] if more > 0 else []))


def _check_line(report: dict[str, Any] | None) -> str | None:
    """check-incoming's outcome in a line: files merged and left, and the drift figures."""
    if report is None:
        return None
    left = f", {len(report['bad'])} bad left in the incoming folder" if report["bad"] else ""
    return f"{report['new']} new file(s){left}; drift: {report['drift']['summary']}"


def _incoming_markdown(report: dict[str, Any]) -> str:
    """The check's report as markdown: outcome, drift per property, bad files (names escaped)."""
    drift = report["drift"]
    outcome = "passed" if report["success"] else "refused"
    counts = f"{report['new']} new file(s) to merge, {len(report['bad'])} bad"
    lines = [
        "# cnnops check-incoming",
        "",
        f"**{outcome}**: {counts} (on_bad_incoming: {report['on_bad_incoming']})",
    ]
    lines += ["", f"Drift: {_cell(drift.get('metric') or drift['summary'])}", ""]
    if drift.get("measured"):
        lines += [f"| property | KL divergence (max {drift['max_drift']:g}) | batch | training data |"]
        lines += ["| --- | --- | --- | --- |"]
        for name, p in drift["properties"].items():
            score = "inf" if p["kl_divergence"] is None else f"{p['kl_divergence']:.3f}"
            flag = " **past max_drift**" if p["exceeded"] else ""
            lines.append(f"| {name} | {score}{flag} | {_spread(p['batch'])} | {_spread(p['reference'])} |")
    if report["bad"]:
        lines += ["", "| bad file | why |", "| --- | --- |"]
        lines += [
            f"| {_cell(b['path'])} | {_cell('; '.join(b['reasons']))} |" for b in report["bad"][:MAX_LISTED]
        ]
    return "\n".join(lines) + "\n"


def _spread(summary: dict[str, Any]) -> str:
    """A property's distribution in a cell: median and 5th-95th percentiles, or value shares."""
    if "median" in summary:
        return f"median {summary['median']:.4g} ({summary['p5']:.4g} to {summary['p95']:.4g})"
    return _cell(", ".join(f"{value} {share:.0%}" for value, share in summary["shares"].items()))


def _cell(value: Any) -> str:
    """A table cell from untrusted text (file and class names): HTML-escaped, one line, no `|`."""
    text = html.escape(str(value)).replace("|", "/").replace("\n", " ")
    return text[:500]


def _describe(
    merged: MergeResult,
    data_changed: bool,
    pending: dict[str, list[object]],
    unrecorded: dict[str, Any] | None,
) -> str:
    parts = [f"finishing an interrupted retrain ({unrecorded['reason']})"] if unrecorded else []
    if merged.copied:
        parts.append(f"{len(merged.copied)} new file(s) merged from the incoming folder")
    if data_changed:
        parts.append("data/ differs from data.dvc")
    stages = [name for name in pending if name != "data.dvc"]
    if stages and not data_changed:
        why = "an interrupted run, a changed param or source"
        parts.append(f"stages out of date with dvc.lock: {', '.join(stages)} ({why})")
    return "; ".join(parts)


def _champion(root: Path) -> str | None:
    """The champion version the last release reported (None before any release): the cured model's
    when the cure ran, as its release came after the failed model's."""
    path = root / RELEASE_REPORT
    release = json.loads(path.read_text()) if path.exists() else {}
    return _latest_release(release, _cure(root, release.get("run_id"))).get("champion")


def _cure(root: Path, run_id: str | None) -> dict[str, Any] | None:
    """reports/cure.json when the cure trained a model from run `run_id` (the model the pipeline just
    trained); None when it was skipped, cured another run's model, or is not a stage of dvc.yaml."""
    path = root / CURE_REPORT
    report = json.loads(path.read_text()) if path.exists() else {}
    ran = report.get("status") in CURE_RAN and report.get("parent_run_id") == run_id
    return report if ran else None


def _latest_release(release: dict[str, Any], cure: dict[str, Any] | None) -> dict[str, Any]:
    """The last release decision: the cured model's when the cure released one, else `release`."""
    return (cure or {}).get("release") or release


def _record(
    root: Path,
    params: Params,
    reason: str,
    version: str | None,
    champion_before: str | None,
    incoming_check: str | None,
) -> RetrainResult:
    """Tag the MLflow run, commit the versions if asked, and publish the record as a markdown artifact."""
    logger = get_run_logger()
    run_id = runs.run_id_from_report(root / TRAIN_REPORT)
    release, cure = _read_json(root / RELEASE_REPORT), _cure(root, run_id)
    latest = _latest_release(release, cure)
    new_champion = bool(latest.get("promoted")) and latest.get("champion") != champion_before
    flow_run_tags = {
        "prefect.flow_run_id": str(current_flow_run.id),
        "prefect.flow_run_name": str(current_flow_run.name),
        "cnnops.data_version": version or "",
    }
    tag_mlflow_run(params.tracking, run_id, flow_run_tags, root)
    commit = None
    if params.orchestrate.git_commit:
        message = f"retrain: data {version}, MLflow run {run_id}, flow run {current_flow_run.id}"
        commit = commit_versions(root, params.orchestrate.git_branch, message)
    result = RetrainResult(True, reason, version, run_id, release, new_champion, commit, incoming_check, cure)
    create_markdown_artifact(
        key="retrain-record", markdown=_markdown(result), description="cnnops retrain record"
    )
    logger.info("record: %s", json.dumps(asdict(result), default=str))
    return result


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise StageInputError(f"{path} is missing after the pipeline ran: is `release` a stage of dvc.yaml?")
    return json.loads(path.read_text())


def _markdown(result: RetrainResult) -> str:
    release = result.release or {}
    decision = "challenger (not promoted)"
    if release.get("promoted"):
        decision = "champion (new)" if result.new_champion else "champion (already was)"
    rows = [
        ("data version (data.dvc md5)", result.data_version),
        ("why it ran", result.reason),
        ("MLflow run id", result.mlflow_run_id),
        ("registered model", f"{release.get('model_name')} v{release.get('version')}"),
        ("release decision", decision),
        ("release reason", release.get("reason")),
        (f"test {release.get('metric')}", release.get("score")),
        ("audit verdict", release.get("audit_verdict")),
        ("flow run", f"{current_flow_run.name} ({current_flow_run.id})"),
        ("git commit", result.git_commit or "off (orchestrate.git_commit)"),
        ("incoming check", result.incoming_check or "no incoming files"),
    ]
    lines = ["# cnnops retrain", "", "| item | value |", "| --- | --- |"]
    lines += [f"| {name} | {'-' if v is None else str(v).replace('|', '/')} |" for name, v in rows]
    if result.cure:
        lines += ["", f"## Cure: {result.cure['status']}", "", cure_table(result.cure).rstrip("\n")]
    return "\n".join(lines) + "\n"


def cure_table(cure: dict[str, Any]) -> str:
    """The cure's before/after in markdown: test figures, audit verdict, every finding's flip rate
    (deletion: its gap) against its control, and the cured model's release decision. Class names
    are untrusted (folder names): escaped by _cell."""
    before, after = cure["before"], cure["after"]
    lines = ["| | before | after |", "| --- | --- | --- |"]
    lines += [f"| test {key} | {before[key]:.4f} | {after[key]:.4f} |" for key in ("accuracy", "macro_f1")]
    lines.append(f"| audit verdict | {before['audit_verdict']} | {after['audit_verdict']} |")
    for f in cure["findings"]:
        still = " (still fails)" if f["fails_after"] else ""
        name = _cell(f"class '{f['class']}' {f['test']}")
        lines.append(f"| {name} | {rates_text(f['before'])} | {rates_text(f['after'])}{still} |")
    release = cure.get("release")
    if release:
        outcome = "champion" if release["promoted"] else "challenger"
        lines += ["", f"Cured model {_cell(release['model_name'])} v{release['version']}: **{outcome}**, "]
        lines[-1] += _cell(release["reason"])
    else:
        lines += ["", "Cured model: not released (the cure stopped before its release)"]
    return "\n".join(lines) + "\n"


def _announce_cure(orchestrate: OrchestrateParams, result: RetrainResult, logger: Logger) -> None:
    """The audit failed and the cure ran: say whether it cured the model, with the before/after table."""
    cure = result.cure
    if not cure:
        return
    release = cure.get("release") or {}
    outcome = "champion" if release.get("promoted") else "challenger"
    subject = (
        f"cnnops retrain: the audit failed; cure: {cure['status']}, cured model "
        f"v{release.get('version')} is {outcome}"
    )
    body = f"{cure_table(cure)}\nfailed MLflow run {cure['parent_run_id']}, cured run {cure['run_id']}"
    notify.send(orchestrate, "cure", subject, body, logger)


def _announce_champion(orchestrate: OrchestrateParams, result: RetrainResult, logger: Logger) -> None:
    if not result.new_champion:
        return
    release = _latest_release(result.release or {}, result.cure)
    subject = f"cnnops: {release.get('model_name')} v{release.get('version')} is the new champion"
    body = (
        f"{release.get('reason')}\nMLflow run {release.get('run_id')}, data version {result.data_version}, "
        f"flow run {current_flow_run.name}"
    )
    if result.incoming_check:
        body += f"\nincoming check: {result.incoming_check}"
    notify.send(orchestrate, "champion", subject, body, logger)
