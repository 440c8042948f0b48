"""`cnnops release`: register the exported model, then decide whether it becomes the champion.

Every release registers (once) a model version and points alias `challenger` at it. Alias
`champion` moves only when the audit verdict is `pass` and the model beats the current champion
by more than `release.margin` on the *current* test split, the champion being re-evaluated on
that split through ONNX Runtime exactly like the challenger. The decision and its reason are tags
on the version and the run and go to the report. Running it again changes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from cnnops.config import Params, ReleaseParams, TrackingParams
from cnnops.data.splits import PreparedSplit
from cnnops.errors import StageInputError
from cnnops.export.onnx_model import infer, open_session, read_metadata
from cnnops.tracking import registry, runs
from cnnops.training.metrics import classification_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_score: float | None

    def as_tags(self, metric: str, score: float, verdict: str) -> dict[str, str]:
        return {
            "release.decision": "champion" if self.promoted else "challenger",
            "release.reason": self.reason,
            "release.metric": metric,
            "release.score": repr(score),  # repr round-trips exactly: a re-run reports the same numbers
            "release.compared_with": self.champion_version or "none",
            "release.champion_score": "none" if self.champion_score is None else repr(self.champion_score),
            "release.audit_verdict": verdict,
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
        )


def run(
    params: ReleaseParams,
    tracking_params: TrackingParams,
    *,
    onnx_path: Path,
    checkpoint: Path,
    prepared: Path,
    train_report: Path,
    audit_report: Path,
    report: Path,
) -> dict[str, Any]:
    run_id = runs.run_id_from_report(train_report)
    metadata = read_metadata(onnx_path)
    if metadata.mlflow_run_id != run_id:
        raise StageInputError(
            f"{onnx_path} was exported from MLflow run {metadata.mlflow_run_id}, but {train_report} "
            f"names run {run_id}: the ONNX file is stale; run `cnnops export` (or `dvc repro export`)"
        )
    verdict = audit_verdict(audit_report)
    test = PreparedSplit.load(Path(prepared) / "test.pt")
    mismatch = _incomparable(onnx_path, test)
    if mismatch:
        raise StageInputError(
            f"{onnx_path} does not fit {prepared}/test.pt: {mismatch}; re-run `dvc repro export`"
        )
    score = evaluate_onnx(onnx_path, test, params.metric)
    runs.configure(tracking_params)
    client = MlflowClient()
    sha = registry.file_sha256(onnx_path)
    version = registry.find_version(client, params.model_name, run_id, sha)
    if version is None:
        version = registry.register(tracking_params, params.model_name, run_id, onnx_path, checkpoint)
        log.info("registered %s version %s from run %s", params.model_name, version, run_id)
    else:
        log.info(
            "%s version %s already holds this export (run %s): reusing it", params.model_name, version, run_id
        )
    client.set_registered_model_alias(params.model_name, registry.CHALLENGER, version)
    decision = decide(client, params, version, test, score, verdict)
    if decision.promoted:
        client.set_registered_model_alias(params.model_name, registry.CHAMPION, version)
    registry.set_tags(client, params.model_name, version, decision.as_tags(params.metric, score, verdict))
    result = {
        "model_name": params.model_name,
        "version": version,
        "run_id": run_id,
        "audit_verdict": verdict,
        "metric": params.metric,
        "score": score,
        "margin": params.margin,
        **asdict(decision),
        "champion": version if decision.promoted else decision.champion_version,
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        "release: %s version %s %s: %s",
        params.model_name,
        version,
        "is the champion" if decision.promoted else "stays a challenger",
        decision.reason,
    )
    return result


def decide(
    client: MlflowClient,
    params: ReleaseParams,
    version: str,
    test: PreparedSplit,
    score: float,
    verdict: str,
) -> Decision:
    """Whether `version` (scoring `score` on `test`) takes alias champion, and why."""
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
    champion_score = None
    if champion is None:
        compared = "there is no champion yet"
    else:
        with registry.downloaded_onnx(params.model_name, champion) as path:
            mismatch = _incomparable(path, test)
            if mismatch:
                return Decision(
                    False,
                    f"champion v{champion} cannot be evaluated on this test split ({mismatch}); "
                    "promote by hand or use a new release.model_name for a new task",
                    champion,
                    None,
                )
            champion_score = evaluate_onnx(path, test, params.metric)
        compared = (
            f"{params.metric} {score:.4f} vs champion v{champion} {champion_score:.4f} "
            f"(margin {params.margin:g})"
        )
    if verdict != "pass":
        reason = f"audit verdict is {verdict!r}: a model that failed its audit is never promoted; {compared}"
        return Decision(False, reason, champion, champion_score)
    if champion_score is None:
        return Decision(True, f"audit passed and {compared}", None, None)
    if score > champion_score + params.margin:
        return Decision(True, f"audit passed and it beats the champion: {compared}", champion, champion_score)
    reason = f"audit passed but it does not beat the champion by more than the margin: {compared}"
    return Decision(False, reason, champion, champion_score)


def _incomparable(path: Path, test: PreparedSplit) -> str:
    """Why a champion's ONNX cannot take this split ('' when it can)."""
    meta = read_metadata(path)
    if list(meta.class_names) != list(test.class_names):
        return f"classes {meta.class_names} differ from the split's {test.class_names}"
    if meta.color_mode != test.color_mode or tuple(meta.input_size) != test.image_size:
        return (
            f"it takes {meta.color_mode} {list(meta.input_size)} images, the split has "
            f"{test.color_mode} {list(test.image_size)}"
        )
    return ""


def evaluate_onnx(path: Path, test: PreparedSplit, metric: str) -> float:
    """The release metric of an ONNX model on a prepared split, run by ONNX Runtime on CPU."""
    outputs = infer(open_session(path), test.floats().numpy(), batch_size=64)
    # The evaluate stage's metric definitions; they depend on the argmax only, so logits or
    # probabilities give the same figure.
    return float(
        classification_report(torch.from_numpy(outputs), test.labels, test.class_names, top_k=1)[metric]
    )


def audit_verdict(audit_report: Path) -> str:
    if not audit_report.is_file():
        raise StageInputError(
            f"{audit_report}: audit report not found; run `cnnops audit` (or `dvc repro audit`)"
        )
    try:
        verdict = json.loads(audit_report.read_text()).get("verdict")
    except (json.JSONDecodeError, AttributeError):
        raise StageInputError(f"{audit_report}: not a JSON object; re-run `cnnops audit`") from None
    if verdict not in ("pass", "fail"):
        raise StageInputError(
            f"{audit_report}: top-level 'verdict' is {verdict!r}, expected 'pass' or 'fail'; "
            "re-run `cnnops audit`"
        )
    return verdict


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "release",
        help="register the ONNX model in MLflow and decide champion/challenger",
        description=__doc__,
    )
    parser.add_argument("onnx", type=Path, nargs="?", default=Path("models/model.onnx"))
    parser.add_argument("--checkpoint", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--prepared", type=Path, default=Path("prepared"), help="folder with test.pt")
    parser.add_argument("--train-report", type=Path, default=Path("reports/train.json"))
    parser.add_argument("--audit-report", type=Path, default=Path("reports/audit.json"))
    parser.add_argument("--report", type=Path, default=Path("reports/release.json"))
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(
        params.release,
        params.tracking,
        onnx_path=args.onnx,
        checkpoint=args.checkpoint,
        prepared=args.prepared,
        train_report=args.train_report,
        audit_report=args.audit_report,
        report=args.report,
    )
    return 0
