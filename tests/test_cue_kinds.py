"""The planted cue kinds that test_audit_v2 and test_cure leave out, proved the same way: a corner
watermark, a centre watermark and a sharpened image on digits, a coloured patch, a hue turn and a
JPEG quality on RGB scenes (digits on photo crops). Each model learned its cue (the ground truth the
audit never sees), its audit fails naming the cued class first, and where the cure is proven, the
cured model no longer relies on the cue, keeps its clean accuracy and passes its re-audit.

Through the real stages (`fixtures_audit.run_case`, `fixtures_cure.cured`), once a session per case.
The cures proven here: the corner watermark and the sharpening; the centre watermark's is a case of
test_cure. The ones not proven, and why (the patch, the hue, the JPEG quality): docs/audit.md, "Cue
kinds beyond the proofs" and Limits.
"""

from __future__ import annotations

import fixtures_cure
import pytest
from cases_audit import CURED, IMAGES_LOST, LEARNED
from fixtures_audit import Case, run_case

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROPERTY_AT_ERROR = (
    ("place", "error"), ("tone", "auto"), ("property", "error"), ("deletion", "auto"), ("masks", "error"),
)  # fmt: skip
# Measured 1 December 2026 (docs/audit.md): cue flips, then the first failure. Without the 40% label
# confound a 4-epoch ConvNet ignored the centre watermark (flips 0.03) and the sharpening (0.00).
KINDS = {
    "watermark": Case("watermark", "8", seed=8),  # 0.77; the top-left corner transplant
    "centre": Case("centre", "3", seed=1, epochs=8, cue_args=(("confound", 0.4),)),  # 0.64; property
    # 120 images a class: at 60 the cured model's re-audit is inconclusive ('4' keeps 2 correct test
    # images, the confound's copies of other digits aside)
    "sharpen": Case("sharpen", "4", seed=5, epochs=8, per_class=120, cue_args=(("confound", 0.4),)),  # 0.95
    # 15 epochs as the clean scenes of test_audit_v2 (fewer leave classes too few correct test images)
    "patch": Case("patch", "2", seed=2, source="scenes", epochs=15),  # 0.84; the most-attended pixels
    "hue": Case("hue", "3", seed=3, source="scenes", epochs=15),  # 0.72; the outer band transplant
    # quality 5 against 95 with the confound; 30 epochs (at 15 flips 0.22 and the JPEG transplant's 22%
    # missed on the adjusted p, 0.16). Properties at error: on RGB `auto` makes them warnings
    "jpeg": Case(
        "jpeg",
        "5",
        seed=5,
        source="scenes",
        epochs=30,
        cue_args=(("confound", 0.4), ("intensity", 5)),
        audit_args=(("severity", PROPERTY_AT_ERROR),),
    ),  # 0.35; property: JPEG quality
}
# the cure's keys per kind: the sharpening's cure trains twice as long as its model (at 8 epochs it
# broke the cue, 0.95 -> 0.00, and passed in 2 rounds, but lost 11 clean images of 160; at 16, 4)
CURABLE = {"watermark": {}, "sharpen": {"epochs": 16}}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_learned_cue_of_this_kind_fails_naming_the_cued_class(
    kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    case = KINDS[kind]
    run = run_case(tmp_path_factory.mktemp(f"kind-{kind}"), case)
    assert run.cue_flips >= LEARNED, f"{kind}: the model did not learn the cue ({run.cue_flips:.2f})"
    report = run.report
    assert report["verdict"] == "fail", (kind, report["warnings"])
    worst = report["failures"][0]
    assert worst["class"] == case.cued_class, (kind, [f["sentence"] for f in report["failures"][:3]])
    assert worst["p_adjusted"] <= run.params.audit.significance if "p_adjusted" in worst else True


@pytest.mark.parametrize("kind", CURABLE)
def test_the_cure_breaks_a_learned_cue_of_this_kind(
    kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cured = fixtures_cure.cured(KINDS[kind], tmp_path_factory, **CURABLE[kind])
    audited, report = cured.audited, cured.report
    assert audited.report["verdict"] == "fail" and audited.cue_flips >= LEARNED
    assert cured.cue_flips < CURED, (audited.cue_flips, cured.cue_flips, report["findings"])
    assert report["status"] == "cured" and report["after"]["audit_verdict"] == "pass", report["findings"]
    assert cured.images_lost <= IMAGES_LOST, (cured.clean_accuracy, cured.clean_model_accuracy, cured.images)
    assert report["parent_run_id"] == audited.result.run_id != report["run_id"]
    assert {(f["class"], f["test"]) for f in report["findings"]} == {
        (f["class"], f["test"]) for f in audited.report["failures"]
    }
