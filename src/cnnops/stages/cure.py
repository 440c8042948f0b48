"""`cnnops cure`: a model that failed its audit, retrained so the shortcut it found stops paying.

The audit's findings say what the model reads (a place, a tone) and prove it by an intervention.
The cure trains a new model with that intervention as augmentation (`training.counterfactual`),
through train's own loop, then evaluates and audits it with the evaluate and audit stages, and
writes the before/after table to reports/cure.json. The cured model's MLflow run is tagged with
the failed model's run and the findings it addressed.

It refuses, by name and without writing a model, to cure a model whose audit passed, an audit of
another model, or findings it has no counterfactual for. With `cure.enabled` false it only writes
a skipped report, so `dvc repro` can hold the stage and run it only when asked.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnops import atomic
from cnnops.config import Params
from cnnops.data.digest import file_sha256
from cnnops.data.splits import PreparedSplit
from cnnops.errors import StageInputError
from cnnops.stages import audit, evaluate, release, train
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import counterfactual, counterfactual_plan

log = logging.getLogger(__name__)
TAG_LIMIT = (
    5000  # MLflow tag values are bounded (5000 characters in older stores): the findings tag is cut there
)


@dataclass(frozen=True)
class CurePaths:
    """The stage's inputs (the failed model and its audit) and outputs (the cured model and its reports)."""

    audit_report: Path = path_arg("reports/audit.json", "the failed audit", POSITIONAL)
    model: Path = path_arg("models/model.pt", "the failed model's checkpoint")
    train_report: Path = path_arg("reports/train.json", "its train report (MLflow run id)")
    metrics: Path = path_arg("reports/metrics.json", "its evaluate metrics (the 'before' figures)")
    prepared: Path = path_arg("prepared", "prepare's output folder")
    validation: Path | None = path_arg("reports/validation.json", "validate report, for the re-audit")
    data: Path | None = path_arg("data", "data folder holding annotations.csv, for the re-audit")
    out: Path = path_arg("models/cured.pt", "the cured model's checkpoint", "--out")
    report: Path = path_arg("reports/cure.json", "the before/after table")
    folder: Path = path_arg("reports/cure", "the cured model's train, evaluate and audit outputs")
    state: Path = path_arg(".cnnops/cure/state.pt", "resume state of the cure's training")


@dataclass(frozen=True)
class CureResult:
    report: dict[str, Any]  # what `paths.report` holds
    run_id: str | None  # the cured model's MLflow run (None: skipped)


def run(params: Params, paths: CurePaths = CurePaths()) -> CureResult:
    """Cure the model `paths.audit_report` failed: train, evaluate and audit a new one."""
    c = params.cure
    if not c.enabled:
        report = {"status": "skipped", "reason": "cure.enabled is false"}
        atomic.write_json(paths.report, report)
        log.info("cure: skipped (cure.enabled is false)")
        return CureResult(report, None)
    failed = _failed_audit(paths)
    model, parent = runs.load_run_model(paths.model, paths.train_report)
    _same_model(failed, paths, parent)
    before = _json(paths.metrics, "run `cnnops evaluate` on the failed model first")
    split = PreparedSplit.load(paths.prepared, "train")
    plan = counterfactual_plan.plan(
        failed, split, tuple(model.spec.image_size), params.audit.batch_size, params.base.seed,
        lambda: {name: d.exemplars for name, d in audit.recurring(params, _failed_paths(paths)).items()},
    )  # fmt: skip
    if not plan.cues:
        raise StageInputError(f"{paths.audit_report}: no finding the cure can act on: {_whys(plan)}")
    for left in plan.not_addressed:
        log.warning("cure: class '%s' %s is not addressed: %s", left["class"], left["test"], left["why"])
    augment = counterfactual.Counterfactual(plan.cues, c.rate)
    trained = train.run(
        _training_params(params),
        _train_paths(paths),
        train.Retraining(augment, model if c.mode == "head" else None),
    )
    assert trained.run_id is not None  # one process: rank 0
    evaluated = evaluate.run(params, _evaluate_paths(paths))
    audited = audit.run(params, _audit_paths(paths))
    report = _table(params, paths, failed, plan, augment, before, evaluated, audited, trained.report)
    atomic.write_json(paths.report, report)
    _track(params, parent, trained.run_id, plan, report)
    log.info("cure: re-audit %s (%s)", audited.report.decision.verdict.upper(), paths.report)
    return CureResult(report, trained.run_id)


def _failed_audit(paths: CurePaths) -> dict[str, Any]:
    """The audit report, refused unless its verdict is fail."""
    document = release.audit_document(paths.audit_report)
    if document["verdict"] != "fail":
        raise StageInputError(
            f"{paths.audit_report}: the audit's verdict is '{document['verdict']}', not 'fail': there is "
            "no proven shortcut to cure (cure runs only on a failed audit)"
        )
    return document


def _same_model(document: dict[str, Any], paths: CurePaths, run_id: str) -> None:
    """Refuse an audit of another model than the checkpoint and train report given."""
    audited, digest = document.get("run_id"), document.get("checkpoint_sha256")
    if audited is None or digest is None:
        raise StageInputError(
            f"{paths.audit_report}: records no run_id or checkpoint_sha256, so which model it audited "
            "is unknown; re-run `cnnops audit`"
        )
    if audited != run_id:
        raise StageInputError(
            f"{paths.audit_report}: is the audit of MLflow run {audited}, but {paths.train_report} names "
            f"run {run_id}: it audited another model; re-run `cnnops audit` on {paths.model}"
        )
    if digest != file_sha256(paths.model):
        raise StageInputError(
            f"{paths.audit_report}: audited a checkpoint of SHA-256 {digest[:12]}…, not {paths.model}: it "
            "audited another model; re-run `cnnops audit`"
        )


def _whys(plan: counterfactual_plan.Plan) -> str:
    return "; ".join(f"class '{n['class']}' {n['test']}: {n['why']}" for n in plan.not_addressed)


def _json(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageInputError(f"{path}: not found; {fix}")
    return json.loads(path.read_text())


def _training_params(params: Params) -> Params:
    """train's params with the cure's epochs; head-only: class-balanced batches (the DFR recipe)."""
    update: dict[str, Any] = {"epochs": params.cure.epochs}
    if params.cure.mode == "head":
        update["class_weighting"] = "sampler"
    return params.model_copy(update={"train": params.train.model_copy(update=update)})


def _train_paths(paths: CurePaths) -> train.TrainPaths:
    f = paths.folder
    return train.TrainPaths(
        prepared=paths.prepared, model=paths.out, report=f / "train.json", history=f / "history.csv",
        curves=f / "history.png", state=paths.state, summary=f / "model_summary.md",
    )  # fmt: skip


def _failed_paths(paths: CurePaths) -> audit.AuditPaths:
    """The failed model's audit inputs (its recurring patches are found again from them)."""
    return audit.AuditPaths(
        model=paths.model, prepared=paths.prepared, train_report=paths.train_report, data=paths.data
    )


def _evaluate_paths(paths: CurePaths) -> evaluate.EvaluatePaths:
    f = paths.folder
    return evaluate.EvaluatePaths(
        model=paths.out, prepared=paths.prepared, train_report=f / "train.json", metrics=f / "metrics.json",
        confusion=f / "plots" / "confusion.csv", confusion_png=f / "plots" / "confusion.png",
    )  # fmt: skip


def _audit_paths(paths: CurePaths) -> audit.AuditPaths:
    f = paths.folder
    return audit.AuditPaths(
        model=paths.out, prepared=paths.prepared, train_report=f / "train.json", validation=paths.validation,
        data=paths.data, report=f / "audit.json", gallery=f / "audit",
    )  # fmt: skip


def _table(
    params: Params,
    paths: CurePaths,
    failed: dict[str, Any],
    plan: counterfactual_plan.Plan,
    augment: counterfactual.Counterfactual,
    before: dict[str, Any],
    evaluated: evaluate.EvaluateResult,
    audited: audit.AuditResult,
    cured_train: dict[str, Any],
) -> dict[str, Any]:
    """reports/cure.json: what was cured how, and the before/after of the test figures and of every
    finding's flip rate against its control."""
    after_audit = json.loads((paths.folder / "audit.json").read_text())
    still = {(f["class"], f["test"]) for f in after_audit["failures"]}
    parent_train = _json(paths.train_report, "run `cnnops train`")
    return {
        "status": "cured" if after_audit["verdict"] == "pass" else "not cured",
        "parent_run_id": failed["run_id"],
        "run_id": cured_train["run_id"],
        "model": str(paths.out),
        "mode": params.cure.mode,
        "rate": params.cure.rate,
        "epochs": params.cure.epochs,
        "counterfactuals": augment.describe(),
        "addressed": list(plan.addressed),
        "not_addressed": list(plan.not_addressed),
        "before": _figures(before, failed["verdict"], parent_train),
        "after": _figures(evaluated.metrics, after_audit["verdict"], cured_train),
        "findings": [
            {
                "class": f["class"],
                "test": f["test"],
                "before": _rates(failed, f["class"], f["test"]),
                "after": _rates(after_audit, f["class"], f["test"], patches=False),
                "fails_after": (f["class"], f["test"]) in still,
            }
            for f in failed["failures"]
        ],
    }


def _figures(metrics: dict[str, Any], verdict: str, trained: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "audit_verdict": verdict,
        "train_seconds": trained.get("train_seconds"),
    }


def _rates(document: dict[str, Any], cls: str, test: str, patches: bool = True) -> dict[str, float] | None:
    """A finding's figures in an audit report: flip rate and control (deletion: its gap); None where
    that audit has no such test. `patches` false (the re-audit): a recurring patch is rediscovered on
    each model, so patch <i> of another audit is another patch: None."""
    figures = document["classes"].get(cls, {})
    kind, _, place = test.partition(":")
    if kind == "deletion":
        return {"gap": figures["deletion"]["gap"]}
    found = {
        "transplant_top": lambda: figures["transplant_top"],
        "transplant_tone": lambda: figures["transplant_tone"],
        "transplant": lambda: figures["transplant_regions"].get(place),
        "transplant_mean": lambda: figures["transplant_regions_mean"].get(place),
        "property": lambda: figures.get("transplant_properties", {}).get(place),
    }.get(kind, lambda: None)()
    if kind == "patch" and patches:
        patch, _, where = place.partition(" at ")
        i = int(patch.removeprefix(counterfactual_plan.PATCH)) - 1
        found = figures["recurring"][i]["at_random_places" if where == "random places" else "at_own_place"]
    if not found:
        return None
    return {"flip_rate": found["flip_rate"], "control_flip_rate": found["control_flip_rate"]}


def _track(
    params: Params, parent: str, run_id: str, plan: counterfactual_plan.Plan, report: dict[str, Any]
) -> None:
    """Tag the cured model's run with its parent and the findings it addressed; the parent with its cure."""
    findings = "; ".join(f"class '{a['class']}' {a['test']}" for a in plan.addressed)
    with runs.continue_run(params.tracking, run_id):
        runs.set_tags(
            {
                "cnnops.cure.parent_run_id": parent,
                "cnnops.cure.findings": findings[:TAG_LIMIT],
                "cnnops.cure.status": report["status"],
            }
        )
        runs.log_dict(report, "cure/cure.json")
    with runs.continue_run(params.tracking, parent):
        runs.set_tags({"cnnops.cure.child_run_id": run_id})


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cure", help="retrain a model that failed its audit with counterfactuals built from its findings"
    )
    add_path_arguments(p, CurePaths)
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(CurePaths, args))
    return 0
