"""Deployments on a real Prefect server: `prefect server start`, a process work pool, a worker.

Everything talks to the server through PREFECT_API_URL alone, the way a user points the project
at one. The worker runs the deployed retrain in a process of its own, against a tiny workspace;
then `python -m pipelines serve` runs a served deployment on the same server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import httpx
import mlflow
import pytest
import yaml
from fixtures_net import free_port
from fixtures_prefect import PROJECT, copy_workspace, tool_env, touch_export_params, write_params
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from cnnops.config import OrchestrateParams
from cnnops.errors import CnnopsError, ConfigError
from pipelines.deploy import schedules

POOL = "cnnops-test"


def prefect_env(home: Path, api: str) -> dict[str, str]:
    return tool_env(PREFECT_HOME=str(home), PREFECT_API_URL=api)


def wait_healthy(api: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer from {api}/health in {timeout:.0f} s")


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(1)


def final_state(client: SyncPrefectClient, flow_run_id: UUID) -> str | None:
    """The flow run's state type once it has ended, else None."""
    state = client.read_flow_run(flow_run_id).state
    return state.type.value if state is not None and state.is_final() else None


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, as a supervisor stops a service; killed if it has not ended in 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_cli(env: dict[str, str], *command: str, timeout: float = 300) -> str:
    proc = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_a_bad_schedule_names_the_params_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"orchestrate.schedule = 'every day'.*Invalid cron string.*five cron fields"
    ):
        schedules(OrchestrateParams.from_defaults(schedule="every day", timezone="UTC"))
    with pytest.raises(ConfigError, match=r"orchestrate.timezone = 'Mars/Olympus'.*Invalid timezone"):
        schedules(OrchestrateParams.from_defaults(schedule="0 3 * * *", timezone="Mars/Olympus"))


def test_each_deployment_runs_one_flow_run_at_a_time(tmp_path: Path) -> None:
    """Beside the workspace lock of one machine: the server keeps runs on several workers apart."""
    from pipelines.deploy import deployments

    write_params(tmp_path)
    for pool, names in ((None, ["served", "served"]), (POOL, ["retrain", "reproduce"])):
        built = deployments(tmp_path, pool)
        assert [(d.name, d.work_pool_name) for d in built] == [(name, pool) for name in names]
        assert [d.concurrency_limit for d in built] == [1, 1]
        assert [bool(d.schedules) for d in built] == [True, False], "retrain is scheduled, reproduce not"
        assert all(d.parameters == {"workspace": str(tmp_path.resolve())} for d in built)


def test_deploy_needs_a_server_and_an_existing_pool(workspace_template: Path, prefect_harness) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.deploy import deploy

    no_server = temporary_settings(updates={PREFECT_API_URL: ""})
    with pytest.raises(CnnopsError, match="none is configured: set PREFECT_API_URL"), no_server:
        deploy(workspace_template, POOL)
    missing = r"work pool 'missing' not found at .*prefect work-pool create missing"
    with pytest.raises(CnnopsError, match=missing):
        deploy(workspace_template, "missing")


@pytest.mark.slow
@pytest.mark.integration
def test_deployed_retrain_runs_on_a_server_through_a_process_worker(retrained, tmp_path: Path) -> None:
    root = copy_workspace(retrained["root"], tmp_path / "ws")
    touch_export_params(root)  # something to retrain for, cheaply: export and what follows
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["orchestrate"].update(schedule="30 2 * * 1", timezone="Europe/Paris")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = json.loads((root / "reports/export.json").read_text())
    api = f"http://127.0.0.1:{free_port()}/api"
    env = prefect_env(tmp_path / "prefect_home", api)
    prefect = str(Path(sys.executable).parent / "prefect")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", api.split(":")[-1].split("/")[0]],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(api, server)
        run_cli(env, prefect, "work-pool", "create", POOL, "--type", "process")
        run_cli(env, sys.executable, "-m", "pipelines", "deploy", "--pool", POOL, "--workspace", str(root))

        # Prefect's own client: it retries the 503 a busy server's SQLite answers with.
        with SyncPrefectClient(api) as client:
            _retrain_through_a_worker(client, env, prefect, root, before)
            _reproduce_served(client, env, root, tmp_path)
    finally:
        stop(server)
        log.close()


def _retrain_through_a_worker(
    client: SyncPrefectClient, env: dict[str, str], prefect: str, root: Path, before: dict
) -> None:
    deployment = client.read_deployment_by_name("retrain/retrain")
    assert deployment.work_pool_name == POOL
    assert deployment.parameters == {"workspace": str(root)}
    assert deployment.global_concurrency_limit.limit == 1, "one run of it at a time"
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 2 * * 1", "Europe/Paris")

    flow_run = client.create_flow_run_from_deployment(deployment.id)
    run_cli(env, prefect, "worker", "start", "--pool", POOL, "--run-once", "--limit", "1", timeout=900)

    state = client.read_flow_run(flow_run.id).state
    assert state.type.value == "COMPLETED", state.message
    assert json.loads((root / "reports/export.json").read_text()) != before, "export ran again"
    release = json.loads((root / "reports/release.json").read_text())
    tags = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(release["run_id"]).data.tags
    assert tags["prefect.flow_run_id"] == str(flow_run.id)
    artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    record = next(a for a in artifacts if a.key == "retrain-record")
    assert release["run_id"] in record.data and str(flow_run.id) in record.data


def _reproduce_served(client: SyncPrefectClient, env: dict[str, str], root: Path, tmp_path: Path) -> None:
    """The same deployments served by one process instead of a pool and a worker."""
    served = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "serve", "--workspace", str(root)],
        cwd=PROJECT,
        env=env,
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "being served" in (tmp_path / "serve.log").read_text(), "serve to start")
        deployment = client.read_deployment_by_name("reproduce/served")
        flow_run = client.create_flow_run_from_deployment(deployment.id)
        wait_for(lambda: final_state(client, flow_run.id) is not None, "the served flow run to end")
        assert final_state(client, flow_run.id) == "COMPLETED", (tmp_path / "serve.log").read_text()
    finally:
        stop(served)
