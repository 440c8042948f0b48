"""The planted cases and ground-truth bounds that several test modules share: the audit v2 proofs'
cases (tests/test_audit_v2.py), which the cure proofs (tests/test_cure.py) cure, and the bounds both
and tests/test_cue_kinds.py hold a model to. Each `Case` runs once a session (`fixtures_audit.run_case`).
"""

from __future__ import annotations

from typing import Any

from fixtures_audit import Audited, Case

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
    # a red square at a corner of RGB photographs, at the builder's 100 crops a class (per_class None).
    # Measured: cue flips 0.98, fail on 'chelsea' (the top-right corner's class mean 100%, its own
    # pixels 85%), 58 s at load 4; at the old 40 crops, flips 1.00 and `pass`: 14 recipients, so the
    # corner's 43-50% over its control had adjusted p 0.22-0.31 (docs/audit.md, 2 December 2026)
    "photos-patch": Case(
        "patch", "chelsea", seed=2, source="photos", per_class=None, epochs=15, cue_args=(("confound", 0.4),)
    ),
}
CLEAN = {
    "digits": Case("none", None),
    "faces": Case("none", None, source="faces", per_class=None, epochs=25),
    # classes share backgrounds and tone. At 8 epochs '8' and '9' had 2 correct test images each (the
    # audit is inconclusive); at 15 each class has enough
    "rgb-scenes": Case("none", None, source="scenes", epochs=15),
    # classes differ in colour and texture: tone and properties are warnings on RGB, the places pass
    "rgb-photos": Case("none", None, source="photos", per_class=None, epochs=15),
}
# ResNet-18's proofs (tests/test_audit_resnet.py): their own module, so they run beside the
# ConvNet cases that test_cure shares, not after them on one worker (tests/conftest.py)
RESNET18_CUED = {
    # ResNet-18 at 32 px (its layer4 map is 1x1-2x2 there, so places come from occlusion), 8 epochs,
    # 40% confound, 30 images a class in the audit. Seeds as first tried, except the text line: at its
    # drawn font (5-6 px) seed 5 did not learn (cue flips 0.14; 0.01 at 60% confound), at 8 px it did
    # (0.72; 1.00 at 10 px). Measured flips: tag 0.38, text line 0.72, noise 0.93 (0.00 at 4 epochs
    # without the confound), blur 0.88; each failed naming its class first (tag and noise on a property
    # transplant, text line on the bottom-left corner, blur on sharpness). Time: the tag alone took
    # 58 s on 2 idle cores, the text line at 5 px 83 s; in one pytest session under a load average of
    # 5-7 these four and the clean ResNet-18 case took 118-155 s each, 698 s together.
    "tag": resnet18("tag", "8", 7, ("intensity", 255), ("size", 5), ("confound", 0.4)),
    "textline": resnet18("textline", "4", 5, ("intensity", 255), ("size", 8), ("confound", 0.4)),
    "noise": resnet18("noise", "6", 6, ("confound", 0.4)),
    "blur": resnet18("blur", "1", 8, ("confound", 0.4)),
}
RESNET18_CLEAN = {
    # the ResNet-18 proofs' settings on clean digits (measured: pass, no failure)
    "digits": resnet18("none", None, 0),
}
CURED = 0.05  # the bound on the cured model's ground-truth reliance on the cue
# Of about 80 clean test images, how many more the cured model may get wrong than a model trained on
# clean digits as long: the largest gap measured (the frame, 4 images, 5 points; the others 0-3):
# docs/audit.md "Cure benchmark". The 1 point is under one image at this size: it is proven
# where it is at least one (tests/test_cure_accuracy.py: the frame at 80 images a class, cure.mode
# finetune, within 1 point; the default retrain lost 3 of 109 there)
IMAGES_LOST = 4


def assert_fails_naming_the_cued_class(name: str, run: Audited) -> None:
    """A learned cue's proof: the model uses the cue, and the audit fails naming the cued class first."""
    assert run.cue_flips >= LEARNED, (
        f"{name}: the model did not learn the cue ({run.cue_flips:.2f}): no proof"
    )
    report = run.report
    assert report["verdict"] == "fail", (name, report["warnings"])
    worst = report["failures"][0]
    assert worst["class"] == run.spec.cued_class, (name, [f["sentence"] for f in report["failures"][:3]])
    assert worst["p_adjusted"] <= run.params.audit.significance if "p_adjusted" in worst else True
    assert any(t["class"] == run.spec.cued_class for t in report["tests"])  # raw and adjusted p-values kept


def assert_passes(name: str, run: Audited) -> None:
    """A clean set's proof: no failure, and every adjusted p-value at or above its raw one."""
    report = run.report
    failures = [f["sentence"] for f in report["failures"]]
    assert report["verdict"] == "pass", (name, failures, report["warnings"])
    assert all(t["p_adjusted"] >= t["p_value"] for t in report["tests"])
