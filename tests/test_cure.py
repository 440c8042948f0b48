"""The cure end to end: a model that learned a planted cue fails its audit; the cure retrains it with
counterfactuals from the findings, and the cured model no longer relies on the cue (ground truth:
`planted.cue_flip_rate`), keeps its clean accuracy and passes its re-audit. Refusals by name.

Through the real stages (`fixtures_audit.run_case`: validate, prepare, train, audit; then evaluate,
and cure, which calls train, evaluate and audit itself) on tiny planted digits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_audit import Audited, Case, run_case
from fixtures_model import one_thread

from cnnops.config import Params
from cnnops.data.planted import cue_flip_rate
from cnnops.data.splits import PreparedSplit
from cnnops.errors import StageInputError
from cnnops.models import load_classifier
from cnnops.stages import cure, evaluate

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CASES = {
    "corner": Case("corner", "3", seed=1),
    "tint": Case("tint", "2", seed=4, cue_args=(("intensity", 90),)),
    "clean": Case("none", None),
}
_RUNS: dict[str, tuple[Audited, dict]] = {}


def _audited(name: str, factory: pytest.TempPathFactory) -> tuple[Audited, dict]:
    """The case's pipeline and its evaluate metrics (the cure's 'before'), once per session."""
    if name not in _RUNS:
        audited = run_case(factory.mktemp(f"cure-{name}"), CASES[name])
        with one_thread():
            metrics = evaluate.run(audited.params, _evaluate_paths(audited.root)).metrics
        _RUNS[name] = (audited, metrics)
    return _RUNS[name]


def _evaluate_paths(root: Path) -> evaluate.EvaluatePaths:
    r = root / "reports"
    return evaluate.EvaluatePaths(
        model=root / "models" / "model.pt", prepared=root / "prepared", train_report=r / "train.json",
        metrics=r / "metrics.json", confusion=r / "plots" / "confusion.csv",
        confusion_png=r / "plots" / "confusion.png",
    )  # fmt: skip


def _cure_paths(root: Path, audit_report: Path | None = None) -> cure.CurePaths:
    r = root / "reports"
    return cure.CurePaths(
        audit_report=audit_report or r / "audit.json", model=root / "models" / "model.pt",
        train_report=r / "train.json", metrics=r / "metrics.json", prepared=root / "prepared",
        validation=r / "validation.json", data=root / "data", out=root / "models" / "cured.pt",
        report=r / "cure.json", folder=r / "cure", state=root / ".cnnops" / "cure.pt",
    )  # fmt: skip


def _enabled(params: Params, **cure_keys: object) -> Params:
    update = {"enabled": True, "epochs": 4, "rate": 0.5, **cure_keys}
    return params.model_copy(update={"cure": params.cure.model_copy(update=update)})


@dataclass(frozen=True)
class Cured:
    audited: Audited
    result: cure.CureResult
    cue_flips: float  # ground truth on the cured model


_CURED: dict[str, Cured] = {}


def _cured(name: str, factory: pytest.TempPathFactory) -> Cured:
    if name not in _CURED:
        audited, _ = _audited(name, factory)
        with one_thread():
            result = cure.run(_enabled(audited.params), _cure_paths(audited.root))
        model, _ = load_classifier(audited.root / "models" / "cured.pt")
        test = PreparedSplit.load(audited.root / "prepared", "test")
        _CURED[name] = Cured(audited, result, cue_flip_rate(model, test, audited.spec))
    return _CURED[name]


@pytest.mark.parametrize("name", ["corner", "tint"])
def test_cure_breaks_a_learned_cue_and_passes_the_reaudit(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cured = _cured(name, tmp_path_factory)
    audited, report = cured.audited, cured.result.report
    assert audited.report["verdict"] == "fail" and audited.cue_flips >= 0.2  # it learned the cue
    assert cured.cue_flips < 0.05, (audited.cue_flips, cured.cue_flips, report["findings"])
    assert report["status"] == "cured" and report["after"]["audit_verdict"] == "pass", report["findings"]
    _, clean_metrics = _audited("clean", tmp_path_factory)
    assert report["after"]["accuracy"] >= clean_metrics["accuracy"] - 0.05, (report["after"], clean_metrics)
    # the table: every finding before and after, the run linked to its parent
    assert report["parent_run_id"] == audited.result.run_id != report["run_id"]
    assert report["before"]["audit_verdict"] == "fail"
    assert {(f["class"], f["test"]) for f in report["findings"]} == {
        (f["class"], f["test"]) for f in audited.report["failures"]
    }
    assert json.loads((audited.root / "reports" / "cure.json").read_text()) == report
    import mlflow

    tags = mlflow.get_run(report["run_id"]).data.tags
    assert tags["cnnops.cure.parent_run_id"] == audited.result.run_id
    assert f"class '{audited.spec.cued_class}'" in tags["cnnops.cure.findings"]


def test_cure_refuses_a_passing_audit(tmp_path_factory: pytest.TempPathFactory) -> None:
    audited, _ = _audited("clean", tmp_path_factory)
    assert audited.report["verdict"] == "pass"
    with pytest.raises(StageInputError, match="verdict is 'pass', not 'fail'"):
        cure.run(_enabled(audited.params), _cure_paths(audited.root))
    assert not (audited.root / "models" / "cured.pt").exists()


def test_cure_refuses_the_audit_of_another_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    corner, _ = _audited("corner", tmp_path_factory)
    tint, _ = _audited("tint", tmp_path_factory)
    paths = _cure_paths(tint.root, audit_report=corner.root / "reports" / "audit.json")
    with pytest.raises(StageInputError, match="audited another model"):
        cure.run(_enabled(tint.params), paths)
    assert not paths.out.exists()


def test_cure_refuses_findings_it_cannot_act_on(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    corner, _ = _audited("corner", tmp_path_factory)
    document = json.loads((corner.root / "reports" / "audit.json").read_text())
    document["failures"] = [
        {"class": "3", "test": "masks", "value": 0.1, "threshold": 0.3, "sentence": "masks only"}
    ]
    masks_only = tmp_path / "audit.json"
    masks_only.write_text(json.dumps(document))
    paths = _cure_paths(corner.root, audit_report=masks_only)
    with pytest.raises(StageInputError, match="no finding the cure can act on: class '3' masks"):
        cure.run(_enabled(corner.params), paths)
    assert not paths.out.exists()


def test_cure_disabled_writes_a_skipped_report(tmp_path: Path) -> None:
    from cnnops.config import parse_params

    params = parse_params({}, "cure test")
    assert params.cure.enabled is False  # the default
    paths = cure.CurePaths(report=tmp_path / "cure.json", out=tmp_path / "cured.pt")
    assert cure.run(params, paths).report["status"] == "skipped"
    assert json.loads(paths.report.read_text())["status"] == "skipped" and not paths.out.exists()
