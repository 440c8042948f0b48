"""The Prefect flows in ephemeral mode (Prefect's test harness) on a tiny real DVC workspace.

One full pipeline run serves the retrain tests (session fixture `retrained`); the failure tests stop
at the first stage, and the kill test re-runs export and release only. Real DVC, MLflow (SQLite in
the workspace) and Prefect; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil
import pytest
import yaml
from filelock import FileLock
from fixtures_prefect import (
    CLASSES,
    NEW_PER_CLASS,
    PER_CLASS,
    PROJECT,
    copy_workspace,
    flow_artifact,
    sh,
    tool_env,
    touch_export_params,
    write_params,
)
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL

from cnnops.errors import CnnopsError
from pipelines import dvc_cli
from pipelines.flows import RetrainResult, reproduce, retrain
from pipelines.workspace import LOCK_FILE, note_retrain, pending_retrain

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def task_runs(state: Any) -> dict[str, Any]:
    """The flow run's task runs by name."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return {run.name: run for run in runs}


def images(root: Path) -> int:
    return sum(1 for p in (root / "data").rglob("*.png"))


def test_new_images_give_a_new_model_and_a_release_decision(retrained) -> None:
    root, state = retrained["root"], retrained["state"]
    assert state.is_completed(), state.message
    result: RetrainResult = state.result()
    assert result.changed and "new file(s) merged" in result.reason
    assert images(root) == len(CLASSES) * (PER_CLASS + NEW_PER_CLASS)
    assert not any((root / "incoming").rglob("*.png")), "merged images are removed from incoming/"
    assert (root / "data.dvc").read_text() != retrained["data_dvc_before"]
    assert result.data_version and result.data_version in (root / "data.dvc").read_text()
    train = json.loads((root / "reports/train.json").read_text())
    release = json.loads((root / "reports/release.json").read_text())
    assert result.mlflow_run_id == train["run_id"] == release["run_id"]
    assert result.release == release and isinstance(release["promoted"], bool)
    assert dvc_cli.status(root, _quiet()) == {}, "the workspace is up to date after a retrain"


def test_retrain_is_recorded_in_prefect_and_mlflow(retrained) -> None:
    root, state = retrained["root"], retrained["state"]
    result: RetrainResult = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    [artifact] = [a for a in artifacts if a.key == "retrain-record"]
    assert artifact.type == "markdown" and "| MLflow run id |" in artifact.data
    for value in (result.data_version, result.mlflow_run_id, result.release["reason"], flow_run_id):
        assert str(value) in artifact.data
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert tags["cnnops.data_version"] == result.data_version
    runs = task_runs(state)
    assert {"version_data", "validate", "prepare", "train", "release"} <= {n.split("-")[0] for n in runs}


def test_retrain_commits_the_versions_to_a_branch_and_leaves_the_checkout(retrained) -> None:
    root, result = retrained["root"], retrained["state"].result()
    assert sh(root, "git", "rev-parse", "HEAD").strip() == retrained["head"], "HEAD did not move"
    assert sh(root, "git", "branch", "--show-current").strip() == "main"
    assert result.git_commit == sh(root, "git", "rev-parse", "cnnops/retrain").strip()
    for name in ("data.dvc", "dvc.lock"):
        assert sh(root, "git", "show", f"cnnops/retrain:{name}") == (root / name).read_text()
    assert sh(root, "git", "merge-base", "--is-ancestor", retrained["head"], "cnnops/retrain") == ""


def test_the_first_model_becomes_champion_and_is_announced(retrained) -> None:
    release = retrained["state"].result().release
    assert release["promoted"] and release["audit_verdict"] == "pass", release
    assert retrained["state"].result().new_champion
    events = [m["event"] for m in retrained["messages"]]
    assert events == ["champion"], "one message: the new champion, no failure"
    assert f"v{release['version']} is the new champion" in retrained["messages"][0]["subject"]


def test_on_clean_data_the_enabled_cure_stage_is_skipped(retrained) -> None:
    """The workspace sets `cure.enabled`; its audit passed, so the clean model is released uncured."""
    root = retrained["root"]
    cure = json.loads((root / "reports" / "cure.json").read_text())
    assert cure["status"] == "skipped" and cure["reason"].startswith("the audit passed"), cure
    assert not any((root / "models" / "cured").iterdir()) and (root / "reports" / "cure").is_dir()


def test_no_new_data_is_a_fast_skip(retrained, webhook) -> None:
    root = retrained["root"]
    lock_before = (root / "dvc.lock").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "reports").rglob("*.json")}
    _, messages = webhook
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    result: RetrainResult = state.result()
    assert not result.changed and result.reason.startswith("nothing new")
    assert result.data_version == retrained["state"].result().data_version
    assert task_runs(state) == {}, "nothing but the status check ran"
    assert (root / "dvc.lock").read_text() == lock_before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert messages == []


def test_a_record_an_interrupted_run_never_wrote_is_written_by_the_next(retrained, tmp_path: Path) -> None:
    root = copy_workspace(retrained["root"], tmp_path / "ws")
    # As left by a run stopped after its pipeline, before its record: the note, no tag, no artifact.
    note_retrain(root, {"reason": "2 new file(s) merged from the incoming folder", "champion_before": None})
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    result: RetrainResult = state.result()
    assert result.changed and result.reason.startswith("finishing an interrupted retrain (2 new file(s)")
    assert result.new_champion, "the champion it made was never announced"
    assert {name.rsplit("-", 1)[0] for name in task_runs(state)} == {"tag_mlflow_run", "commit_versions"}
    assert pending_retrain(root) is None


def test_a_waiting_run_goes_on_once_the_workspace_is_free(retrained) -> None:
    root = retrained["root"]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # filelock locks belong to a thread: hold and release in the same one
        with FileLock(root / LOCK_FILE):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    threading.Timer(2.0, release.set).start()
    started = time.monotonic()
    state = retrain(workspace=str(root), lock_timeout=60, return_state=True)
    holder.join()
    assert state.is_completed(), state.message
    assert time.monotonic() - started >= 2.0, "it waited for the holder"
    assert not state.result().changed
    assert "is busy" in _logs(state) and "waiting up to 60 s" in _logs(state)


def test_a_busy_workspace_refuses_a_second_run_with_a_clear_message(make_workspace, webhook) -> None:
    url, messages = webhook
    root = make_workspace(notify_webhook=url)
    messages.clear()
    holder = FileLock(root / LOCK_FILE)
    with holder:
        state = retrain(workspace=str(root), return_state=True)  # params: lock_timeout 0
    assert state.is_failed()
    assert "is busy" in state.message and "this run does nothing" in state.message
    assert task_runs(state) == {}
    assert images(root) == len(CLASSES) * PER_CLASS, "nothing was merged"
    assert [m["event"] for m in messages] == ["failure"]
    assert "is busy" in messages[0]["text"]


def test_a_bad_incoming_file_fails_the_run_before_anything_is_merged(make_workspace, webhook) -> None:
    url, messages = webhook
    root = make_workspace(notify_webhook=url)  # orchestrate.on_bad_incoming: fail
    data_dvc = (root / "data.dvc").read_text()
    # A name that reads like a transient error: the failure is still the data's, never retried.
    (root / "incoming" / CLASSES[0] / "Connection refused.png").write_text("not an image")
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_failed()
    assert "check-incoming failed" in state.message and "Connection refused.png" in state.message
    runs = task_runs(state)
    assert runs["check-incoming"].run_count == 1, "a data error is not retried"
    assert "validate" not in runs and "version_data" not in {n.split("-")[0] for n in runs}
    assert [m["event"] for m in messages] == ["failure"] and "Connection refused.png" in messages[0]["text"]
    assert "Connection refused.png" in flow_artifact(state, "incoming-check")
    assert images(root) == len(CLASSES) * PER_CLASS and (root / "data.dvc").read_text() == data_dvc
    assert "data.dvc" not in dvc_cli.status(root, _quiet())
    assert len(list((root / "incoming").rglob("*.png"))) == len(CLASSES) * NEW_PER_CLASS + 1


def test_a_stage_error_after_the_merge_rolls_it_back_without_retrying(make_workspace, webhook) -> None:
    url, messages = webhook
    root = make_workspace(notify_webhook=url)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["min_images_per_class"] = PER_CLASS + NEW_PER_CLASS + 1  # a check of the whole class
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data_dvc = (root / "data.dvc").read_text()
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_failed()
    assert "stage 'validate' failed" in state.message and "min_images_per_class" in state.message
    runs = task_runs(state)
    assert runs["validate"].run_count == 1 and runs["check-incoming"].run_count == 1
    assert "prepare" not in runs and "version_data" not in {n.split("-")[0] for n in runs}
    assert [m["event"] for m in messages] == ["failure"] and "validate" in messages[0]["text"]
    # The merge is rolled back: data/ is the versioned data, the incoming files are all still there.
    assert images(root) == len(CLASSES) * PER_CLASS and (root / "data.dvc").read_text() == data_dvc
    assert "data.dvc" not in dvc_cli.status(root, _quiet())
    assert len(list((root / "incoming").rglob("*.png"))) == len(CLASSES) * NEW_PER_CLASS


def new_digits(root: Path, target: Path, per_class: int = 3) -> None:
    """Digits neither data/ nor the first incoming batch held, into `target/<class>/`."""
    from cnnops.data.example import write_digits

    write_digits(root.parent / "more", scale=2, per_class=PER_CLASS + NEW_PER_CLASS + per_class)
    for name in CLASSES:
        (target / name).mkdir(parents=True, exist_ok=True)
        for image in sorted((root.parent / "more" / name).iterdir(), key=lambda p: int(p.stem))[-per_class:]:
            shutil.copy(image, target / name / image.name)


def test_skip_mode_merges_the_good_files_and_reports_drift(retrained, tmp_path: Path, webhook) -> None:
    url, messages = webhook
    root = copy_workspace(retrained["root"], tmp_path / "ws")
    write_params(root, notify_webhook=url, on_bad_incoming="skip")
    new_digits(root, root / "incoming")
    (root / "incoming" / CLASSES[1] / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_completed(), state.message
    assert images(root) == len(CLASSES) * (PER_CLASS + NEW_PER_CLASS + 3)
    assert [p.name for p in (root / "incoming").rglob("*.png")] == ["torn.png"], "the bad file stays"
    report = json.loads((root / "reports/incoming.json").read_text())
    assert report["drift"]["measured"] and report["drift"]["exceeded"] == []
    assert [b["path"] for b in report["bad"]] == [f"{CLASSES[1]}/torn.png"]
    artifact = flow_artifact(state, "incoming-check")
    assert "torn.png" in artifact and "| brightness |" in artifact
    assert "drift: KL divergence per property" in flow_artifact(state, "retrain-record")
    [warning] = [m for m in messages if m["event"] == "warning"]
    assert "1 bad incoming file(s)" in warning["subject"] and "torn.png" in warning["text"]
    assert "brightness" in warning["text"]


def test_a_drifted_batch_is_refused_with_its_figures(retrained, tmp_path: Path, webhook) -> None:
    url, messages = webhook
    root = copy_workspace(retrained["root"], tmp_path / "ws")
    write_params(root, notify_webhook=url)
    new_digits(root, root / "incoming")
    for path in (root / "incoming").rglob("*.png"):
        pixels = np.asarray(Image.open(path), dtype=np.float64)
        Image.fromarray(np.rint(pixels * 0.5 + 128).astype(np.uint8)).save(path)
    data_dvc = (root / "data.dvc").read_text()
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_failed()
    assert "drifted from the training data" in state.message and "brightness" in state.message
    assert set(task_runs(state)) == {"check-incoming"}
    assert (
        images(root) == len(CLASSES) * (PER_CLASS + NEW_PER_CLASS)
        and (root / "data.dvc").read_text() == data_dvc
    )
    assert "past max_drift" in flow_artifact(state, "incoming-check")
    assert [m["event"] for m in messages] == ["failure"] and "brightness" in messages[0]["text"]


def test_links_in_the_incoming_folder_are_refused_before_anything_is_merged(make_workspace) -> None:
    root = make_workspace()
    secret = root.parent / "secret.key"
    secret.write_bytes(b"private")
    (root / "incoming" / CLASSES[0] / "secret.png").symlink_to(secret)
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_failed()
    assert "incoming images must be regular files" in state.message
    assert f"secret.png (a symbolic link to {secret})" in state.message
    assert task_runs(state) == {} and images(root) == len(CLASSES) * PER_CLASS
    assert len(list((root / "incoming").rglob("*.png"))) == len(CLASSES) * NEW_PER_CLASS + 1


def test_an_incoming_folder_that_is_the_data_folder_is_refused(make_workspace) -> None:
    root = make_workspace(incoming="data")
    state = retrain(workspace=str(root), return_state=True)
    assert state.is_failed() and "orchestrate.incoming = 'data'" in state.message
    assert "is the data folder" in state.message
    assert images(root) == len(CLASSES) * PER_CLASS, "data/ is untouched"


def sleeping_workspace(root: Path, **orchestrate: Any) -> Path:
    """A DVC project whose one stage writes its pid to sleeper.pid and sleeps for two minutes."""
    root.mkdir()
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "dvc", "init", "-q")
    (root / "sleep.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path('sleeper.pid').write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    (root / "dvc.yaml").write_text("stages:\n  sleep:\n    cmd: python sleep.py\n")
    write_params(root, **orchestrate)
    return root


def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def gone(pid_file: Path) -> bool:
    try:
        return psutil.Process(int(pid_file.read_text())).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stage_past_its_timeout_is_stopped_and_not_retried(tmp_path: Path) -> None:
    root = sleeping_workspace(tmp_path / "ws", stage_timeout=3.0)
    state = reproduce(workspace=str(root), return_state=True)
    assert state.is_failed() and "timed out after 3.0 second" in state.message, state.message
    assert task_runs(state)["sleep"].run_count == 1, "a timeout is not retried"
    assert gone(root / "sleeper.pid") and not (root / dvc_cli.PID_FILE).exists(), "the stage was stopped"


def test_a_crashed_run_is_announced(tmp_path: Path, webhook) -> None:
    url, messages = webhook
    root = sleeping_workspace(tmp_path / "ws", notify_webhook=url)
    messages.clear()
    run = subprocess.Popen(  # a flow run's own process, as a worker starts it
        [sys.executable, "-m", "pipelines", "reproduce", "--workspace", str(root)],
        cwd=PROJECT,
        env=tool_env(PREFECT_API_URL=str(PREFECT_API_URL.value())),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _read_until(run, "> python sleep.py", timeout=120)
        wait_for_file(root / "sleeper.pid")
        run.terminate()  # SIGTERM, as a machine shutting down sends: the run crashes
        run.wait(timeout=60)
    finally:
        run.kill()
    assert [m["event"] for m in messages] == ["failure"], "the crash was announced"
    assert messages[0]["subject"].startswith("cnnops reproduce crashed: flow run ")
    assert gone(root / "sleeper.pid") and not (root / dvc_cli.PID_FILE).exists(), "the stage was stopped"


def test_lock_contention_is_retried_then_reported(make_workspace) -> None:
    root = make_workspace(retries=1, retry_delay=0.0)  # the template's, said here for the assert
    # A live process (this one) holding DVC's lock on the stage's output, as a concurrent
    # `dvc repro` started by hand would.
    holder = {"pid": os.getpid(), "cmd": "dvc repro (by hand)"}
    rwlock = {"write": {str(root / "reports/validation.json"): holder}}
    (root / ".dvc/tmp").mkdir(exist_ok=True)
    (root / ".dvc/tmp/rwlock").write_text(json.dumps(rwlock))
    state = reproduce(workspace=str(root), target="validate", return_state=True)
    assert state.is_failed()
    assert "stage 'validate' failed" in state.message and "dvc repro (by hand)" in state.message
    assert task_runs(state)["validate"].run_count == 2, "tried once, retried once (orchestrate.retries)"


def test_stages_come_in_dependency_order_from_dvc_yaml(workspace_template: Path) -> None:
    stages = dvc_cli.pipeline_stages(workspace_template)
    assert stages[:2] == ["validate", "prepare"] and len(stages) == len(set(stages))
    assert dvc_cli.pipeline_stages(workspace_template, target="prepare") == ["validate", "prepare"]
    with pytest.raises(CnnopsError, match=r"stage 'trian' is not in dvc.yaml; its stages are \["):
        dvc_cli.pipeline_stages(workspace_template, target="trian")


@pytest.mark.slow
def test_a_run_killed_mid_pipeline_is_finished_by_the_next_run(retrained, tmp_path: Path) -> None:
    root = copy_workspace(retrained["root"], tmp_path / "ws")
    touch_export_params(root)  # the pipeline from export on is out of date: cheap to run, twice
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "retrain", "--workspace", str(root)],
        cwd=PROJECT,
        env=tool_env(PREFECT_API_URL=str(PREFECT_API_URL.value())),  # the harness's API, like a worker's run
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = _read_until(first, "Running stage 'export'", timeout=600)
        # A second trigger while the first one runs the pipeline is refused, naming the holder.
        second = retrain(workspace=str(root), return_state=True)
        assert second.is_failed() and f"pid {first.pid}" in second.message and "is busy" in second.message
        assert task_runs(second) == {}
    finally:
        first.kill()  # SIGKILL to the flow's process: no clean-up of its own runs
        first.wait()
    assert first.returncode == -signal.SIGKILL, output
    assert (root / dvc_cli.PID_FILE).exists(), "it left the DVC process group it ran on record"

    third = retrain(workspace=str(root), return_state=True)
    assert third.is_completed(), third.message
    result: RetrainResult = third.result()
    assert result.changed and "stages out of date with dvc.lock: export" in result.reason
    assert not result.new_champion, "the same model: no second champion announcement"
    assert json.loads((root / "reports/release.json").read_text())["run_id"] == result.mlflow_run_id
    assert json.loads((root / "reports/export.json").read_text())
    assert not (root / dvc_cli.PID_FILE).exists()
    assert dvc_cli.status(root, _quiet()) == {}


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """The process's output up to the line holding `marker`; fails if it ends or times out first."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"{marker!r} never appeared; output:\n{''.join(lines)}")
    return "".join(lines)


def _logs(state: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the API in background batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return "\n".join(log.message for log in logs)


def _quiet():
    import logging

    return logging.getLogger("test")
