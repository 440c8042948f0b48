"""Shared test set-up: quiet, offline tools and per-session fixtures from the plugin modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own store

# Under pytest-xdist (scripts/test: two workers) each worker and the tools it starts get one thread,
# so two workers share the two cores instead of oversubscribing them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)

torch.set_num_threads(THREADS)

pytest_plugins: list[str] = ["fixtures_data", "fixtures_export", "fixtures_model", "fixtures_prefect"]

# Modules whose tests share an expensive session fixture: each set runs on one xdist worker, so the
# fixture is built once. Every other module runs whole on one worker, as `--dist loadfile` would.
SHARED_FIXTURES: dict[str, tuple[str, ...]] = {
    # tests/fixtures_audit.py `run_case`'s session cache: test_cure cures test_audit_v2's ConvNet
    # cases and clean digits, and the cure gallery shows test_cure's corner
    "audit_cases": ("test_audit_v2", "test_cure", "test_cure_gallery"),
    # tests/fixtures_prefect.py `workspace_template` and `retrained` (a DVC workspace run by the flow)
    "retrained": ("test_experiments", "test_pipelines_deploy", "test_pipelines_flows"),
}
GROUP_OF = {module: group for group, modules in SHARED_FIXTURES.items() for module in modules}
# Scheduled first, longest first (CI's --durations: each holds several 2-4 minute pipelines), so
# neither worker is left running one of them alone at the end; xdist's own order (most tests
# first) put the ResNet-18 proofs, five tests, near the end.
LONGEST_FIRST = (
    "audit_cases", "test_cue_kinds", "test_audit_resnet", "test_cure_pipeline", "retrained",
    "test_audit_properties", "test_photos_dvc", "test_transfer", "test_cure_accuracy",
)  # fmt: skip


def _scope(nodeid: str) -> str:
    """The module's group in SHARED_FIXTURES, or the module itself."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return GROUP_OF.get(module, module)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect LONGEST_FIRST's scopes first, in its order; the rest keep theirs."""
    rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_scope(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and unused) without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Send each group of SHARED_FIXTURES, and every other module, to one worker whole, in the
    collection's order (`pytest_collection_modifyitems`).

    By hand because `--dist loadgroup` cannot: xdist 3.8 tags each test's id with its group
    (`item._nodeid`), an attribute pytest 9 no longer reads, so every test went its own way.
    """
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order, not "most tests first"
    return SharedFixtureScheduling(config, log)
