"""Audit v2, proved through the real stages: cues anywhere and of any kind fail naming their class,
clean sets pass, and a set whose classes differ only in colour gets a finding naming tone and its key.

Each case is a planted copy (`cnnops.data.planted`) run through validate, prepare, train and audit
(`fixtures_audit.run_case`), once a session. A cued case first checks the ground truth the audit
never sees: the planted cue drawn into other classes' test images flips them to the cued class (the
model learned it); a case whose model ignored the cue proves nothing and says so.
"""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_audit import Audited, Case, run_case

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LEARNED = 0.2  # the benchmark's "learned" threshold: the cue alone flips this share of other classes


def resnet18(cue: str, cued_class: str | None, seed: int, *cue_args: tuple[str, Any]) -> Case:
    """ResNet-18 at 32 px, 8 epochs; its audit on 30 images a class, not all, so it fits CPU CI."""
    return Case(
        cue, cued_class, seed=seed, model="resnet18", epochs=8, cue_args=cue_args,
        audit_args=(("max_images_per_class", 30),),
    )  # fmt: skip


CUED = {
    # A tag at a random place and a blur: without a label confound a 4-epoch ConvNet ignores both
    # (cue flips 0.00-0.03 on digits); with 40% of the class showing other digits, cue and all, it
    # must use them (flips 0.63 and 0.51 in this session's check runs).
    "convnet-tag": Case(
        "tag", "3", seed=1, epochs=8, cue_args=(("intensity", 255), ("size", 5), ("confound", 0.4))
    ),
    # at 64 px this case took 260 s; at 32 px with the confound it trains and audits in about a minute
    "convnet-textline": Case(
        "textline", "7", seed=2, epochs=8, cue_args=(("intensity", 255), ("confound", 0.4))
    ),
    "convnet-noise": Case("noise", "5", seed=3),
    "convnet-blur": Case("blur", "2", seed=4, epochs=8, cue_args=(("confound", 0.4),)),
    # two classes: grain on the faces; the property transplant adds it to the non-faces (its mirror:
    # blurring them). Measured: cue flips 1.00, grain flipped 13 of 13 non-faces to 'face', the mirror 0
    "faces-noise": Case("noise", "face", seed=3, source="faces", per_class=None, epochs=25),
    # ResNet-18 at 32 px (its layer4 map is 1x1-2x2 there, so places come from occlusion), 8 epochs,
    # 40% confound, 30 images a class in the audit. Seeds as first tried, except the text line: at its
    # drawn font (5-6 px) seed 5 did not learn (cue flips 0.14; 0.01 at 60% confound), at 8 px it did
    # (0.72; 1.00 at 10 px). Measured flips: tag 0.38, text line 0.72, noise 0.93 (0.00 at 4 epochs
    # without the confound), blur 0.88; each failed naming its class first (tag and noise on a property
    # transplant, text line on the bottom-left corner, blur on sharpness). Time: the tag alone took
    # 58 s on 2 idle cores, the text line at 5 px 83 s; in one pytest session under a load average of
    # 5-7 these four and the clean ResNet-18 case took 118-155 s each, 698 s together.
    "resnet18-tag": resnet18("tag", "8", 7, ("intensity", 255), ("size", 5), ("confound", 0.4)),
    "resnet18-textline": resnet18("textline", "4", 5, ("intensity", 255), ("size", 8), ("confound", 0.4)),
    "resnet18-noise": resnet18("noise", "6", 6, ("confound", 0.4)),
    "resnet18-blur": resnet18("blur", "1", 8, ("confound", 0.4)),
}
CLEAN = {
    "digits": Case("none", None),
    # the ResNet-18 proofs' settings on clean digits (measured: pass, no failure)
    "resnet18-digits": resnet18("none", None, 0),
    "faces": Case("none", None, source="faces", per_class=None, epochs=25),
    # classes share backgrounds and tone. At 8 epochs '8' and '9' had 2 correct test images each (the
    # audit is inconclusive); at 15 each class has enough
    "rgb-scenes": Case("none", None, source="scenes", epochs=15),
}
TONES = Case("none", None, source="tones", per_class=40, epochs=6)  # classes differ only in colour

_RUNS: dict[str, Audited] = {}


def _audited(name: str, case: Case, factory: pytest.TempPathFactory) -> Audited:
    if name not in _RUNS:
        _RUNS[name] = run_case(factory.mktemp(f"v2-{name}"), case)
    return _RUNS[name]


@pytest.mark.parametrize("name", list(CUED))
def test_a_learned_cue_fails_naming_the_cued_class(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    case = CUED[name]
    run = _audited(name, case, tmp_path_factory)
    assert run.cue_flips >= LEARNED, (
        f"{name}: the model did not learn the cue ({run.cue_flips:.2f}): no proof"
    )
    report = run.report
    assert report["verdict"] == "fail", (name, report["warnings"])
    worst = report["failures"][0]
    assert worst["class"] == case.cued_class, (name, [f["sentence"] for f in report["failures"][:3]])
    assert worst["p_adjusted"] <= run.params.audit.significance if "p_adjusted" in worst else True
    assert any(t["class"] == case.cued_class for t in report["tests"])  # raw and adjusted p-values kept


def test_a_two_class_property_cue_fails_on_its_property_transplant(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two classes: the property transplant runs for a change that adds (`two_class_test`)."""
    run = _audited("faces-noise", CUED["faces-noise"], tmp_path_factory)
    found = [f for f in run.report["failures"] if f["test"].startswith("property:")]
    assert any(f["class"] == "face" and f["test"] == "property:noise" for f in found), [
        f["sentence"] for f in run.report["failures"]
    ]
    assert all(f["class"] == "face" for f in found)


# The clean RGB scenes were a known false alarm until the large places were pasted off the object
# grown by the model's saliency (`evidence._pasted_objects`): the pixel estimate misses a digit on a
# textured photo, and the centre "off the object" carried it (docs/audit.md, Limits).
@pytest.mark.parametrize("name", list(CLEAN))
def test_a_clean_set_passes(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _audited(name, CLEAN[name], tmp_path_factory)
    report = run.report
    assert report["verdict"] == "pass", (
        name,
        [f["sentence"] for f in report["failures"]],
        report["warnings"],
    )
    assert all(t["p_adjusted"] >= t["p_value"] for t in report["tests"])


def test_classes_that_differ_only_in_colour_get_a_tone_finding_naming_its_key(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    run = _audited("tones", TONES, tmp_path_factory)
    report = run.report
    findings = report["failures"] + report["warnings"]
    toned = [f for f in findings if f["test"] == "transplant_tone"]
    assert toned, [f["sentence"] for f in findings]
    assert all("audit.severity.tone" in f["sentence"] and "colour" in f["sentence"] for f in toned)
    assert "tone" in report["at_warning"]  # RGB: tone defaults to a warning (docs/audit.md)
    assert not [f for f in report["failures"] if f["test"] == "transplant_tone"]
