"""`cnnops cure`: a model that failed its audit, retrained so the shortcut it found stops paying.

The audit's findings say what the model reads (a place, a tone) and prove it by an intervention.
The cure trains a new model with that intervention as augmentation (`training.counterfactual`),
through train's own loop, then evaluates, audits, exports and releases it with those stages (a new
challenger with its own audit: release's champion rule is unchanged), and writes the before/after
table and the release decision to reports/cure.json. The cured model's MLflow run is tagged with
the failed model's run and the findings it addressed as soon as it is trained.

A re-audit that still fails starts another round, up to `cure.rounds`: the re-audit's findings on
the model it audited give more counterfactuals (a model cured of one end of a text line may read
its other end), and a new model is trained with every round's. The rounds stop at a re-audit that
does not fail, at the last round, or when a failing re-audit calls for nothing the training did not
already have. An inconclusive re-audit is no cure: it proves nothing, so the cure is `not cured`
(release keeps that model a challenger), and its rounds stop there (it has no failure to plan a
round from). Each round's run is linked to the one before; one round's model is exported and
released: the last, unless an earlier one's re-audit stands better (`_kept_round`). Each completed
round is kept (`training.cure_resume`, keyed by the cure's inputs), so a cure killed in round 2
resumes at round 2.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnops import atomic
from cnnops.audit import counterfactual_plan, cure_gallery
from cnnops.audit.verdict import COVERAGE
from cnnops.config import Params
from cnnops.data.digest import file_sha256
from cnnops.data.folder import ANNOTATIONS_FILE
from cnnops.data.splits import PreparedSplit, split_files
from cnnops.errors import StageInputError
from cnnops.models import Classifier
from cnnops.stages import audit, evaluate, export, release, train
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import counterfactual, cure_resume, resume

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


RESIDUAL_LEFT = "residual left"  # status: the re-audit passed, a significant residual on a cured class left


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
    state: Path = path_arg(
        ".cnnops/cure/state.pt", "resume state of the cure's training (its completed rounds beside it)"
    )
    project: Path = Path(".")  # the git work tree whose state may hold the cured champion back (release)

    @property
    def rounds(self) -> Path:
        """The completed rounds' records (`training.cure_resume`), beside the training's resume state."""
        return self.state.with_name(f"{self.state.stem}-rounds")

    @property
    def onnx(self) -> Path:
        """The cured model's ONNX file, beside its checkpoint (a compressed copy goes there too)."""
        return self.out.with_suffix(".onnx")


@dataclass(frozen=True)
class CureResult:
    report: dict[str, Any]  # what `paths.report` holds
    run_id: str | None  # the cured model's MLflow run (None: skipped)


def run(params: Params, paths: CurePaths = CurePaths(), if_failed: bool = False) -> CureResult:
    """Cure the model `paths.audit_report` failed: train, evaluate and re-audit a new one, in up to
    `cure.rounds` rounds, then export and release the best (`_kept_round`). `if_failed` (dvc.yaml's
    `--if-failed`): a passing or inconclusive audit is skipped, not refused."""
    if not (params.cure.enabled or params.orchestrate.auto_cure):
        return _skipped(paths, "cure.enabled and orchestrate.auto_cure are false")
    document = release.audit_document(paths.audit_report)  # read once: the skip check and the cure
    skipped = _skip_reason(document, paths) if if_failed else ""
    if skipped:
        return _skipped(paths, skipped)
    failed = _failed_audit(document, paths)
    model, parent = runs.load_run_model(paths.model, paths.train_report)
    _same_model(failed, paths, parent)
    before = _json(paths.metrics, "run `cnnops evaluate` on the failed model first")
    split = PreparedSplit.load(paths.prepared, "train")
    zero = _Round(0, counterfactual_plan.Plan((), (), ()), (), failed, model, parent)
    plan = _plan(params, failed, split, _failed_paths(paths), zero)
    if not plan.cues:
        raise StageInputError(f"{paths.audit_report}: no finding the cure can act on: {_whys(plan)}")
    for left in plan.not_addressed:
        log.warning("cure: class '%s' %s is not addressed: %s", left["class"], left["test"], left["why"])
    done, stopped = _rounds(params, paths, split, zero, plan)
    kept = _kept_round(params, paths, done)
    report = _table(params, paths, failed, done, kept, stopped, before)
    atomic.write_json(paths.report, {**report, "release": None})  # the table holds if export fails
    export.run(params, _export_paths(paths))
    released = release.run(params, _release_paths(paths))
    report["release"] = _decision(released)
    atomic.write_json(paths.report, report)
    page = cure_gallery.write_comparison(
        paths.folder / cure_gallery.PAGE, report, paths.model, paths.out, paths.prepared, params.audit
    )
    with runs.continue_run(params.tracking, kept.run_id):  # the before/after page on the cured run
        runs.log_files([page], "cure")
    _track(params, kept.run_id, report)
    cure_resume.clear(paths.rounds)
    log.info(
        "cure: %s after %d round(s) (%s); cured model (round %d's) v%s %s (%s)", report["status"],
        done[-1].number, stopped, kept.number, released.version,
        "is the champion" if released.promoted else "stays a challenger", paths.report,
    )  # fmt: skip
    return CureResult(report, kept.run_id)


@dataclass(frozen=True)
class _Round:
    """One round: the findings it acts on (of the audit before it: the failed one, then each re-audit),
    the model it trained with every round's counterfactuals so far, and that model's re-audit. Round 0
    is the failed model itself: its audit is the first round's input."""

    number: int
    plan: counterfactual_plan.Plan  # the cues this round adds and the findings they answer
    cues: tuple[counterfactual.Cue, ...]  # every cue it trained with (earlier rounds' first)
    audit: dict[str, Any]  # its model's audit report
    model: Classifier | None  # round 0's: the failed model, which a finetune or head-only round starts from
    run_id: str  # its model's MLflow run
    metrics: dict[str, Any] = field(default_factory=dict)  # its evaluate metrics
    trained: dict[str, Any] = field(default_factory=dict)  # its train report


def _rounds(
    params: Params, paths: CurePaths, split: PreparedSplit, failed: _Round, plan: counterfactual_plan.Plan
) -> tuple[list[_Round], str]:
    """Round after round until a re-audit neither fails nor leaves a residual (`_residual`),
    `cure.rounds` ran, or a re-audit calls for no counterfactual the training did not already have;
    (the failed model's round 0 and the rounds, why they stopped). The rounds a killed cure of the
    same inputs completed are taken back, not trained again."""
    done, key = [failed], _inputs_key(params, paths)
    resuming = True  # until the first round no record stands for
    while True:
        kept = _kept(params, paths, plan, done[-1], key) if resuming else None
        resuming = kept is not None
        done.append(kept or _round(params, paths, plan, done[-1], failed, key))
        stopped, plan = _next(params, paths, split, done)
        if stopped:
            return done, stopped + _continued(params, done)


def _next(
    params: Params, paths: CurePaths, split: PreparedSplit, done: list[_Round]
) -> tuple[str, counterfactual_plan.Plan]:
    """After the last of `done`: why the rounds stop ('' when they go on) and the next round's plan.
    A later round plans from the last re-audit's failures, or, when it passed, from its residual
    tests as if they were failures, on the model it audited (a recurring patch is found again on
    it), less the cues the training already had; it trains a new model with every round's cues."""
    last, nothing = done[-1], counterfactual_plan.Plan((), (), ())
    verdict, residual = last.audit["verdict"], _residual(params, done)
    if verdict == "inconclusive":
        # no failure, but a class too few images to look at: nothing proves the shortcut gone, and
        # nothing is left to plan another round from
        why = f"round {last.number}'s re-audit is inconclusive: no evidence the shortcut is gone"
        log.warning("cure: %s (%s)", why, _unaudited(last.audit))
        return f"{why} ({_unaudited(last.audit)})", nothing
    if verdict != "fail" and not residual:
        return f"round {last.number}'s re-audit is {verdict}", nothing
    why = f"round {last.number}'s re-audit fails"
    if verdict != "fail":
        why = f"round {last.number}'s re-audit is {verdict} with a residual: {_named(residual)}"
        log.info("cure: %s", why)
    if last.number == params.cure.rounds:
        if verdict != "fail":
            log.warning("cure: %s; cure.rounds is %d: the residual is left", why, params.cure.rounds)
        return f"{why} and cure.rounds is {params.cure.rounds}", nothing
    document = last.audit if verdict == "fail" else {**last.audit, "failures": list(residual)}
    used = {counterfactual_plan.cue_key(c) for c in last.cues}
    planned = _plan(params, document, split, _audit_paths(paths), done[0])
    plan = counterfactual_plan.beyond(planned, used, split.class_names)
    if not plan.cues:
        why = f"{why} but finds nothing new to act on: {_whys(plan)}"
        log.warning("cure: %s", why)
        return why, nothing
    return "", plan


def _continued(params: Params, done: list[_Round]) -> str:
    """The rounds a residual started, and by which tests ('' when none did): for `stopped`."""
    started = [(r.number, _residual(params, done[: i + 1])) for i, r in enumerate(done[1:])]
    return "".join(f"; round {n} was started by a residual: {_named(t)}" for n, t in started if t)


def _residual(params: Params, done: list[_Round]) -> tuple[dict[str, Any], ...]:
    """The last round's re-audit's residual tests (`counterfactual_plan.residuals`) on the classes the
    rounds acted on, at the audit's `significance`; none when it failed (its failures plan the next
    round). The audit's thresholds ask whether there is a shortcut at all; of a class known to have
    had one, a significant residual says the cure is not done."""
    last = done[-1]
    if last.audit["verdict"] == "fail":
        return ()
    cured = {a["class"] for r in done[1:] for a in r.plan.addressed}
    return counterfactual_plan.residuals(last.audit, cured, params.audit.significance)


def _kept_round(params: Params, paths: CurePaths, done: list[_Round]) -> _Round:
    """The round whose model is exported and released, its outputs put back in place when it is not
    the last: the best by `_standing`, the later of equals. A later round can be worse than the one
    before it (a counterfactual for a place its re-audit named can wipe out objects of a class);
    releasing only the last round's model would then throw the better one away."""
    kept = max(done[1:], key=lambda r: (_standing(params, done, r), r.number))
    if kept is not done[-1]:
        cure_resume.take_back(paths.rounds, kept.number, _outputs(paths))
        log.warning(
            "cure: round %d's model is kept, not round %d's: %s",
            kept.number, done[-1].number, _standing_words(params, done, kept),
        )  # fmt: skip
    return kept


def _standing(params: Params, done: list[_Round], r: _Round) -> tuple[bool, bool, int, float]:
    """How good round `r`'s model is, best highest: its re-audit passes with no residual on a cured
    class, it passes, how few of the failed audit's findings still fail on it, its test accuracy. A
    failed and an inconclusive re-audit rank alike: release refuses both."""
    passed = r.audit["verdict"] == "pass"
    clean = passed and not _residual(params, done[: r.number + 1])
    failing = {(f["class"], f["test"]) for f in r.audit["failures"]}
    still = sum((f["class"], f["test"]) in failing for f in done[0].audit["failures"])
    return clean, passed, -still, r.metrics["accuracy"]


def _standing_words(params: Params, done: list[_Round], kept: _Round) -> str:
    """Why `kept` ranks above the later rounds, in words: each one's re-audit, findings left, accuracy."""
    rows = []
    for r in (kept, *done[kept.number + 1 :]):
        _, _, still, accuracy = _standing(params, done, r)
        rows.append(
            f"round {r.number}: re-audit {r.audit['verdict']}, {-still} of the failed audit's findings "
            f"still fail, test accuracy {accuracy:.3f}"
        )
    return "; ".join(rows)


def _named(residual: tuple[dict[str, Any], ...]) -> str:
    """Residual tests in words: class, test, effect over its control and adjusted p-value."""
    return "; ".join(
        f"class '{t['class']}' {t['test']} {t['value']:.2f} over its control "
        f"(adjusted p {t['p_adjusted']:.3g})"
        for t in residual
    )


def _unaudited(document: dict[str, Any]) -> str:
    """The re-audit's warnings of classes too few images to audit, in its words."""
    return "; ".join(w["sentence"] for w in document["warnings"] if w["test"] == COVERAGE)


def _plan(
    params: Params,
    document: dict[str, Any],
    split: PreparedSplit,
    audited: audit.AuditPaths,
    failed: _Round,
) -> counterfactual_plan.Plan:
    """The counterfactuals `document`'s failures call for, on the model at `audited.model`, at the
    `failed` model's input size (every round's model is trained on its prepared split, at its size)."""
    assert failed.model is not None  # round 0 holds the failed model
    return counterfactual_plan.plan(
        document, split, tuple(failed.model.spec.image_size), params.audit.batch_size, params.base.seed,
        lambda: {name: d.exemplars for name, d in audit.recurring(params, audited).items()},
    )  # fmt: skip


def _round(
    params: Params,
    paths: CurePaths,
    plan: counterfactual_plan.Plan,
    previous: _Round,
    failed: _Round,
    key: str,
) -> _Round:
    """Train with `previous`'s cues and `plan`'s (from scratch; or from the `failed` model, every layer
    or its head only), link the run to `previous`'s, evaluate and re-audit the new model; keep the
    round (`cure_resume`)."""
    number, cues = _numbered(previous, plan)
    augment = counterfactual.Counterfactual(cues, params.cure.rate)
    mode = params.cure.mode
    start = None if mode == "retrain" else failed.model
    retraining = train.Retraining(augment, start, head_only=mode == "head")
    trained = train.run(_training_params(params), _train_paths(paths), retraining)
    assert trained.run_id is not None  # one process: rank 0
    _link(params, previous.run_id, trained.run_id, plan, number)  # before anything else can fail
    evaluate.run(params, _evaluate_paths(paths))
    audited = audit.run(params, _audit_paths(paths))
    log.info("cure: round %d's re-audit: %s", number, audited.report.decision.verdict.upper())
    record = {**_expected(params, plan, cues, previous, key), "run_id": trained.run_id}
    cure_resume.save(paths.rounds, number, record, _outputs(paths))
    return _finished(paths, number, plan, cues, trained.run_id)


def _kept(
    params: Params, paths: CurePaths, plan: counterfactual_plan.Plan, previous: _Round, key: str
) -> _Round | None:
    """The round after `previous` as a killed cure of the same inputs completed it, its model and
    reports back in place; None when no record stands for it."""
    number, cues = _numbered(previous, plan)
    expected = _expected(params, plan, cues, previous, key)
    record = cure_resume.restore(paths.rounds, number, expected, _outputs(paths))
    if record is None:
        return None
    log.info(
        "cure: round %d taken back from %s (MLflow run %s): not trained or re-audited again",
        number, paths.rounds / str(number), record["run_id"],
    )  # fmt: skip
    return _finished(paths, number, plan, cues, record["run_id"])


def _numbered(previous: _Round, plan: counterfactual_plan.Plan) -> tuple[int, tuple[counterfactual.Cue, ...]]:
    """The round after `previous`: its number and every cue it trains with (earlier rounds' first)."""
    return previous.number + 1, (*previous.cues, *plan.cues)


def _finished(
    paths: CurePaths,
    number: int,
    plan: counterfactual_plan.Plan,
    cues: tuple[counterfactual.Cue, ...],
    run_id: str,
) -> _Round:
    """A completed round, from the reports its train, evaluate and audit wrote (or a record put back)."""
    read = {
        name: json.loads((paths.folder / f"{name}.json").read_text())
        for name in ("audit", "metrics", "train")
    }
    return _Round(number, plan, cues, read["audit"], None, run_id, read["metrics"], read["train"])


def _expected(
    params: Params,
    plan: counterfactual_plan.Plan,
    cues: tuple[counterfactual.Cue, ...],
    previous: _Round,
    key: str,
) -> dict[str, Any]:
    """What a kept round must match: the cure's inputs, the round before's run and the round's plan."""
    described = counterfactual.Counterfactual(cues, params.cure.rate).describe()
    plan_record = {
        "addressed": plan.addressed,
        "not_addressed": plan.not_addressed,
        "counterfactuals": described,
    }
    return {"key": key, "parent_run_id": previous.run_id, "plan": plan_record}


def _inputs_key(params: Params, paths: CurePaths) -> str:
    """Hash of what the rounds depend on: the params the training, evaluate and audit read (not how
    many rounds may run, nor export's or release's) and the failed model's and data's files."""
    settings = params.model_dump(
        mode="json",
        exclude={"cure": {"rounds", "enabled"}, "orchestrate": True, "export": True, "release": True},
    )
    inputs = [paths.audit_report, paths.model, paths.train_report, paths.validation]
    inputs += [*(p for name in ("train", "val", "test") for p in split_files(paths.prepared, name))]
    if paths.data is not None:
        inputs.append(paths.data / ANNOTATIONS_FILE)
    return resume.fingerprint(settings, [p for p in inputs if p is not None and p.is_file()])


def _outputs(paths: CurePaths) -> cure_resume.Outputs:
    return cure_resume.Outputs(paths.out, paths.folder)


def _skip_reason(document: dict[str, Any], paths: CurePaths) -> str:
    """Why `--if-failed` skips the cure ('' when it runs): the audit proved no shortcut."""
    verdict = document["verdict"]
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


def _failed_audit(document: dict[str, Any], paths: CurePaths) -> dict[str, Any]:
    """The audit report, refused unless its verdict is fail."""
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
    done: list[_Round],
    kept: _Round,
    stopped: str,
    before: dict[str, Any],
) -> dict[str, Any]:
    """reports/cure.json: what was cured how, the before/after of the test figures and of every
    finding's flip rate against its control (the `kept` round's model against the failed one), and
    each round's own. A pass with a residual left on a cured class (`cure.rounds` ran out) is not
    `cured` but `RESIDUAL_LEFT`, the tests in `residual`."""
    upto = done[: kept.number + 1]  # the rounds the kept model was trained by
    residual = _residual(params, upto)
    parent_train = _json(paths.train_report, "run `cnnops train`")
    status = "not cured" if kept.audit["verdict"] != "pass" else RESIDUAL_LEFT if residual else "cured"
    return {
        "status": status,
        "parent_run_id": failed["run_id"],
        "run_id": kept.run_id,
        "kept_round": kept.number,
        "model": str(paths.out),
        "onnx": str(paths.onnx),
        "mode": params.cure.mode,
        "rate": params.cure.rate,
        "epochs": params.cure.epochs,
        "max_rounds": params.cure.rounds,
        "stopped": stopped,
        "residual": list(residual),
        "counterfactuals": counterfactual.Counterfactual(kept.cues, params.cure.rate).describe(),
        "addressed": [{**a, "round": r.number} for r in upto[1:] for a in r.plan.addressed],
        "not_addressed": [{**n, "round": r.number} for r in upto[1:] for n in r.plan.not_addressed],
        "before": _figures(before, failed["verdict"], parent_train),
        "after": _figures(kept.metrics, kept.audit["verdict"], kept.trained),
        "findings": _findings(failed, kept.audit),
        "rounds": [_round_row(params, done[: i + 1], r) for i, r in enumerate(done[1:])],
    }


def _round_row(params: Params, before: list[_Round], r: _Round) -> dict[str, Any]:
    """A round in cure.json: the findings of the audit before it, before and after, the residual tests
    of that audit it was started by (a pass's), the ones it acted on, its model's run (linked to the
    one before), re-audit verdict, test accuracy, training time."""
    previous = before[-1]
    return {
        "round": r.number,
        "run_id": r.run_id,
        "parent_run_id": previous.run_id,
        "residual": list(_residual(params, before)),
        "addressed": list(r.plan.addressed),
        "not_addressed": list(r.plan.not_addressed),
        "counterfactuals": counterfactual.Counterfactual(r.cues, params.cure.rate).describe(),
        "findings": _findings(previous.audit, r.audit),
        "audit_verdict": r.audit["verdict"],
        "accuracy": r.metrics["accuracy"],
        "train_seconds": r.trained.get("train_seconds"),
    }


def _findings(answered: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Every failure of the audit `answered` with its flip rate and control there and in `after`."""
    still = {(f["class"], f["test"]) for f in after["failures"]}
    return [
        {
            "class": f["class"],
            "test": f["test"],
            "before": _rates(answered, f["class"], f["test"]),
            "after": _rates(after, f["class"], f["test"], patches=False),
            "fails_after": (f["class"], f["test"]) in still,
        }
        for f in answered["failures"]
    ]


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


def _link(params: Params, parent: str, run_id: str, plan: counterfactual_plan.Plan, number: int) -> None:
    """Tag a round's run with its parent (the failed model's run, then the round before's), its round
    and the findings it newly addressed; the parent with its child."""
    findings = "; ".join(f"class '{a['class']}' {a['test']}" for a in plan.addressed)
    with runs.continue_run(params.tracking, run_id):
        runs.set_tags(
            {
                "cnnops.cure.parent_run_id": parent,
                "cnnops.cure.round": str(number),
                "cnnops.cure.findings": findings[:TAG_LIMIT],
            }
        )
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
