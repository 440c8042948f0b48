"""Planted-cue pipelines through the real stages, shared per session by the audit v2 proof tests.

`run_case(root, case)` writes a planted copy (`cnnops.data.planted`) and runs the real validate,
prepare, train and audit stages on it with a real MLflow SQLite store; the ground truth of whether
the model learned the cue (`planted.cue_flip_rate`) is measured beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures_model import one_thread

from cnnops.config import Params, parse_params
from cnnops.data.planted import CueSpec, cue_flip_rate, make_planted
from cnnops.data.splits import PreparedSplit
from cnnops.models import load_classifier
from cnnops.stages import audit, prepare, train, validate


@dataclass(frozen=True)
class Case:
    """One planted pipeline: the cue, its data and the model that learns from it."""

    cue: str
    cued_class: str | None
    seed: int = 0
    source: str = "digits"
    model: str = "convnet"
    image_size: int = 32
    per_class: int | None = 60
    epochs: int = 4
    cue_args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Audited:
    root: Path
    spec: CueSpec
    report: dict[str, Any]
    result: audit.AuditResult
    params: Params
    cue_flips: float  # ground truth: share of other classes' test images the planted cue flips


def _params(root: Path, case: Case) -> Params:
    rgb = case.source in ("scenes", "photos", "tones")
    return parse_params(
        {
            "data": {"color_mode": "RGB" if rgb else "L", "near_duplicate_distance": 0},
            "prepare": {"image_size": [case.image_size, case.image_size]},
            "train": {
                "model": case.model, "epochs": case.epochs, "batch_size": 32, "label_smoothing": 0.0,
                "early_stopping_patience": None, "augment": {"random_resized_crop": False},
            },
            "audit": {"methods": ["gradcam"]},
            "tracking": {
                "uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts"),
                "experiment": "audit-v2-tests",
            },
        },
        "audit v2 test",
    )  # fmt: skip


def run_case(root: Path, case: Case) -> Audited:
    """Plant, validate, prepare, train and audit `case` under `root`."""
    spec = make_planted(
        root / "data", case.cue, case.cued_class, source=case.source, seed=case.seed,
        image_size=case.image_size, per_class=case.per_class, **dict(case.cue_args),
    )  # fmt: skip
    params = _params(root, case)
    reports = root / "reports"
    validate.run(params, validate.ValidatePaths(root / "data", reports / "validation.json", reports / "docs"))
    prepare.run(params, prepare.PreparePaths(root / "data", root / "prepared", reports / "prepare.json"))
    tp = train.TrainPaths(
        prepared=root / "prepared", model=root / "models" / "model.pt", report=reports / "train.json",
        history=reports / "history.csv", curves=reports / "history.png", state=root / ".cnnops" / "state.pt",
    )  # fmt: skip
    paths = audit.AuditPaths(
        model=tp.model, prepared=root / "prepared", train_report=tp.report,
        validation=reports / "validation.json", data=root / "data", report=reports / "audit.json",
        gallery=reports / "audit",
    )  # fmt: skip
    with one_thread():
        train.run(params, tp)
        result = audit.run(params, paths)
    model, _ = load_classifier(tp.model)
    test = PreparedSplit.load(root / "prepared", "test")
    flips = cue_flip_rate(model, test, spec) if case.cued_class else 0.0
    return Audited(root, spec, json.loads(paths.report.read_text()), result, params, flips)
