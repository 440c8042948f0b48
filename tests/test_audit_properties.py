"""Image properties, their one-vs-rest AUROC, and the interventions that test whether they cause."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_audit import Case, run_case
from PIL import Image

from cnnops.audit import counterfactual_plan
from cnnops.audit import property_interventions as pi
from cnnops.audit.contract import PropertyProbe, PropertyScore, Transplant
from cnnops.audit.properties import image_properties, jpeg_quality, property_scores
from cnnops.config import parse_params
from cnnops.data.splits import PreparedSplit
from cnnops.training.counterfactual import CHANGES, PlaceCue, PropertyCue

A = parse_params({}).audit


def _textured(n: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_properties_move_the_way_their_change_does() -> None:
    x = _textured(8) * 0.5 + 0.25
    base = image_properties(x)
    blurred = image_properties(pi._blur(x, 1.2))
    grainy = image_properties(pi._grain(pi._blur(x, 1.2), 0.1))
    assert (blurred["sharpness"] < base["sharpness"] / 4).all()
    assert (blurred["high-frequency energy"] < base["high-frequency energy"]).all()
    assert (grainy["noise"] > 3 * blurred["noise"]).all()
    assert (image_properties(pi._posterize(x, 1))["entropy"] < base["entropy"]).all()
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    colour = image_properties(red)
    assert torch.allclose(colour["saturation"], torch.ones(2)) and torch.allclose(
        colour["hue cos"], torch.ones(2)
    )
    assert "saturation" not in base  # grey images have no colour properties


def test_jpeg_quality_is_read_from_the_file(tmp_path: Path) -> None:
    """Exact at every quality, the low ones too, where baseline's clip at 255 flattens the table (a
    scaling inverted from the table's median read qualities 1-12 as 11-16)."""
    image = Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    for quality in (1, 3, 5, 8, 12, 20, 50, 90, 99, 100):
        image.save(tmp_path / f"{quality}.jpg", quality=quality)
        assert jpeg_quality(tmp_path / f"{quality}.jpg") == quality
    image.save(tmp_path / "x.png")
    assert np.isnan(jpeg_quality(tmp_path / "x.png"))


def test_auroc_and_its_permutation_p_value() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    values = np.stack([rng.normal(labels == 1, 0.3), rng.normal(0, 1, 90)], 1)  # property 0 tells class 1
    scores = property_scores(values, ["told", "random"], labels, ["a", "b", "c"], 199, seed=0)
    assert scores["b"]["told"].auroc > 0.95 and scores["b"]["told"].p_value <= 0.01
    assert scores["a"]["told"].auroc < 0.3  # lower than the rest: AUROC under 0.5 flags it too
    assert scores["b"]["random"].p_value > 0.05
    assert scores["b"]["told"].class_median > scores["b"]["told"].others_median


class Smooth(torch.nn.Module):
    """Class 1 for smooth images (low Laplacian variance), else class 0: a "blur" shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 0.002 - image_properties(x)["sharpness"] + self.w
        return torch.stack([-s, s], 1)


class Fragile(torch.nn.Module):
    """Class 1 whenever an image is changed at all from the recipients' exact pixels."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        changed = (x - self.reference[: len(x)]).abs().flatten(1).amax(1) > 1e-3
        s = changed.float() - 0.5 + self.w
        return torch.stack([-s, s], 1)


def test_a_blur_shortcut_flips_on_blurring_and_not_on_its_mirror() -> None:
    recipients = (_textured(20) * 255).to(torch.uint8)
    blurred = image_properties(pi._blur(recipients.float() / 255, 1.5))["sharpness"]
    score = PropertyScore(auroc=0.02, p_value=0.001, class_median=float(blurred.median()), others_median=0.08)
    t = pi.property_transplant(Smooth(), recipients, 1, "sharpness", score, batch_size=8)
    assert t.flip_rate == 1.0 and t.control_flip_rate == 0.0 and t.discordant == (20, 0)
    assert "blurred" in t.where
    fragile = pi.property_transplant(Fragile(recipients.float() / 255), recipients, 1, "sharpness", score, 8)
    assert fragile.flip_rate == 1.0 and fragile.excess == 0.0  # any change flips it: the mirror says so


class Grainy(torch.nn.Module):
    """Class 1 for grainy images (Immerkaer's noise estimate high), else class 0: a "grain" shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = image_properties(x)["noise"] - 0.02 + self.w
        return torch.stack([-s, s], 1)


def test_two_classes_test_a_change_that_adds_and_a_blur_with_its_scrambled_control() -> None:
    smooth = (pi._blur(_textured(20), 2.0) * 255).to(torch.uint8)  # class 0's images: no grain
    grained = image_properties(pi._grain(smooth.float() / 255, 0.07))["noise"]
    high = PropertyScore(auroc=0.99, p_value=0.001, class_median=float(grained.median()), others_median=0.002)
    low = PropertyScore(auroc=0.01, p_value=0.001, class_median=0.002, others_median=high.class_median)
    assert pi.two_class_test("noise", high) and not pi.erasing("noise", high)
    assert pi.two_class_test("noise", low) and pi.erasing("noise", low)  # a blur: its scrambled control
    assert pi.two_class_test("hue", low) and not pi.two_class_test("entropy", high)  # equalizing: ungraded
    assert not pi.two_class_test("entropy", low) and not pi.two_class_test("saturation", low)  # no control
    t = pi.property_transplant(Grainy(), smooth, 1, "noise", high, batch_size=8)
    assert t.flip_rate == 1.0 and t.control_flip_rate == 0.0 and "grain" in t.where


def _correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = (
        x.flatten(1) - x.flatten(1).mean(1, keepdim=True),
        y.flatten(1) - y.flatten(1).mean(1, keepdim=True),
    )
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


def test_the_scrambled_control_keeps_the_detail_and_erases_the_object() -> None:
    x = pi._blur(_textured(16, seed=1), 0.8)  # textured, as the sharper class's images are
    scrambled = pi._scrambled(x)
    before, after = image_properties(x), image_properties(scrambled)
    for prop in pi.ERASING:
        ratio = after[prop] / before[prop]
        assert ((ratio > 0.7) & (ratio < 1.4)).all(), (prop, ratio)  # the level of detail stays
    assert (_correlation(scrambled, x).abs() < 0.3).all()  # the arrangement (the object) is gone
    assert torch.equal(pi._scrambled(x), scrambled)  # the same scramble each run


class ObjectDetector(torch.nn.Module):
    """Class 0 while the recipients' own arrangement of pixels (their object) is there, else class 1:
    blurring erases it, as blurring a face erases the face, with no blur shortcut at all."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 0.8 - _correlation(x, self.reference[: len(x)]) + self.w
        return torch.stack([-s, s], 1)


def test_a_blur_that_erases_the_object_is_not_blamed_with_two_classes() -> None:
    """The confusion the scrambled control is made for: with two classes, blurring the sharper class's
    images sends them to the smoother class when the model reads the object, not the blur. A blur
    shortcut (`Smooth`) flips on the blur and not on the scrambled images, which keep their detail;
    an object detector flips on both and is not blamed."""
    recipients = (_textured(20) * 255).to(torch.uint8)
    blurred = image_properties(pi._blur(recipients.float() / 255, 1.5))["sharpness"]
    score = PropertyScore(auroc=0.02, p_value=0.001, class_median=float(blurred.median()), others_median=0.08)
    shortcut = pi.property_transplant(Smooth(), recipients, 1, "sharpness", score, 8, scrambled_control=True)
    assert shortcut.flip_rate == 1.0 and shortcut.shuffled_flip_rate == 0.0 and shortcut.excess == 1.0
    assert "scrambled" in shortcut.where
    detector = ObjectDetector(recipients.float() / 255)  # one batch: it compares by position
    plain = pi.property_transplant(detector, recipients, 1, "sharpness", score, 20)
    assert plain.flip_rate == 1.0 and plain.excess == 1.0  # the mirror alone blames the object
    controlled = pi.property_transplant(
        detector, recipients, 1, "sharpness", score, 20, scrambled_control=True
    )
    assert controlled.flip_rate == 1.0 and controlled.shuffled_flip_rate == 1.0 and controlled.excess == 0.0


def test_only_flagged_properties_with_an_intervention_are_tested() -> None:
    strong = PropertyScore(auroc=0.95, p_value=0.001, class_median=1.0, others_median=0.0)
    probe = PropertyProbe(
        accuracy=0.5, majority_accuracy=0.5, used_file_properties=False, top_properties=(), per_class_f1={},
        auroc={"a": {"noise": strong, "brightness": strong, "entropy": PropertyScore(0.6, 0.001, 1.0, 0.0)},
               "b": {"noise": PropertyScore(0.95, 0.5, 1.0, 0.0)}},
    )  # fmt: skip
    assert pi.flagged(probe, A) == {"a": {"noise": strong}, "b": {}}  # brightness is the tone transplant's


def test_validate_warns_of_a_property_that_alone_tells_a_class(tmp_path: Path) -> None:
    import json

    from cnnops.data.planted import make_planted
    from cnnops.stages import validate

    make_planted(tmp_path / "data", "noise", "3", seed=0, per_class=20, fraction=1.0)
    params = parse_params(
        {
            "data": {"color_mode": "L", "near_duplicate_distance": 0},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": str(tmp_path / "a"),
            },
        },
        "validate property test",
    )
    report = tmp_path / "validation.json"
    validate.run(params, validate.ValidatePaths(tmp_path / "data", report, tmp_path / "docs"))
    found = json.loads(report.read_text())["image_properties"]
    assert {(f["class"], f["property"]) for f in found} >= {("3", "noise")}
    noise = {f["class"]: f["auroc"] for f in found if f["property"] == "noise"}  # a 1's thin strokes: low
    assert noise["3"] > 0.95 and max(noise.values()) == noise["3"]


def test_with_two_classes_the_stronger_side_of_a_property_names_the_class() -> None:
    """Grain planted in faces: blurring a grainy face sends it to 'nonface' as surely as grain sends a
    non-face to 'face'. A tie goes to the change that adds; a blur that moves more is kept, unless a
    place of the other class moves images (the blur erases it)."""
    up = PropertyScore(auroc=0.99, p_value=0.001, class_median=0.01, others_median=0.002)
    down = PropertyScore(auroc=0.01, p_value=0.001, class_median=0.002, others_median=0.01)
    flags = {"face": {"noise": up}, "nonface": {"noise": down, "sharpness": down}}

    def tests(grain: float, blur: float) -> dict[str, dict[str, Transplant]]:
        return {
            "face": {"noise": Transplant(grain, 0.0, 10)},
            "nonface": {"noise": Transplant(blur, 0.0, 10), "sharpness": Transplant(blur, 0.0, 10)},
        }

    tie = pi._blurs_beating_their_opposite(tests(1.0, 1.0), flags)
    assert tie == {"face": {"noise": Transplant(1.0, 0.0, 10)}, "nonface": {}}
    stronger = pi._blurs_beating_their_opposite(tests(0.4, 0.9), flags)
    assert set(stronger["nonface"]) == {"noise", "sharpness"} and set(stronger["face"]) == {"noise"}
    # a place of the faces moves images (a bright corner planted there): blurring faces erases it, so
    # the place is the finding, not the non-faces' lack of detail, and the blur is not even measured
    assert not pi._tested_with_two_classes("nonface", "noise", down, {"face"})
    assert pi._tested_with_two_classes("nonface", "noise", down, {"nonface"})
    assert pi._tested_with_two_classes("face", "noise", up, {"face"})  # grain adds: tested
    assert pi._tested_with_two_classes("nonface", "noise", down, set())


# Through the real stages (`fixtures_audit.run_case`, once a session). A blur planted in the non-faces,
# with 40% of that class showing faces (blur and all) so the model must read the blur: before the
# scrambled control, a two-class class that holds *less* detail had no property transplant of its own.
FACES_BLUR = Case(
    "blur", "nonface", seed=1, source="faces", per_class=None, epochs=25, cue_args=(("confound", 0.4),)
)
CLEAN_FACES = Case("none", None, source="faces", per_class=None, epochs=25)  # as test_audit_v2's
BLURS = {f"property:{prop}" for prop in pi.ERASING}


@pytest.mark.slow
@pytest.mark.integration
def test_a_two_class_blur_cue_fails_on_its_blur_against_the_scrambled_control(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    run = run_case(tmp_path_factory.mktemp("faces-blur"), FACES_BLUR)
    assert run.cue_flips >= 0.2, f"the model did not learn the blur ({run.cue_flips:.2f}): no proof"
    report = run.report
    sentences = [f["sentence"] for f in report["failures"]]
    assert report["verdict"] == "fail" and report["failures"][0]["class"] == "nonface", sentences
    blurs = [f for f in report["failures"] if f["test"] in BLURS]
    assert blurs and all(f["class"] == "nonface" for f in blurs), sentences
    tested = report["classes"]["nonface"]["transplant_properties"]
    assert all(tested[f["test"].split(":", 1)[1]]["shuffled_flip_rate"] is not None for f in blurs)


@pytest.mark.slow
@pytest.mark.integration
def test_clean_two_class_faces_pass_the_blur_against_the_scrambled_control(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Clean non-faces are smoother than faces, and blurring a face erases it: the scrambled faces go
    to 'nonface' as the blurred ones do (measured: 5 clean models, blur minus control at most 0.06),
    so no property test fails."""
    run = run_case(tmp_path_factory.mktemp("faces-clean"), CLEAN_FACES)
    assert not [f for f in run.report["failures"] if f["test"].startswith("property:")], [
        f["sentence"] for f in run.report["failures"]
    ]


def _reddish(n: int) -> torch.Tensor:
    """`n` textured images, each of one hue within 15 degrees of red, in mid tones (none clipped)."""
    g = torch.Generator().manual_seed(1)
    base = torch.tensor([0.6, 0.35, 0.3]).view(1, 3, 1, 1) + 0.08 * torch.rand(n, 1, 32, 32, generator=g)
    turns = (torch.rand(n, generator=g) - 0.5) * (30 / 360)
    return torch.stack([pi._hue(img, float(t)) for img, t in zip(base, turns, strict=True)])


class Unnatural(torch.nn.Module):
    """Class 1 for an image whose mean hue lies over 40 degrees from red, either way: "an unnatural
    hue -> class", what the scenes ConvNet learned from a class turned 84 degrees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.from_numpy(np.abs(pi._hue_angles(x))).float() - 40.0 + self.w
        return torch.stack([-s, s], 1)


def test_a_hue_shortcut_is_tested_against_a_change_of_its_size_that_keeps_the_hue() -> None:
    """Either turn sends an image to the class, so the opposite turn is no control (it flipped as
    many); the same pixels moved as far along the grey axis keep the hue and flip none. A model that
    any change upsets flips on both arms and is not blamed. The hue is flagged on its p-value alone."""
    x = _reddish(20)
    recipients = (x * 255).round().to(torch.uint8)
    score = PropertyScore(auroc=0.61, p_value=0.018, class_median=60.0, others_median=0.0)
    probe = PropertyProbe(
        accuracy=0.5, majority_accuracy=0.5, used_file_properties=False, top_properties=(), per_class_f1={},
        auroc={"a": {"hue": score}},
    )  # fmt: skip
    assert pi.flagged(probe, A) == {"a": {"hue": score}}
    t = pi.property_transplant(Unnatural(), recipients, 1, "hue", score, batch_size=8)
    assert t.flip_rate == 1.0 and t.control_flip_rate == 0.0 and t.excess == 1.0
    assert "hue turned" in t.where and "grey axis" in t.where
    turn = pi._hue_turn(score.class_median, x)
    control = pi._grey_step(x, turn)
    assert np.allclose(pi._hue_angles(control), pi._hue_angles(x), atol=1.0)  # the hue kept
    assert torch.allclose(pi._rms(control - x), pi._rms(pi._hue(x, turn) - x), rtol=0.02)  # as large
    fragile = pi.property_transplant(Fragile(recipients.float() / 255), recipients, 1, "hue", score, 20)
    assert fragile.flip_rate == 1.0 and fragile.excess == 0.0


def _hue_class_split() -> tuple[PreparedSplit, dict[str, float]]:
    """Two classes of 16 reddish RGB images, and class 'a''s hue score as the audit reports it: the
    probe's figures of a learned turn (AUROC 0.61, p 0.018, 60 degrees off the set's mean)."""
    x = (_reddish(16) * 255).round().to(torch.uint8)
    split = PreparedSplit(x, torch.arange(16) % 2, [f"{i}.png" for i in range(16)], ["a", "b"], "RGB")
    return split, {"auroc": 0.61, "p_value": 0.018, "class_median": 60.0, "others_median": 0.0}


def test_the_cure_spreads_a_hue_by_the_opposite_turn_not_by_the_audits_control() -> None:
    """The audit's hue control (`_grey_step`) is no change the cure can train with: the cure's plan
    (`counterfactual_plan._property_cue`, through `chosen`) turns the class's own images back by the
    same turn, as it did before the control changed (a hue finding raised ValueError there)."""
    split, score = _hue_class_split()
    audit = {"data_properties": {"auroc": {"a": {"hue": score}}}}
    cue = counterfactual_plan._property_cue(0, "hue", audit, split, (32, 32), batch_size=8, seed=0)
    assert (cue.change, cue.mirror) == ("hue", "hue") and cue.mirror in CHANGES
    assert cue.strength > 0 and cue.mirror_strength == -cue.strength


def test_a_hue_gets_its_own_cue_beside_the_place_that_answers_the_sharpness() -> None:
    """A place's swap leaves a whole-image turn in the rest of the image (measured: the scenes hue's
    outer band answered its hue and the cue kept flipping 56%), so a colour property gets its own
    cue beside the class's proved place, while a sharpness is still the place's (a tag's edges)."""
    split, score = _hue_class_split()
    thresholds = {"border_fraction": 0.1, "corner_fraction": 0.3, "edge_fractions": [0.25],
                  "centre_fraction": 0.5, "grids": [2]}  # fmt: skip
    found = (("transplant:outer band", 0.32), ("property:hue", 0.23), ("property:sharpness", 0.2))
    failures = [{"class": "a", "test": t, "value": v} for t, v in found]
    audit = {"thresholds": thresholds, "failures": failures, "classes": {"a": {}, "b": {}},
             "data_properties": {"auroc": {"a": {"hue": score}}}}  # fmt: skip
    made = counterfactual_plan.plan(audit, split, (32, 32), batch_size=8, seed=0)
    band, hue = made.cues
    assert isinstance(band, PlaceCue) and band.place == "outer band"
    assert isinstance(hue, PropertyCue) and (hue.prop, hue.change) == ("hue", "hue")
    assert {a["test"]: a["cue"] for a in made.addressed} == {
        "transplant:outer band": "outer band",
        "property:hue": "property:hue",
        "property:sharpness": "outer band",
    }
