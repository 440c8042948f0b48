"""reports/audit.json is read by people, `release` and benchmarks: its keys and their order are a contract.

The report is built from the types of `cnnops.audit.contract`; these tests pin what `to_json` makes
of them, and that the probe and the evidence look at the same band and corners.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from cases_verdict import CLEAN, NONE, A

from cnnops.audit import properties
from cnnops.audit.contract import AuditReport, PropertyProbe, PropertyWeight, Transplant, to_json
from cnnops.audit.regions import OUTER_BAND, candidate_regions
from cnnops.audit.verdict import decide
from cnnops.data.splits import PreparedSplit

FIGURE_KEYS = [
    "n_correct", "n_errors", "attention", "top_off_object", "energy", "energy_others", "transplant_top",
    "transplant_regions", "transplant_regions_mean", "transplant_tone", "deletion", "masks", "errors",
    "method_agreement", "transplant_properties", "recurring",
]  # fmt: skip


def _report() -> AuditReport:
    corner = Transplant(flip_rate=0.81, control_flip_rate=0.03, pairs=50)
    figures = {
        "a": replace(
            CLEAN, transplant_regions={OUTER_BAND: NONE, "top-left corner": corner}, top_off_object=0.8
        ),
        "b": replace(CLEAN, method_agreement={"scorecam": 0.5}),
    }
    probe = PropertyProbe(
        accuracy=0.5,
        majority_accuracy=0.5,
        used_file_properties=True,
        top_properties=(PropertyWeight("bytes", 0.7),),
        per_class_f1={"a": 0.95, "b": 0.1},
    )
    return AuditReport(
        decision=decide(figures, probe, A),
        model="convnet",
        methods=("gradcam", "scorecam"),
        target_layer="net.features",
        n_images=40,
        annotated_images=0,
        thresholds=A.model_dump(mode="json"),
        data_properties=probe,
        classes=figures,
    )


def test_the_report_keeps_its_keys_in_order() -> None:
    doc = to_json(_report())
    assert json.loads(json.dumps(doc)) == doc  # plain JSON values only
    assert list(doc) == [
        "verdict", "failed_classes", "failures", "warnings", "at_warning", "tests", "model", "methods",
        "target_layer", "n_images", "annotated_images", "thresholds", "data_properties", "classes",
    ]  # fmt: skip
    assert doc["verdict"] == "fail" and doc["failed_classes"] == ["a"]
    transplant, deletion = doc["failures"]
    assert list(transplant) == ["class", "test", "value", "threshold", "p_value", "p_adjusted", "sentence"]
    assert list(deletion) == ["class", "test", "value", "threshold", "sentence"]  # p-values: transplants only
    assert [list(w) for w in doc["warnings"]] == [["class", "test", "value", "threshold", "sentence"]]
    assert doc["data_properties"]["top_properties"] == [{"property": "bytes", "importance": 0.7}]
    assert list(doc["data_properties"]) == [
        "accuracy", "majority_accuracy", "used_file_properties", "top_properties", "per_class_f1", "auroc",
    ]  # fmt: skip
    figures = doc["classes"]["b"]
    assert list(figures) == FIGURE_KEYS
    assert figures["masks"] is None and figures["errors"] == {"n": 1, "energy": None, "attention": None}
    assert figures["method_agreement"] == {"scorecam": 0.5}
    assert list(figures["transplant_top"]) == ["flip_rate", "control_flip_rate", "pairs", "pixels", "where"]


def test_a_transplant_lists_only_the_controls_it_measured() -> None:
    each = replace(NONE, other_classes_flip_rate=0.1, evened_flip_rate=0.2, shuffled_flip_rate=0.3)
    assert list(to_json(each)) == [
        "flip_rate", "control_flip_rate", "pairs", "other_classes_flip_rate", "evened_flip_rate",
        "shuffled_flip_rate",
    ]  # fmt: skip
    assert list(to_json(replace(each, shuffled_flip_rate=None))) == [
        "flip_rate", "control_flip_rate", "pairs", "other_classes_flip_rate", "evened_flip_rate",
    ]  # fmt: skip
    assert to_json(NONE) == {"flip_rate": 0.0, "control_flip_rate": 0.0, "pairs": 50}


def test_the_probe_measures_the_places_the_transplants_test() -> None:
    images = torch.randint(
        0, 256, (5, 1, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    split = PreparedSplit(
        images, torch.zeros(5, dtype=torch.long), [f"{i}.png" for i in range(5)], ["x"], "L"
    )
    values, names = properties.pixel_properties(split, 0.1, 0.3, batch_size=2)
    streamed_whole = properties.pixel_properties(split, 0.1, 0.3, batch_size=5)[0]
    # batches change no figure beyond float rounding (numpy sums a batch of one in another order)
    np.testing.assert_allclose(values, streamed_whole, rtol=1e-6)
    x = images[:, 0].float().div(255).numpy()
    for name, mask in candidate_regions(20, 30, 0.1, 0.3).items():
        column = "band mean" if name == OUTER_BAND else name.replace(" corner", " mean")
        np.testing.assert_allclose(values[:, names.index(column)], x[:, mask].mean(1), rtol=1e-6)
    band = candidate_regions(20, 30, 0.1, 0.3)[OUTER_BAND]
    np.testing.assert_allclose(values[:, names.index("centre mean")], x[:, ~band].mean(1), rtol=1e-6)
