"""Session fixtures for the Prefect flows: one test harness, a tiny DVC workspace, a webhook receiver.

`prefect_harness`: Prefect's test harness (a temporary API with its own database, 13-15 s to start),
shared by every flow test of the session. `workspace_template`: a git + DVC project with the
project's dvc.yaml and sources, tiny params (3 digit classes, 16x16, 8 tiny epochs) and `data/` versioned
in data.dvc; the pipeline has not run in it. Its `incoming/` holds NEW_PER_CLASS more images per
class for retrain to merge. Tests copy it with `make_workspace` and never change the template.
`webhook`: an HTTP server on 127.0.0.1 that records the JSON bodies posted to it.
`retrained`: the one full pipeline run of the session: `retrain` on a copy of the template (webhook
set), with what the tests need to check it. Tests that need a reproduced workspace copy its root
with `copy_workspace` and re-run only late stages (see `touch_export_params`).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cnnops.config import deep_merge

# Before anything imports prefect: a private home, no telemetry (measured: without these the
# ephemeral server logs "database is locked"). Set, not defaulted: xdist workers inherit the
# controller's environment, and two workers on one home share its database.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cnnops-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # each process its own
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ("0", "1", "2")
PER_CLASS = 20
NEW_PER_CLASS = 3
TINY_PARAMS: dict[str, Any] = {
    "data": {"color_mode": "L"},
    "validate": {"min_images_per_class": 5},
    "prepare": {"image_size": [16, 16], "val_fraction": 0.2, "test_fraction": 0.3},
    # 20 images a class, 30% test, 8 short epochs: every class gets at least 3 test images right,
    # so the audit has evidence for each class (fewer is inconclusive) and passes, and the first
    # release is a champion.
    "train": {"epochs": 8, "batch_size": 8, "warmup_epochs": 0},
    "audit": {"max_images_per_class": 4, "gallery_images_per_class": 2},
    "export": {"latency_runs": 5, "throughput_batch": 4},
    "orchestrate": {"incoming": "incoming", "retries": 1, "retry_delay": 0.0, "git_commit": True},
    # on: the retrain's passing audit shows the cure stage skipped on clean data (test_pipelines_flows)
    "cure": {"enabled": True},
}
GIT_ENV = {
    "GIT_AUTHOR_NAME": "cnnops tests",
    "GIT_AUTHOR_EMAIL": "tests@cnnops.invalid",
    "GIT_COMMITTER_NAME": "cnnops tests",
    "GIT_COMMITTER_EMAIL": "tests@cnnops.invalid",
}


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for git, dvc and flow subprocesses: this venv first on PATH, git identity set."""
    env = {**os.environ, **GIT_ENV, "DVC_NO_ANALYTICS": "1", **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def sh(root: Path, *command: str) -> str:
    proc = subprocess.run(command, cwd=root, env=tool_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {root}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def write_params(root: Path, **orchestrate: Any) -> None:
    """The project's params.yaml (DVC reads the keys dvc.yaml lists from the file itself) with
    TINY_PARAMS and then `orchestrate` on top, as the workspace's params.yaml."""
    params = deep_merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), TINY_PARAMS)
    params = deep_merge(params, {"orchestrate": orchestrate})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def workspace_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cnnops.data.example import write_digits

    root = tmp_path_factory.mktemp("workspace_template") / "ws"
    root.mkdir()
    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(PROJECT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(root)
    digits = root.parent / "digits"
    write_digits(digits, scale=2, per_class=PER_CLASS + NEW_PER_CLASS)
    for name in CLASSES:
        images = sorted((digits / name).iterdir(), key=lambda p: int(p.stem))
        for target, batch in (("data", images[:PER_CLASS]), ("incoming", images[PER_CLASS:])):
            (root / target / name).mkdir(parents=True)
            for image in batch:
                shutil.copy(image, root / target / name / image.name)
    (root / ".gitignore").write_text("/incoming/\n/mlflow.db\n/mlartifacts/\n")
    return init_project(root, "tiny cnnops workspace")


def init_project(root: Path, message: str) -> Path:
    """`root` as a git + DVC project on branch main: data/ tracked by data.dvc, all else committed."""
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "add", "-q", "data")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", message)
    return root


def copy_workspace(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def touch_export_params(root: Path) -> None:
    """Change a param only `export` reads, so the next retrain re-runs export (and what follows) only."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["export"]["latency_runs"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def retrained(workspace_template: Path, tmp_path_factory: pytest.TempPathFactory, webhook, prefect_harness):
    from pipelines.flows import retrain

    url, messages = webhook
    root = copy_workspace(workspace_template, tmp_path_factory.mktemp("retrained") / "ws")
    write_params(root, notify_webhook=url)
    sh(root, "git", "commit", "-q", "-am", "notify the test webhook")
    head = sh(root, "git", "rev-parse", "HEAD").strip()
    before = (root / "data.dvc").read_text()
    messages.clear()
    state = retrain(workspace=str(root), return_state=True)
    return {"root": root, "state": state, "head": head, "data_dvc_before": before, "messages": list(messages)}


@pytest.fixture
def make_workspace(workspace_template: Path, tmp_path: Path):
    """A fresh copy of the template (git history and DVC cache included); kwargs override orchestrate."""

    def make(name: str = "ws", **orchestrate: Any) -> Path:
        root = copy_workspace(workspace_template, tmp_path / name)
        if orchestrate:
            write_params(root, **orchestrate)
            sh(root, "git", "commit", "-q", "--allow-empty", "-am", "params for this test")
        return root

    return make


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.messages.append(json.loads(self.rfile.read(length) or b"{}"))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture(scope="session")
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(url, messages): every JSON body POSTed to url is appended to messages."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.messages = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", server.messages  # type: ignore[attr-defined]
    server.shutdown()


def flow_artifact(state: Any, key: str) -> str:
    """The markdown of the artifact `key` of the flow run that ended in `state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[str(state.state_details.flow_run_id)])
            )
        )
    [artifact] = [a for a in artifacts if a.key == key]
    return artifact.data
