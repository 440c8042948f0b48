"""Cured planted pipelines, shared per session by the cure's proof tests (test_cure, test_cure_gallery
and any module proving the cure on another cue kind).

`audited(case, factory)`: `fixtures_audit.run_case`'s pipeline and its evaluate metrics (the cure's
'before'). `cured(case, factory, how, **cure_keys)`: that pipeline cured with `cure_keys` (under
reports/`how`), with the ground truth measured on the cured model: the cue's flips and the accuracy
on the clean originals of its test images beside a model trained on clean digits as long. Each
(case, how) runs once a session; a second call with other `cure_keys` returns the first run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_audit import Audited, Case, run_case
from fixtures_model import one_thread

from cnnops.config import Params
from cnnops.data.planted import clean_accuracy, cue_flip_rate
from cnnops.data.splits import PreparedSplit
from cnnops.models import load_classifier
from cnnops.stages import cure, evaluate
from cnnops.stages.paths import POSITIONAL

CORNER = Case("corner", "3", seed=1)  # the cheapest case the cure cures (test_cure, test_cure_gallery)

_METRICS: dict[Case, dict[str, Any]] = {}


def audited(case: Case, factory: pytest.TempPathFactory) -> tuple[Audited, dict[str, Any]]:
    """The case's pipeline (shared with test_audit_v2) and its evaluate metrics (the cure's 'before')."""
    run = run_case(factory.mktemp("cure-case"), case)
    if case not in _METRICS:
        with one_thread():
            _METRICS[case] = evaluate.run(run.params, evaluate_paths(run.root)).metrics
    return run, _METRICS[case]


def evaluate_paths(root: Path) -> evaluate.EvaluatePaths:
    r = root / "reports"
    return evaluate.EvaluatePaths(
        model=root / "models" / "model.pt", prepared=root / "prepared", train_report=r / "train.json",
        metrics=r / "metrics.json", confusion=r / "plots" / "confusion.csv",
        confusion_png=r / "plots" / "confusion.png",
    )  # fmt: skip


def cure_paths(root: Path, audit_report: Path | None = None, name: str = "cure") -> cure.CurePaths:
    r = root / "reports"
    return cure.CurePaths(
        audit_report=audit_report or r / "audit.json", model=root / "models" / "model.pt",
        train_report=r / "train.json", metrics=r / "metrics.json", prepared=root / "prepared",
        validation=r / "validation.json", data=root / "data", out=root / "models" / name / "model.pt",
        report=r / f"{name}.json", folder=r / name, state=root / ".cnnops" / f"{name}.pt", project=root,
    )  # fmt: skip


def cure_command(paths: cure.CurePaths, params: Params) -> list[str]:
    """`cnnops cure` on `paths` with `params` (written beside its report) as a command line, for a
    cure run in a process of its own (that a test can kill)."""
    params_file = paths.report.with_suffix(".params.yaml")
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    argv = [str(Path(sys.executable).with_name("cnnops")), "--params", str(params_file), "cure"]
    for f in fields(paths):
        flag, value = f.metadata.get("flag"), getattr(paths, f.name)
        if "help" in f.metadata and value is not None:
            argv += (
                [str(value)] if flag == POSITIONAL else [flag or "--" + f.name.replace("_", "-"), str(value)]
            )
    return argv


def enabled(params: Params, **cure_keys: object) -> Params:
    """`params` with the cure on, as long as the original training, at rate 0.5, then `cure_keys`."""
    update = {"enabled": True, "epochs": params.train.epochs, "rate": 0.5, **cure_keys}
    return params.model_copy(update={"cure": params.cure.model_copy(update=update)})


def clean_twin(case: Case) -> Case:
    """The clean model `case`'s cure is measured against: the same source and size, trained as long."""
    return Case("none", None, source=case.source, image_size=case.image_size, per_class=case.per_class,
                epochs=case.epochs)  # fmt: skip


@dataclass(frozen=True)
class Cured:
    audited: Audited
    result: cure.CureResult
    model: Path  # the cured (final round's) model
    cue_flips: float  # ground truth on the cured model
    clean_accuracy: float  # the cured model's, on the clean originals of its test images
    clean_model_accuracy: float  # a model trained on clean digits as long, on the same images
    images: int  # how many images those two accuracies count

    @property
    def report(self) -> dict[str, Any]:
        return self.result.report

    @property
    def images_lost(self) -> int:
        """How many more clean images the cured model gets wrong than the clean model."""
        return round((self.clean_model_accuracy - self.clean_accuracy) * self.images)


_CURED: dict[tuple[Case, str], Cured] = {}


def cured(case: Case, factory: pytest.TempPathFactory, how: str = "cure", **cure_keys: object) -> Cured:
    """`case` cured with `cure_keys` (under reports/`how`), once a session."""
    if (case, how) not in _CURED:
        run, _ = audited(case, factory)
        paths = cure_paths(run.root, name=how)
        with one_thread():
            result = cure.run(enabled(run.params, **cure_keys), paths)
        model, _ = load_classifier(paths.out)
        test = PreparedSplit.load(run.root / "prepared", "test")
        clean, _ = audited(clean_twin(case), factory)
        clean_test = PreparedSplit.load(clean.root / "prepared", "test")
        accuracy, n = clean_accuracy(model, test, clean_test)
        baseline, _ = clean_accuracy(load_classifier(clean.root / "models" / "model.pt")[0], test, clean_test)
        flips = cue_flip_rate(model, test, run.spec)
        _CURED[(case, how)] = Cured(run, result, paths.out, flips, accuracy, baseline, n)
    return _CURED[(case, how)]
