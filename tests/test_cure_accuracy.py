"""The cure's cost on clean images, on a split big enough to see it: the issue asks that the cured
model's clean test accuracy stay within 1 point of a model trained on clean data. At test_cure's 60
images a class (about 80 clean test images) 1 point is under one image; here the frame, the cue whose
cure costs the most (docs/audit.md "Cure benchmark"), has PER_CLASS images a class, so 1 point is at
least one clean test image, and the cure fine-tunes the failed model (`cure.mode: finetune`).

Through the real stages (`fixtures_audit.run_case`, then `fixtures_cure.cured`: the cure's train,
evaluate and re-audit), against a model trained on the clean digits as long as the failed one.
"""

from __future__ import annotations

import fixtures_cure
import pytest
import torch
from cases_audit import CURED, LEARNED
from fixtures_audit import Case

from cnnops.models import load_classifier

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PER_CLASS = 80  # about 107 clean test images
FRAME = Case("frame", "6", seed=2, per_class=PER_CLASS)  # test_cure's frame case with more images
ONE_POINT = 0.01  # the bound on the clean accuracy the cure may cost


def test_a_finetuned_cure_keeps_clean_accuracy_within_one_point(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cured = fixtures_cure.cured(FRAME, tmp_path_factory, "finetune", mode="finetune")
    audited, report = cured.audited, cured.report
    assert audited.report["verdict"] == "fail" and audited.cue_flips >= LEARNED  # it learned the cue
    assert cured.images * ONE_POINT >= 1, cured.images  # 1 point is at least one image
    assert report["mode"] == "finetune" and cured.cue_flips < CURED, (cured.cue_flips, report["findings"])
    assert report["status"] == "cured" and report["after"]["audit_verdict"] == "pass", report["findings"]
    accuracies = (cured.clean_accuracy, cured.clean_model_accuracy, cured.images)
    assert cured.clean_accuracy >= cured.clean_model_accuracy - ONE_POINT, accuracies
    # every layer trained on from the failed model (mode head leaves the backbone as it was)
    failed = load_classifier(audited.root / "models" / "model.pt")[0].state_dict()
    model = load_classifier(cured.model)[0]
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.head.parameters())}
    moved = {n for n, p in model.state_dict().items() if not torch.equal(p, failed[n])}
    assert moved - head, moved
