"""`cnnops release`: register the exported model, then decide whether it becomes the champion.

Every release registers (once) a model version and points alias `challenger` at it. Alias
`champion` moves only when the audit verdict is `pass` (never `fail` or `inconclusive`), the
model's `release.metric` is at least `release.min_score`, its accuracy is significantly above
always answering the test split's largest class, and, when there is a champion, it beats the
champion by more than `release.margin` on the *current* test split with a significant McNemar
test on the two models' per-image correctness (the champion re-evaluated on that split through
ONNX Runtime exactly like the challenger). The decision, its reason and both tests are tags on the
version and the run and go to the report, and every version gets its model card
(`tracking.model_card`: Markdown and HTML, logged to its run and linked from the version). Running
it again changes nothing.

Only a reproducible run deploys: under `dvc exp run`, or from a git work tree with uncommitted
changes (DVC's own writes during repro aside), a model that earned champion stays challenger
and the report says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient

from cnnops import atomic
from cnnops.config import Params, ReleaseParams
from cnnops.data.digest import file_sha256
from cnnops.data.splits import PreparedSplit, split_files
from cnnops.errors import StageInputError
from cnnops.export.onnx_model import OnnxMetadata, infer, open_session, read_metadata
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import model_card, registry, runs
from cnnops.tracking.lineage import UNKNOWN, git_commit
from cnnops.training.metrics import classification_report, majority_baseline, mcnemar

log = logging.getLogger(__name__)

RESCORE_BATCH = 64  # test images per ONNX Runtime call when scoring challenger and champion


@dataclass(frozen=True)
class Scored:
    """A model's release figures on the test split: its metric, and which images it gets right."""

    score: float
    correct: np.ndarray  # bool, one per test image in split order (the paired test's input)
    figures: dict[str, float]  # test_accuracy, test_balanced_accuracy, test_macro_f1 of this model


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_score: float | None
    paired_test: dict[str, Any] | None = None  # McNemar's test against that champion (metrics.mcnemar)

    def as_tags(self, metric: str, score: float, verdict: str) -> dict[str, str]:
        return {
            "release.decision": "champion" if self.promoted else "challenger",
            "release.reason": self.reason,
            "release.metric": metric,
            "release.score": repr(score),  # repr round-trips exactly: a re-run reports the same numbers
            "release.compared_with": self.champion_version or "none",
            "release.champion_score": "none" if self.champion_score is None else repr(self.champion_score),
            "release.audit_verdict": verdict,
            # JSON keeps the floats exact (repr), so a re-run reports the same test
            "release.paired_test": json.dumps(self.paired_test),
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Decision:
        compared = tags["release.compared_with"]
        score = tags["release.champion_score"]
        return cls(
            promoted=tags["release.decision"] == "champion",
            reason=tags["release.reason"],
            champion_version=None if compared == "none" else compared,
            champion_score=None if score == "none" else float(score),
            paired_test=json.loads(tags.get("release.paired_test", "null")),  # absent before cnnops 0.2
        )


@dataclass(frozen=True)
class ReleasePaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    onnx: Path = path_arg("models/model.onnx", "exported ONNX file", POSITIONAL)
    checkpoint: Path = path_arg("models/model.pt", "checkpoint, registered beside the ONNX file")
    prepared: Path = path_arg(
        "prepared", "prepare's output folder: challenger and champion are scored on its test split"
    )
    train_report: Path = path_arg("reports/train.json", "train report: the model's MLflow run id")
    audit_report: Path = path_arg("reports/audit.json", "audit report (its verdict)")
    report: Path = path_arg("reports/release.json", "JSON report: the decision and its reason")
    project: Path = Path(".")  # the git work tree whose state may hold champion back
    # the model card's other sources: without them its sections say so (dvc.yaml gives them all)
    metrics: Path | None = path_arg(None, "evaluate's metrics JSON, for the model card")
    validation: Path | None = path_arg(None, "validate report, for the model card")
    gallery: Path | None = path_arg(None, "audit gallery folder: a few overlays go into the model card")
    card: Path | None = path_arg(None, "model_card.md and model_card.html go here; none: beside --report")

    @property
    def card_files(self) -> tuple[Path, Path]:
        folder = self.card if self.card is not None else self.report.parent
        return folder / "model_card.md", folder / "model_card.html"


@dataclass(frozen=True)
class ReleaseResult:
    version: str  # the registered version, now alias `challenger`
    promoted: bool  # whether it took alias `champion`
    report: dict[str, Any]  # what `paths.report` holds: scores, the decision and its reason


def run(params: Params, paths: ReleasePaths = ReleasePaths()) -> ReleaseResult:
    """Register the export (once), point `challenger` at it, and move `champion` when it earned it
    and the run may deploy (not a DVC experiment, not a dirty work tree)."""
    r = params.release
    run_id = runs.run_id_from_report(paths.train_report)
    metadata = read_metadata(paths.onnx)
    if metadata.mlflow_run_id != run_id:
        raise StageInputError(
            f"{paths.onnx} was exported from MLflow run {metadata.mlflow_run_id}, but {paths.train_report} "
            f"names run {run_id}: the ONNX file is stale; run `cnnops export` (or `dvc repro export`)"
        )
    audit = audit_document(paths.audit_report)
    verdict = audit["verdict"]
    test = PreparedSplit.load(paths.prepared, "test")
    mismatch = _incomparable(metadata, test)
    if mismatch:
        raise StageInputError(
            f"{paths.onnx} does not fit the test split of {paths.prepared}: {mismatch}; "
            "re-run `dvc repro export`"
        )
    scored = evaluate_onnx(paths.onnx, metadata, test, r.metric)
    score = scored.score
    baseline = majority_baseline(test.labels.numpy(), scored.correct, test.class_names)
    runs.configure(params.tracking)
    client = MlflowClient()
    version = _registered(client, params, run_id, paths, scored.figures)
    client.set_registered_model_alias(r.model_name, registry.CHALLENGER, version)
    decision = decide(client, r, version, test, scored, verdict, baseline)
    if decision.promoted and registry.alias_version(client, r.model_name, registry.CHAMPION) != version:
        decision = held_back(decision, paths.project)
    if decision.promoted:
        client.set_registered_model_alias(r.model_name, registry.CHAMPION, version)
    registry.set_tags(client, r.model_name, version, decision.as_tags(r.metric, score, verdict))
    result = {
        "model_name": r.model_name,
        "version": version,
        "run_id": run_id,
        "audit_verdict": verdict,
        "metric": r.metric,
        "score": score,
        "margin": r.margin,
        "min_score": r.min_score,
        "significance": r.significance,
        "baseline": baseline,
        **asdict(decision),
        "champion": version if decision.promoted else decision.champion_version,
    }
    atomic.write_json(paths.report, result)
    _write_card(client, params, paths, result, metadata, audit, test)
    outcome = "is the champion" if decision.promoted else "stays a challenger"
    log.info("release: %s version %s %s: %s", r.model_name, version, outcome, decision.reason)
    return ReleaseResult(version, decision.promoted, result)


def _registered(
    client: MlflowClient, params: Params, run_id: str, paths: ReleasePaths, figures: dict[str, float]
) -> str:
    """The version holding this exact export of this run: found, or registered now (with `figures`,
    its test figures, linked to the logged ONNX model)."""
    name = params.release.model_name
    version = registry.find_version(client, name, run_id, file_sha256(paths.onnx))
    if version is None:
        test = (paths.prepared, figures)
        version = registry.register(params.tracking, name, run_id, paths.onnx, paths.checkpoint, test)
        log.info("registered %s version %s from run %s", name, version, run_id)
    else:
        log.info("%s version %s already holds this export (run %s): reusing it", name, version, run_id)
    return version


def held_back(decision: Decision, project: Path) -> Decision:
    """An experiment or uncommitted code never deploys: the decision stands, champion does not move.

    Under `dvc exp run` (DVC sets DVC_EXP_NAME) the model is one try among many; on a dirty work tree
    (files DVC itself writes during repro aside) no commit reproduces it.
    """
    if not decision.promoted:
        return decision
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        why = (
            f"it runs under `dvc exp run` (experiment {experiment!r}), and an experiment never moves "
            "champion: `dvc exp apply` it, commit, then `dvc repro release`"
        )
    else:
        commit = git_commit(project)
        if commit == UNKNOWN:
            why = f"{project.resolve()} is not a git work tree with a commit, so no commit reproduces it"
        elif commit.endswith("-dirty"):
            why = (
                f"the git work tree {project.resolve()} has uncommitted changes (`git status`), so no "
                "commit reproduces it: commit, then `dvc repro release`"
            )
        else:
            return decision
    reason = f"it would become champion ({decision.reason}), but {why}"
    return replace(decision, promoted=False, reason=reason)


def decide(
    client: MlflowClient,
    params: ReleaseParams,
    version: str,
    test: PreparedSplit,
    challenger: Scored,
    verdict: str,
    baseline: dict[str, Any],
) -> Decision:
    """Whether `version` (`challenger`'s figures on `test`; `baseline`: metrics.majority_baseline)
    takes alias champion, and why."""
    champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
    if champion == version:
        if verdict != "pass":
            log.warning(
                "version %s is the champion but its audit verdict is now %r; release never demotes: "
                "move alias champion by hand if it should go",
                version,
                verdict,
            )
        tags = client.get_model_version(params.model_name, version).tags
        if "release.decision" in tags:
            return Decision.from_tags(tags)  # the decision that made it champion, unchanged
        return Decision(True, "already the champion (alias set outside cnnops release)", None, None)
    champion_score, paired, compared = None, None, "there is no champion yet"
    if champion is not None:
        with registry.downloaded_onnx(params.model_name, champion) as path:
            champion_meta = read_metadata(path)
            mismatch = _incomparable(champion_meta, test)
            if mismatch:
                return Decision(
                    False,
                    f"champion v{champion} cannot be evaluated on this test split ({mismatch}); "
                    "promote by hand or use a new release.model_name for a new task",
                    champion,
                    None,
                )
            held = evaluate_onnx(path, champion_meta, test, params.metric)
        champion_score, paired = held.score, mcnemar(challenger.correct, held.correct)
        compared = (
            f"{params.metric} {challenger.score:.4f} vs champion v{champion} {champion_score:.4f} "
            f"(margin {params.margin:g}; McNemar p = {paired['p_value']:.3g}: "
            f"{paired['challenger_only_correct']} test image(s) only it gets right, "
            f"{paired['champion_only_correct']} only the champion)"
        )
    refused = _refusal(params, verdict, challenger.score, baseline)
    if refused:
        return Decision(False, f"{refused}; {compared}", champion, champion_score, paired)
    if paired is None:
        return Decision(True, f"audit passed, {_earned(params, baseline)}, and {compared}", None, None)
    if challenger.score <= champion_score + params.margin:
        reason = f"audit passed but it does not beat the champion by more than the margin: {compared}"
        return Decision(False, reason, champion, champion_score, paired)
    if paired["p_value"] > params.significance:
        reason = (
            f"audit passed and it scores above the champion by the margin, but the difference is not "
            f"significant (McNemar p > release.significance {params.significance:g}): {compared}"
        )
        return Decision(False, reason, champion, champion_score, paired)
    return Decision(
        True, f"audit passed and it beats the champion: {compared}", champion, champion_score, paired
    )


def _refusal(params: ReleaseParams, verdict: str, score: float, baseline: dict[str, Any]) -> str:
    """Why a model may not become champion whatever the champion ('' when it may)."""
    if verdict == "fail":
        return "audit verdict is 'fail': a model that failed its audit is never promoted"
    if verdict == "inconclusive":
        return (
            "audit verdict is 'inconclusive': a class had too few correctly classified test images to "
            "audit (reports/audit.json warnings), and a model the audit could not look at is never promoted"
        )
    if score < params.min_score:
        return f"{params.metric} {score:.4f} is below release.min_score {params.min_score:g}"
    if baseline["p_value"] > params.significance:
        return (
            f"its test accuracy {baseline['model_accuracy']:.4f} is not significantly above the "
            f"majority-class baseline {baseline['accuracy']:.4f} (always answering "
            f"{baseline['majority_class'][:80]!r}; one-sided binomial p = {baseline['p_value']:.3g} > "
            f"release.significance {params.significance:g})"
        )
    return ""


def _earned(params: ReleaseParams, baseline: dict[str, Any]) -> str:
    """The bars a first champion cleared, in words."""
    return (
        f"{params.metric} at least release.min_score {params.min_score:g}, accuracy "
        f"{baseline['model_accuracy']:.4f} above the majority-class baseline {baseline['accuracy']:.4f} "
        f"(p = {baseline['p_value']:.3g})"
    )


def _incomparable(meta: OnnxMetadata, test: PreparedSplit) -> str:
    """Why an ONNX file of this metadata cannot take this split ('' when it can)."""
    if list(meta.class_names) != list(test.class_names):
        return f"classes {meta.class_names} differ from the split's {test.class_names}"
    if meta.color_mode != test.color_mode or tuple(meta.prepared_size) != test.image_size:
        return (
            f"it takes {meta.color_mode} {list(meta.prepared_size)} images, the split has "
            f"{test.color_mode} {list(test.image_size)}"
        )
    return ""


def evaluate_onnx(path: Path, meta: OnnxMetadata, test: PreparedSplit, metric: str) -> Scored:
    """The release metric and per-image correctness of an ONNX model (its metadata already read
    and checked) on a prepared split, run by ONNX Runtime on CPU."""
    session = open_session(path)
    batches = test.batches(RESCORE_BATCH, meta.input_size)  # centre-cropped to its input, as evaluate does
    outputs = np.concatenate([infer(session, x.numpy(), RESCORE_BATCH) for x, _ in batches])
    # The evaluate stage's metric definitions; they depend on the argmax only, so logits or
    # probabilities give the same figure.
    report = classification_report(torch.from_numpy(outputs), test.labels, test.class_names, top_k=1)
    figures = {f"test_{k}": float(report[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    return Scored(float(report[metric]), outputs.argmax(1) == test.labels.numpy(), figures)


def audit_document(audit_report: Path) -> dict[str, Any]:
    """reports/audit.json, refused unless it holds a verdict release knows."""
    if not audit_report.is_file():
        raise StageInputError(
            f"{audit_report}: audit report not found; run `cnnops audit` (or `dvc repro audit`)"
        )
    try:
        document = json.loads(audit_report.read_text())
        verdict = document.get("verdict")
    except (json.JSONDecodeError, AttributeError):
        raise StageInputError(f"{audit_report}: not a JSON object; re-run `cnnops audit`") from None
    if verdict not in ("pass", "fail", "inconclusive"):
        raise StageInputError(
            f"{audit_report}: top-level 'verdict' is {verdict!r}, expected 'pass', 'fail' or 'inconclusive'; "
            "re-run `cnnops audit`"
        )
    return document


def _write_card(
    client: MlflowClient,
    params: Params,
    paths: ReleasePaths,
    result: dict[str, Any],
    meta: OnnxMetadata,
    audit: dict[str, Any],
    test: PreparedSplit,
) -> None:
    """The version's model card: written beside the report, logged to its run, pointed at by the
    version's description and its `model_card` tag."""
    run_id, names = result["run_id"], test.class_names
    logged = client.get_run(run_id).data.params
    train_params = {k.removeprefix("train."): v for k, v in logged.items() if k.startswith("train.")}
    inputs = model_card.CardInputs(
        model_name=result["model_name"],
        version=result["version"],
        run_id=run_id,
        release=result,
        train=_json(paths.train_report, "train report"),
        train_params=train_params,
        weights=train_params.get("weights"),
        git_commit=meta.git_commit,
        data_version=meta.data_version,
        class_names=names,
        split_counts=_split_counts(paths.prepared, test),
        audit=audit,
        metrics=_json(paths.metrics, "metrics report"),
        validation=_json(paths.validation, "validation report"),
        pictures=model_card.gallery_pictures(paths.gallery, names) if paths.gallery else [],
    )
    files = model_card.write(inputs, *paths.card_files)
    decision = "champion" if result["promoted"] else "challenger"
    summary = f"{decision}: {result['reason']}"
    registry.attach_card(client, result["model_name"], result["version"], files, summary)


def _json(path: Path | None, what: str) -> dict[str, Any] | None:
    """A report the model card shows (None, with a warning, when it was not given)."""
    if path is None:
        log.warning("release: no %s given, so the model card has no section from it", what)
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StageInputError(
            f"{path}: cannot read the {what} ({exc}); re-run the stage that writes it"
        ) from None


def _split_counts(prepared: Path, test: PreparedSplit) -> dict[str, list[int]]:
    """Images per class in each prepared split present (the test split already loaded)."""
    k = len(test.class_names)
    counts = {}
    for name in ("train", "val"):
        if split_files(prepared, name)[1].is_file():
            counts[name] = torch.bincount(PreparedSplit.load(prepared, name).labels, minlength=k).tolist()
        else:
            log.warning("release: %s has no %s split; the model card leaves it out", prepared, name)
    counts["test"] = torch.bincount(test.labels, minlength=k).tolist()
    return counts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "release",
        help="register the ONNX model in MLflow and decide champion/challenger",
        description=__doc__,
    )
    add_path_arguments(parser, ReleasePaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(ReleasePaths, args))
    return 0
