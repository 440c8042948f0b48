"""Planted-cue pipelines through the real stages, shared per session by the audit v2 proof tests.

`run_case(root, case)` writes a planted copy (`cnnops.data.planted`) and runs the real validate,
prepare, train and audit stages on it with a real MLflow SQLite store; the ground truth of whether
the model learned the cue (`planted.cue_flip_rate`) is measured beside it. Once a session per case:
`Case` is the key, so the cure's proofs (tests/test_cure.py) reuse the audit v2 proofs' pipelines.
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
    # audit params beside Grad-CAM (fewer images: ResNets); `severity` as (family, level) pairs
    audit_args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Audited:
    root: Path
    spec: CueSpec
    report: dict[str, Any]
    result: audit.AuditResult
    params: Params
    cue_flips: float  # ground truth: share of other classes' test images the planted cue flips


def case_params(root: Path, case: Case) -> Params:
    """The params of `case`'s pipeline: tiny, one model, Grad-CAM, a SQLite MLflow store under `root`."""
    rgb = case.source in ("scenes", "photos", "tones")
    return parse_params(
        {
            "data": {"color_mode": "RGB" if rgb else "L", "near_duplicate_distance": 0},
            "prepare": {"image_size": [case.image_size, case.image_size]},
            "train": {
                "model": case.model, "epochs": case.epochs, "batch_size": 32, "label_smoothing": 0.0,
                "early_stopping_patience": None, "augment": {"random_resized_crop": False},
            },
            "audit": {"methods": ["gradcam"], **{k: dict(v) if k == "severity" else v
                                                 for k, v in case.audit_args}},
            "tracking": {
                "uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts"),
                "experiment": "audit-v2-tests",
            },
        },
        "audit v2 test",
    )  # fmt: skip


@dataclass(frozen=True)
class Stages:
    """What `run_stages` ran: the train stage's result, the audit stage's, and the audit's paths."""

    trained: train.TrainResult
    audited: audit.AuditResult
    paths: audit.AuditPaths


def run_stages(root: Path, params: Params) -> Stages:
    """The real validate, prepare, train and audit stages on `root / 'data'`, outputs under `root`."""
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
        trained = train.run(params, tp)
        audited = audit.run(params, paths)
    return Stages(trained, audited, paths)


def plant(root: Path, case: Case) -> CueSpec:
    """`case`'s planted copy in `root / 'data'`."""
    return make_planted(
        root / "data", case.cue, case.cued_class, source=case.source, seed=case.seed,
        image_size=case.image_size, per_class=case.per_class, **dict(case.cue_args),
    )  # fmt: skip


_SESSION: dict[Case, Audited] = {}  # every case's run in this session (a minute or more each)


def run_case(root: Path, case: Case) -> Audited:
    """Plant, validate, prepare, train and audit `case` under `root`; a case equal to one already run
    this session returns that run, under its own root (`root` is then left empty)."""
    if case not in _SESSION:
        _SESSION[case] = _run_case(root, case)
    return _SESSION[case]


def _run_case(root: Path, case: Case) -> Audited:
    spec = plant(root, case)
    params = case_params(root, case)
    ran = run_stages(root, params)
    model, _ = load_classifier(ran.paths.model)
    test = PreparedSplit.load(root / "prepared", "test")
    flips = cue_flip_rate(model, test, spec) if case.cued_class else 0.0
    report = json.loads(ran.paths.report.read_text())
    return Audited(root, spec, report, ran.audited, params, flips)
