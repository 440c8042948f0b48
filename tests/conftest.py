"""Shared test set-up: quiet, offline tools and per-session fixtures from the plugin modules."""

from __future__ import annotations

import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own store

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins: list[str] = ["fixtures_data", "fixtures_export", "fixtures_model", "fixtures_prefect"]
