"""Deployments: `retrain` on the cron schedule of params.yaml, `reproduce` on demand.

Two ways to run them, same flows and schedule:
- `serve`: this process registers both deployments and runs their flow runs itself (no work pool);
  the schedule fires only with a Prefect server (PREFECT_API_URL): the ephemeral API has no scheduler.
- `deploy`: registers them on the Prefect server of PREFECT_API_URL for a process work pool; a
  `prefect worker start --pool <pool>` started in this project's environment runs them.
The schedule lives in params.yaml (orchestrate.schedule, orchestrate.timezone) and nowhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cnnops.config import OrchestrateParams, load_params
from cnnops.errors import CnnopsError, ConfigError
from pipelines.flows import reproduce, retrain

log = logging.getLogger(__name__)

CODE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding pipelines/ (the flows' source)
# Served deployments get a name of their own: re-registering a work-pool deployment under the same
# name from `serve` keeps its source storage, and its runs then fail to load the flow.
SERVED = "served"
ENTRYPOINTS = {"retrain": "pipelines/flows.py:retrain", "reproduce": "pipelines/flows.py:reproduce"}
ONE_RUN = 1  # concurrency limit of each deployment, kept by the Prefect server


def schedules(orchestrate: OrchestrateParams) -> list[Any]:
    """The retrain schedule as Prefect's cron schedule; a bad cron string or zone names the params key."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return [CronSchedule(cron=orchestrate.schedule, timezone=orchestrate.timezone)]
    except ValidationError as exc:
        problems = "; ".join(error["msg"] for error in exc.errors())
        raise ConfigError(
            f"params.yaml: orchestrate.schedule = {orchestrate.schedule!r} with orchestrate.timezone = "
            f"{orchestrate.timezone!r} is not a valid schedule ({problems}). Use five cron fields "
            "(e.g. '0 3 * * *' for 03:00 daily) and an IANA zone (e.g. UTC, Europe/Paris)"
        ) from None


def deployments(workspace: Path, pool: str | None = None) -> list[Any]:
    """The two deployments for `workspace`: served from this process (no pool), or from this checkout
    (CODE_ROOT) by a worker of the process work pool `pool`.

    Each allows one flow run at a time: the workspace lock keeps a machine's runs apart, and this
    limit, kept by the server, keeps apart the runs of one deployment on workers of several machines.
    """
    from prefect import Flow

    root = workspace.resolve()
    parameters = {"workspace": str(root)}
    retrain_schedules = schedules(load_params(root / "params.yaml").orchestrate)
    built = []
    for name, flow_ in (("retrain", retrain), ("reproduce", reproduce)):
        source = Flow.from_source(source=str(CODE_ROOT), entrypoint=ENTRYPOINTS[name]) if pool else flow_
        built.append(
            source.to_deployment(
                name=name if pool else SERVED,
                work_pool_name=pool,
                parameters=parameters,
                schedules=retrain_schedules if name == "retrain" else None,
                concurrency_limit=ONE_RUN,
            )
        )
    return built


def serve(workspace: Path) -> None:
    """Serve `retrain/served` (scheduled) and `reproduce/served` from this process until Ctrl-C."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    served = deployments(workspace)
    if not PREFECT_API_URL.value():
        log.warning(
            "no Prefect server configured (PREFECT_API_URL): the deployments can be run by hand, but "
            "Prefect's ephemeral API has no scheduler, so the retrain schedule will not fire. Start "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api for schedules"
        )
    prefect_serve(*served, limit=1)  # one flow run at a time from this process


def deploy(workspace: Path, pool: str) -> list[str]:
    """Register both deployments for the process work pool `pool`; returns their ids.

    The worker runs the flows from this checkout (CODE_ROOT) against `workspace`; both must be
    reachable from the worker's machine, so start the worker where the project lives.
    """
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise CnnopsError(
            "deploy registers deployments on a Prefect server, and none is configured: set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after `prefect server start`)"
        )
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise CnnopsError(
                f"work pool {pool!r} not found at {PREFECT_API_URL.value()}: create it with "
                f"`prefect work-pool create {pool} --type process`"
            ) from None
    ids = prefect_deploy(
        *deployments(workspace, pool),
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
    )
    return [str(deployment_id) for deployment_id in ids]
