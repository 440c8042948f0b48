"""`cnnops cure`: a model that failed its audit, retrained so the shortcut it found stops paying.

The audit's findings say what the model reads (a place, a tone) and prove it by an intervention.
The cure trains a new model with that intervention as augmentation (`training.counterfactual`),
through train's own loop, then evaluates, audits, exports and releases it with those stages (a new
challenger with its own audit: release's champion rule is unchanged), and writes the before/after
table and the release decision to reports/cure.json. The cured model's MLflow run is tagged with
the failed model's run and the findings it addressed as soon as it is trained.

It refuses, by name and without writing a model, to cure a model whose audit passed, an audit of
another model, or findings it has no counterfactual for. dvc.yaml runs it with `--if-failed`: a
passing or inconclusive audit then gives a skipped report instead of a refusal, so `dvc repro`
never fails for want of a shortcut. Neither `cure.enabled` nor `orchestrate.auto_cure` set: a
skipped report, whatever the audit.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnops import atomic
from cnnops.audit import counterfactual_plan, cure_gallery
from cnnops.config import Params
from cnnops.data.digest import file_sha256
from cnnops.data.splits import PreparedSplit
from cnnops.errors import StageInputError
from cnnops.stages import audit, evaluate, export, release, train
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import counterfactual

log = logging.getLogger(__name__)
TAG_LIMIT = (
    5000  # MLflow tag values are bounded (5000 characters in older stores): the findings tag is cut there
)

# what cure.json keeps of the cured model's release report (reports/cure/release.json holds it all)
RELEASE_KEYS = (
    "model_name",
    "version",
    "run_id",
    "promoted",
    "reason",
    "champion",
    "audit_verdict",
    "metric",
    "score",
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
    out: Path = path_arg("models/cured/model.pt", "the cured model's checkpoint", "--out")
    report: Path = path_arg("reports/cure.json", "the before/after table and the release decision")
    folder: Path = path_arg(
        "reports/cure", "the cured model's train, evaluate, audit, export and release reports and model card"
    )
    state: Path = path_arg(".cnnops/cure/state.pt", "resume state of the cure's training")
    project: Path = Path(".")  # the git work tree whose state may hold the cured champion back (release)

    @property
    def onnx(self) -> Path:
        """The cured model's ONNX file, beside its checkpoint (a compressed copy goes there too)."""
        return self.out.with_suffix(".onnx")


@dataclass(frozen=True)
class CureResult:
    report: dict[str, Any]  # what `paths.report` holds
    run_id: str | None  # the cured model's MLflow run (None: skipped)


def run(params: Params, paths: CurePaths = CurePaths(), if_failed: bool = False) -> CureResult:
    """Cure the model `paths.audit_report` failed: train, evaluate, audit, export and release a new
    one. `if_failed` (dvc.yaml's `--if-failed`): a passing or inconclusive audit is skipped, not refused."""
    skipped = _skip_reason(params, paths, if_failed)
    if skipped:
        return _skipped(paths, skipped)
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
    c = params.cure
    augment = counterfactual.Counterfactual(plan.cues, c.rate)
    trained = train.run(
        _training_params(params),
        _train_paths(paths),
        train.Retraining(augment, model if c.mode == "head" else None),
    )
    assert trained.run_id is not None  # one process: rank 0
    _link(params, parent, trained.run_id, plan)  # before anything else can fail: the record links them
    evaluated = evaluate.run(params, _evaluate_paths(paths))
    audited = audit.run(params, _audit_paths(paths))
    report = _table(params, paths, failed, plan, augment, before, evaluated, trained.report)
    atomic.write_json(paths.report, {**report, "release": None})  # the table holds if export fails
    export.run(params, _export_paths(paths))
    released = release.run(params, _release_paths(paths))
    report["release"] = _decision(released)
    atomic.write_json(paths.report, report)
    page = cure_gallery.write_comparison(
        paths.folder / cure_gallery.PAGE, report, paths.model, paths.out, paths.prepared, params.audit
    )
    with runs.continue_run(params.tracking, trained.run_id):  # the before/after page on the cured run
        runs.log_files([page], "cure")
    _track(params, trained.run_id, report)
    log.info(
        "cure: re-audit %s; cured model v%s %s (%s)", audited.report.decision.verdict.upper(),
        released.version, "is the champion" if released.promoted else "stays a challenger", paths.report,
    )  # fmt: skip
    return CureResult(report, trained.run_id)


def _skip_reason(params: Params, paths: CurePaths, if_failed: bool) -> str:
    """Why the cure does not run ('' when it does): not asked to, or (`if_failed`) nothing to cure."""
    if not (params.cure.enabled or params.orchestrate.auto_cure):
        return "cure.enabled and orchestrate.auto_cure are false"
    if not if_failed:
        return ""
    verdict = release.audit_document(paths.audit_report)["verdict"]
    if verdict == "pass":
        return f"the audit passed ({paths.audit_report}): there is no proven shortcut to cure"
    if verdict == "inconclusive":
        return (
            f"the audit was inconclusive ({paths.audit_report}): no shortcut was proven, so there is "
            "nothing to cure (a class had too few correctly classified test images to audit)"
        )
    return ""


def _skipped(paths: CurePaths, reason: str) -> CureResult:
    """The skipped report, and the cured model's folders empty of an earlier cure's files (dvc.yaml's
    outputs must exist; a stale cured model beside a skipped report would pass for this one)."""
    for stale in (paths.out, paths.onnx):
        if stale.is_file():
            log.warning("cure: removing %s, an earlier cure's model: this run cures nothing", stale)
            stale.unlink()
    paths.out.parent.mkdir(parents=True, exist_ok=True)
    paths.folder.mkdir(parents=True, exist_ok=True)
    report = {"status": "skipped", "reason": reason}
    atomic.write_json(paths.report, report)
    log.info("cure: skipped (%s)", reason)
    return CureResult(report, None)


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
        "onnx": str(paths.onnx),
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


def _export_paths(paths: CurePaths) -> export.ExportPaths:
    f = paths.folder
    return export.ExportPaths(
        checkpoint=paths.out, prepared=paths.prepared, train_report=f / "train.json", out=paths.onnx,
        compressed_dir=paths.out.parent, report=f / "export.json", metrics=f / "metrics.json",
    )  # fmt: skip


def _release_paths(paths: CurePaths) -> release.ReleasePaths:
    """The cured model released like any other: its own audit, metrics and gallery, its own card."""
    f = paths.folder
    return release.ReleasePaths(
        onnx=paths.onnx, checkpoint=paths.out, prepared=paths.prepared, train_report=f / "train.json",
        audit_report=f / "audit.json", report=f / "release.json", project=paths.project,
        metrics=f / "metrics.json", validation=paths.validation, gallery=f / "audit", card=f,
    )  # fmt: skip


def _decision(released: release.ReleaseResult) -> dict[str, Any]:
    """The cured model's release in cure.json: its version, whether it took champion, and why."""
    return {key: released.report[key] for key in RELEASE_KEYS}


def _link(params: Params, parent: str, run_id: str, plan: counterfactual_plan.Plan) -> None:
    """Tag the cured model's run with its parent and the findings it addressed; the parent with its cure."""
    findings = "; ".join(f"class '{a['class']}' {a['test']}" for a in plan.addressed)
    with runs.continue_run(params.tracking, run_id):
        runs.set_tags({"cnnops.cure.parent_run_id": parent, "cnnops.cure.findings": findings[:TAG_LIMIT]})
    with runs.continue_run(params.tracking, parent):
        runs.set_tags({"cnnops.cure.child_run_id": run_id})


def _track(params: Params, run_id: str, report: dict[str, Any]) -> None:
    """The outcome on the cured model's run: cured or not, and the whole table."""
    with runs.continue_run(params.tracking, run_id):
        runs.set_tags({"cnnops.cure.status": report["status"]})
        runs.log_dict(report, "cure/cure.json")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cure", help="retrain a model that failed its audit with counterfactuals built from its findings"
    )
    add_path_arguments(p, CurePaths)
    p.add_argument(
        "--if-failed",
        action="store_true",
        help="a passing or inconclusive audit writes a skipped report instead of being refused (dvc.yaml's "
        "stage: `dvc repro` must not fail for want of a shortcut)",
    )
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(CurePaths, args), if_failed=args.if_failed)
    return 0
