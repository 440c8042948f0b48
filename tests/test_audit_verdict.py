"""The verdict rests on interventions and masks only; saliency and data properties only warn."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from cases_verdict import CLEAN, NONE, A
from scipy.stats import binomtest

from cnnops.audit import evidence, verdict
from cnnops.audit.contract import (
    ClassFigures,
    MaskAgreement,
    PropertyProbe,
    PropertyScore,
    PropertyWeight,
    Transplant,
)
from cnnops.audit.regions import OUTER_BAND, candidate_regions
from cnnops.audit.verdict import decide


def _with(**changes: object) -> ClassFigures:
    return replace(CLEAN, **changes)


def test_clean_figures_pass() -> None:
    assert decide({"a": CLEAN, "b": CLEAN}, None, A).verdict == "pass"


def test_saliency_alone_only_warns() -> None:
    figures = {"a": _with(energy={OUTER_BAND: 0.6}, attention=replace(CLEAN.attention, peak_off_object=1.0))}
    result = decide(figures, None, A)
    assert result.verdict == "pass"
    assert [w.test for w in result.warnings] == ["border_energy"]


def test_transplant_fails_with_a_sentence_naming_class_test_and_number() -> None:
    corner = Transplant(flip_rate=0.81, control_flip_rate=0.03, pairs=50)
    figures = {
        "malignant": _with(transplant_regions={OUTER_BAND: NONE, "top-left corner": corner}),
        "b": CLEAN,
    }
    result = decide(figures, None, A)
    assert result.verdict == "fail" and result.failed_classes == ("malignant",)
    (finding,) = result.failures
    assert finding.test == "transplant:top-left corner"
    assert finding.sentence == (
        "class 'malignant': pasting the top-left corner of its images into other classes' images flips 81% "
        "of them to 'malignant' (3% for the larger control: that place from other classes, or evened out; "
        "50 images, p < 0.001, adjusted < 0.001 over 12 tests)"
    )


def test_most_attended_pixels_with_no_common_place_are_said_to_be_spread_out() -> None:
    top = Transplant(flip_rate=0.59, control_flip_rate=0.17, pairs=46, pixels=51, where=evidence.SPREAD_OUT)
    (finding,) = decide({"a": _with(transplant_top=top), "b": CLEAN}, None, A).failures
    assert "(5% of the image, spread out) into other classes' images" in finding.sentence, finding.sentence


def test_too_few_pairs_to_show_an_effect_pass_with_a_warning_that_says_so() -> None:
    small = Transplant(flip_rate=0.3125, control_flip_rate=0.0625, pairs=16)  # 5 of 16 against 1 of 16
    assert verdict.p_value(small) > A.significance
    result = decide({"a": _with(transplant_tone=small)}, None, A)
    assert result.verdict == "pass"
    (warning,) = [w for w in result.warnings if w.test == "underpowered:transplant_tone"]
    assert warning.class_name == "a" and warning.p_adjusted > A.significance
    assert "16 images are too few" in warning.sentence and "31%" in warning.sentence
    at_warning = decide({"a": _with(transplant_tone=small)}, None, A, rgb=True)  # tone: a warning on RGB
    assert not [w for w in at_warning.warnings if w.test.startswith("underpowered")]
    large = replace(small, pairs=160)  # the same rates over ten times the images
    result = decide({"a": _with(transplant_tone=large)}, None, A)
    assert result.verdict == "fail" and result.failures[0].p_value < 0.001
    assert not [w for w in result.warnings if w.test.startswith("underpowered")]


def test_control_cancels_a_flip_that_any_paste_causes() -> None:
    noisy = Transplant(flip_rate=0.6, control_flip_rate=0.5, pairs=50)
    assert decide({"a": _with(transplant_tone=noisy)}, None, A).verdict == "pass"


def test_deletion_counts_only_off_the_object_and_masks_decide() -> None:
    assert decide({"a": _with(top_off_object=0.8)}, None, A).failures[0].test == "deletion"
    masks = MaskAgreement(n=9, energy_inside=0.5, top_inside=0.1, pointing_hit_rate=0.2)
    result = decide({"a": _with(masks=masks)}, None, A)
    assert (
        result.failures[0].test == "masks"
        and "10% of its most-attended pixels" in result.failures[0].sentence
    )


def test_probe_and_too_few_images_only_warn() -> None:
    probe = PropertyProbe(
        accuracy=0.97,
        majority_accuracy=0.5,
        used_file_properties=False,
        top_properties=(PropertyWeight("band mean", 1.0),),
        per_class_f1={"a": 0.97},
    )
    assert decide({"a": _with()}, probe, A).verdict == "pass"  # the probe alone only warns
    result = decide({"a": _with(n_correct=1, transplant_tone=replace(NONE, flip_rate=1.0))}, probe, A)
    assert result.verdict == "inconclusive"  # a class the audit could not look at is not a pass
    assert {w.test for w in result.warnings} == {"coverage", "data_properties"}
    assert not result.failures


def test_a_failure_elsewhere_outweighs_an_unaudited_class() -> None:
    figures = {"a": _with(n_correct=0), "b": _with(transplant_tone=replace(NONE, flip_rate=1.0))}
    result = decide(figures, None, A)
    assert result.verdict == "fail" and result.failed_classes == ("b",)


def test_transplant_moves_only_masked_pixels_and_counts_flips() -> None:
    class Bright(torch.nn.Module):  # class 1 when the top-left pixel is bright
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x[:, 0, 0, 0] - 0.5 + self.w
            return torch.stack([-s, s], 1)

    donors = torch.zeros(4, 1, 8, 8)
    donors[:, :, 0, 0] = 1.0
    recipients = torch.zeros(6, 1, 8, 8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[:2, :2] = True
    rng = np.random.default_rng(0)
    result = evidence.paired(*evidence.paste_arms(Bright(), donors, mask, recipients, recipients, 1, rng, 4))
    # paired: all 6 recipients flipped by the paste and none by the control
    assert result == Transplant(flip_rate=1.0, control_flip_rate=0.0, pairs=6, discordant=(6, 0))
    elsewhere = np.zeros((8, 8), dtype=bool)
    elsewhere[4:, 4:] = True
    pasted, _ = evidence.paste_arms(Bright(), donors, elsewhere, recipients, recipients, 1, rng, 4)
    assert not pasted.any()


class Textured(torch.nn.Module):  # class 1 when the top rows have texture, whatever its shape
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, :2].flatten(1).std(1) - 0.1 + self.w
        return torch.stack([-s, s], 1)


def test_texture_that_varies_between_images_is_not_blamed_on_the_place() -> None:
    rng = np.random.default_rng(0)
    textured = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # a frame-filling object
    recipients = torch.full((6, 1, 8, 8), 0.5)
    band = candidate_regions(8, 8, 0.25, 0.25)[OUTER_BAND]
    each = evidence.region_transplant(
        Textured(), textured, band, recipients, 1, rng, batch_size=4, texture_control=True
    )
    assert each.flip_rate == 1.0 and each.shuffled_flip_rate == 1.0  # values alone do it
    assert each.control_flip_rate == 1.0
    means = evidence.mean_image(textured, 4), evidence.mean_image(recipients, 4)
    mean = evidence.mean_transplant(Textured(), means, band, recipients, 1, rng, batch_size=4)
    assert mean.flip_rate == 0.0  # averaged out


def test_a_cue_fixed_in_place_survives_the_mean_and_a_shape_does_not_survive_shuffling() -> None:
    rng = np.random.default_rng(0)
    framed = torch.full((8, 1, 8, 8), 0.5)
    framed[:, :, 0, ::2] = 1.0  # the same stripes in every image
    recipients = torch.full((6, 1, 8, 8), 0.5)
    band = candidate_regions(8, 8, 0.25, 0.25)[OUTER_BAND]
    means = evidence.mean_image(framed, 4), evidence.mean_image(recipients, 4)
    mean = evidence.mean_transplant(Textured(), means, band, recipients, 1, rng, batch_size=4)
    assert mean.flip_rate == 1.0 and mean.evened_flip_rate == 0.0 and mean.control_flip_rate == 0.0

    class Stripes(torch.nn.Module):  # class 1 for alternating pixels along the top row: a shape
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            row = x[:, 0, 0]
            s = (row[:, ::2] - row[:, 1::2]).mean(1) - 0.4 + self.w
            return torch.stack([-s, s], 1)

    each = evidence.region_transplant(Stripes(), framed, band, recipients, 1, rng, 4, texture_control=True)
    assert each.flip_rate == 1.0 and each.shuffled_flip_rate < 0.5
    plain = evidence.region_transplant(Textured(), framed, band, recipients, 1, rng, 4)
    assert plain.shuffled_flip_rate is None
    assert plain.control_flip_rate == max(plain.other_classes_flip_rate, plain.evened_flip_rate)


def test_a_class_mean_of_backgrounds_drops_the_object_and_keeps_a_fixed_cue() -> None:
    # a bright stroke in column 3 or 4 of each image (an object that varies) and a tag at (0, 0)
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 0, 0] = 1.0
    objects = np.zeros((4, 8, 8), dtype=bool)
    for i, col in enumerate((3, 3, 4, 4)):
        objects[i, 2:6, col] = True
    x[torch.as_tensor(objects)[:, None]] = 1.0
    plain = evidence.mean_image(x, 3)
    background = evidence.mean_image(x, 3, keep=~objects)
    assert plain[0, 0, 3, 3] == 0.5  # the stroke's ghost, half as bright
    assert background[0, 0, 3, 3] == 0.0 and background[0, 0, 0, 0] == 1.0  # the tag keeps its value
    assert torch.equal(evidence.mean_image(x, 3, keep=np.zeros_like(objects)), plain)  # none kept


def test_shuffle_within_keeps_values_inside_and_pixels_outside() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    region = np.zeros((4, 4), dtype=bool)
    region[0] = True
    out = evidence.shuffle_within(x, region, np.random.default_rng(0))
    assert torch.equal(out[:, :, 1:], x[:, :, 1:])
    assert torch.equal(out[:, :, 0].sort(-1).values, x[:, :, 0].sort(-1).values)
    assert not torch.equal(out, x)
    assert torch.equal(out[:, 1] - out[:, 0], x[:, 1] - x[:, 0])  # channels move together


def test_a_class_with_no_correct_image_is_reported_not_a_crash() -> None:
    class AlwaysZero(torch.nn.Module):  # predicts class 0 whatever it sees
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.ones(len(x)) + self.w, torch.zeros(len(x))], 1)

    n = 6
    labels = np.array([0, 0, 0, 1, 1, 1])
    x = torch.rand(n, 1, 8, 8)
    batch = evidence.Batch(
        x=x,
        mean=evidence.mean_image(x, 4),
        labels=labels,
        preds=np.zeros(n, dtype=int),
        maps=np.random.default_rng(0).random((n, 8, 8)),
        objects=np.ones((n, 8, 8), dtype=bool),
        annotated=np.zeros(n, dtype=bool),
    )
    regions = candidate_regions(8, 8, 0.1, 0.3)
    figures = {
        str(c): evidence.class_figures(
            AlwaysZero(),
            batch,
            c,
            top_fraction=0.05,
            regions=regions,
            max_images=10,
            batch_size=4,
            rng=np.random.default_rng(0),
        )
        for c in (0, 1)
    }
    assert figures["1"].n_correct == 0 and figures["1"].n_errors == 3
    assert figures["1"].transplant_regions[OUTER_BAND].evened_flip_rate is None  # nothing to paste
    assert figures["1"].transplant_regions_mean[OUTER_BAND].pairs == 0  # no mean of no image
    result = decide(figures, None, A)
    coverage = [w for w in result.warnings if w.class_name == "1" and w.test == "coverage"]
    assert coverage and "0 correctly classified" in coverage[0].sentence


def test_paired_test_uses_the_discordant_recipients_only() -> None:
    # 12 recipients flipped only by the paste, 2 only by the control: McNemar's exact binomial
    paired = Transplant(flip_rate=0.5, control_flip_rate=0.2, pairs=40, discordant=(14, 2))
    assert abs(verdict.p_value(paired) - binomtest(14, 16, 0.5, alternative="greater").pvalue) < 1e-12
    # the same rates where the control flips other recipients than the paste: no better than chance
    assert verdict.p_value(replace(paired, discordant=(20, 8))) > verdict.p_value(paired)
    assert verdict.p_value(replace(paired, discordant=(0, 0))) == 1.0


def test_benjamini_hochberg_over_every_test_of_every_class() -> None:
    weak = Transplant(flip_rate=0.3, control_flip_rate=0.05, pairs=40, discordant=(7, 0))  # p = 1/128
    alone = decide({"a": _with(transplant_tone=weak)}, None, A)
    assert alone.verdict == "fail" and alone.failures[0].p_value == round(0.5**7, 6)
    many = {c: _with(transplant_tone=replace(NONE, discordant=(0, 0))) for c in "bcdefghij"}
    crowded = decide({"a": _with(transplant_tone=weak), **many}, None, A)
    assert crowded.verdict == "pass"  # one p = 0.008 among 60 tests is what chance gives
    (record,) = [t for t in crowded.tests if t.class_name == "a" and t.test == "transplant_tone"]
    assert record.p_value == round(0.5**7, 6) and record.p_adjusted > A.significance
    assert len(crowded.tests) == 10 * 6 and all(t.p_adjusted >= t.p_value for t in crowded.tests)


def test_severity_moves_a_family_to_warnings_or_off() -> None:
    toned = {"a": _with(transplant_tone=Transplant(flip_rate=0.9, control_flip_rate=0.0, pairs=50))}
    strict = decide(toned, None, A)  # single-channel: tone auto is error
    assert strict.verdict == "fail" and strict.failures[0].test == "transplant_tone"
    assert "audit.severity.tone: warning" in strict.failures[0].sentence
    colour = decide(toned, None, A, rgb=True)  # RGB: auto is a warning that names tone and its key
    assert colour.verdict == "pass" and "tone" in colour.at_warning
    (warning,) = [w for w in colour.warnings if w.test == "transplant_tone"]
    assert "colour" in warning.sentence and "audit.severity.tone: warning" in warning.sentence
    assert {t.severity for t in colour.tests if t.family == "tone"} == {"warning"}
    off = A.model_copy(update={"severity": A.severity.model_copy(update={"tone": "off"})})
    skipped = decide(toned, None, off)
    assert skipped.verdict == "pass" and not [t for t in skipped.tests if t.family == "tone"]
    place_warn = A.model_copy(update={"severity": A.severity.model_copy(update={"deletion": "warning"})})
    deleted = decide({"a": _with(top_off_object=0.8)}, None, place_warn)
    assert deleted.verdict == "pass" and "audit.severity.deletion: warning" in deleted.warnings[0].sentence
    removed = decide({"a": _with(top_off_object=0.8)}, None, A, rgb=True)  # deletion auto: RGB reports
    assert removed.verdict == "pass" and "deletion" in removed.at_warning
    assert decide({"a": _with(top_off_object=0.8)}, None, A).verdict == "fail"  # single-channel fails


def test_property_transplants_are_tests_of_their_own_family() -> None:
    sharp = Transplant(flip_rate=0.7, control_flip_rate=0.1, pairs=50, discordant=(30, 0))
    result = decide({"a": _with(transplant_properties={"sharpness": sharp})}, None, A)
    assert result.failures[0].test == "property:sharpness"
    assert (
        "sharpness" in result.failures[0].sentence
        and "audit.severity.property" in result.failures[0].sentence
    )
    assert (
        decide({"a": _with(transplant_properties={"sharpness": sharp})}, None, A, rgb=True).verdict == "pass"
    )


def test_a_hue_finding_names_its_grey_axis_control_not_the_opposite_change() -> None:
    hue = Transplant(flip_rate=0.56, control_flip_rate=0.04, pairs=50, discordant=(27, 1))
    sharp = _with(transplant_properties={"sharpness": replace(hue, flip_rate=0.6)})
    figures = {"a": _with(transplant_properties={"hue": hue}), "b": sharp}
    found = {w.test: w.sentence for w in decide(figures, None, A, rgb=True).warnings}
    assert found["property:hue"].startswith(
        "class 'a': changing other classes' images to its level of hue flips 56% of them to 'a' (4% for its "
        "control: the same pixels moved as far along the grey axis, hue kept; 50 images, p < 0.001, adjusted "
        "< 0.001 over 14 tests). Reported, not failed (audit.severity.property: warning)"
    ), found["property:hue"]
    assert f"(4% {verdict.PROPERTY_CONTROLS}; 50 images" in found["property:sharpness"]


def test_a_property_that_alone_tells_a_class_is_a_data_warning() -> None:
    probe = PropertyProbe(
        accuracy=0.5, majority_accuracy=0.5, used_file_properties=False, top_properties=(), per_class_f1={},
        auroc={"a": {"noise": PropertyScore(auroc=0.97, p_value=0.001, class_median=0.1, others_median=0.02)},
               "b": {"noise": PropertyScore(auroc=0.6, p_value=0.001, class_median=0.03, others_median=0.0)}},
    )  # fmt: skip
    result = decide({"a": CLEAN, "b": CLEAN}, probe, A)
    assert result.verdict == "pass"
    (warning,) = result.warnings
    assert warning.test == "data_property:noise" and "AUROC 0.97" in warning.sentence
