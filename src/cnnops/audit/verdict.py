"""From figures to a verdict, with one sentence per finding that a person can act on.

Saliency maps alone miss unknown spurious signals and raise false alarms (Adebayo et al., ICLR
2022, "Post hoc explanations may be ineffective for detecting unknown spurious correlation"), so
a `fail` rests only on an intervention (transplant, deletion) or on annotated masks. Saliency
statistics and the data-property probe become warnings: they say where to look.

Every transplant of every class is one test: its p-value is an exact paired test on the
recipients (McNemar's, on the pairs the paste and its largest control disagree on) and the
Benjamini-Hochberg procedure controls the false discoveries over all of them together, so a
ten-class audit of a dozen places is not a hundred chances of a false alarm. Each test family
has a severity (`audit.severity`): a family at warning reports its findings and cannot fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from scipy.stats import false_discovery_control, fisher_exact

from cnnops.audit.contract import (
    ClassFigures,
    Decision,
    Finding,
    Hypothesis,
    PropertyProbe,
    Transplant,
    TransplantKind,
)
from cnnops.audit.evidence import OBJECT_SIGNIFICANCE, SPREAD_OUT, mcnemar_p
from cnnops.audit.regions import OUTER_BAND
from cnnops.config import AuditParams

OFF_OBJECT_FOR_DELETION = 0.5  # deletion counts only when most of the removed pixels lie off the object
BAND_EXCESS_WARNING = 0.1  # outer-band saliency share above the other classes' by this much: a pointer
MIN_IMAGES = 3  # fewer correctly classified images than this: the class cannot be judged
COVERAGE = "coverage"  # the warning of a class with too few images: the verdict is inconclusive
UNDERPOWERED = "underpowered"  # a test over the threshold whose pairs are too few for its adjusted p-value
OTHER_PIXELS = "when the same pixels come from other classes"
TOP_CONTROLS = "for the larger control: the same pixels from other classes' images, or from its other images"
TOP_CONTROLS_ALONE = f"{OTHER_PIXELS}; too few other images of its own to take them from"
PLACE_CONTROLS_NO_SHUFFLE = "for the larger control: that place from other classes, or evened out"
PLACE_CONTROLS = "for the larger control: that place from other classes, evened out, or its pixels shuffled"
MEAN_CONTROLS = "for the larger control: the other classes' mean there, or the place evened out"
TONE_CONTROLS = "with other classes' tone, or the opposite change"
PATCH_CONTROLS = (
    "for the larger control: the same shape cut at the same places from other classes' images, or from "
    "its other images"
)
PATCH_OTHERS = "when the same shape is cut from other classes' images at the same places"
PATCH_CONTROLS_ALONE = f"{PATCH_OTHERS}; too few other images of its own to cut it from them"
PROPERTY_CONTROLS = (
    "for the larger control: the opposite change, the other classes' level, or (two classes, a blur) "
    "their object scrambled at their own detail"
)
# A hue turn's one control (`property_interventions._grey_control`): the opposite turn also sends a
# model that learned "an unnatural hue -> class" there, so it is no control for a hue.
HUE_CONTROLS = "for its control: the same pixels moved as far along the grey axis, hue kept"
# The test family (`audit.severity.<family>`) of each transplant kind; kinds not named are places.
FAMILY: dict[str, str] = {"tone": "tone", "property": "property"}
# How to tell a genuine class property from a shortcut, per family: the end of each finding's sentence.
GENUINE = {
    "place": "if the class's object itself sits there in every image (a part that never moves), it is "
    "the class; if not, the place is a shortcut: remove the cue from the data, or set "
    "audit.severity.place: warning once it is understood",
    "tone": "brightness, contrast and colour can be the class itself (a flower's colour, a night sky) or a "
    "shortcut (one scanner's exposure, one site's stain): if every image of the class must look so, set "
    "audit.severity.tone: warning (or off); if not, even out the acquisition",
    "property": "an image property can be the class itself (a texture class is sharp) or a shortcut (one "
    "camera's blur or grain, one archive's JPEG quality): if every image of the class must look so, set "
    "audit.severity.property: warning (or off); if not, even out the acquisition",
}


def family_of(kind: str) -> str:
    """The `audit.severity` key that governs a transplant kind."""
    return FAMILY.get(kind, "place")


def severities(a: AuditParams, rgb: bool) -> dict[str, str]:
    """Each family's severity for this audit: `auto` is error on single-channel images, warning on RGB."""
    return {
        family: ("warning" if rgb else "error") if level == "auto" else level
        for family, level in a.severity.model_dump().items()
    }


def _pct(v: float) -> str:
    """A share as a whole percentage: sentences give rough figures, the report the exact ones."""
    return f"{100 * v:.0f}%"


def p_value(t: Transplant) -> float:
    """One-sided p-value that the paste flips more recipients than its largest control.

    With the discordant pairs (the same recipients in both arms), McNemar's exact test: under no
    effect a recipient that only one arm flips is as likely either way, a binomial with p = 1/2.
    Pairs flipped by both or neither say nothing about the difference, so a control that flips the
    same weak recipients does not dilute it. Without them (rates only), Fisher's exact test on the
    two rates, as if the arms were independent samples. A test split of a few dozen images gives each
    flip a weight of several percent; the threshold says how large an effect must be, this says
    whether so few pairs can show it.
    """
    if t.discordant is not None:
        return mcnemar_p(*t.discordant)
    n = t.pairs
    k, c = round(t.flip_rate * n), round(t.control_flip_rate * n)
    return float(fisher_exact([[k, n - k], [c, n - c]], alternative="greater").pvalue)


def _where(where: str | None) -> str:
    """Where the most-attended pixels lie, as a sentence says it ("spread out": no common place)."""
    return SPREAD_OUT if where == SPREAD_OUT else f"mostly at the {where}"


def _p_words(p: float) -> str:
    """A p-value as a sentence gives it: tiny ones as a bound."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _transplant_words(
    kind: TransplantKind, place: str | None, t: Transplant, a: AuditParams, rgb: bool
) -> tuple[str, str, str]:
    """(test, what was pasted, what its control pasted) of one transplant, for its finding."""
    if kind == "top":
        what = (
            f"pasting its most-attended {t.pixels} pixels ({_pct(a.top_fraction)} of the image, "
            f"{_where(t.where)}) into other classes' images"
        )
        controls = _object_controls(t, TOP_CONTROLS, TOP_CONTROLS_ALONE, OTHER_PIXELS)
        return "transplant_top", what, controls
    if kind == "region":
        controls = PLACE_CONTROLS if t.shuffled_flip_rate is not None else PLACE_CONTROLS_NO_SHUFFLE
        return (
            f"transplant:{place}",
            f"pasting the {place} of its images into other classes' images",
            controls,
        )
    if kind == "mean":
        what = f"pasting the {place} its images have in common (their mean) into other classes' images"
        return f"transplant_mean:{place}", what, MEAN_CONTROLS
    if kind == "property":
        what = f"changing other classes' images to its level of {place}"
        return f"property:{place}", what, HUE_CONTROLS if place == "hue" else PROPERTY_CONTROLS
    if kind == "tone":
        tone = "brightness, contrast and colour (per channel)" if rgb else "brightness and contrast"
        return "transplant_tone", f"giving other classes' images the {tone} of its images", TONE_CONTROLS
    if kind == "patch":  # place: "recurring patch <i> at random places" or "... at its own place"
        patch, _, where = (place or "").partition(" at ")
        what = (
            f"pasting a {patch} of its images (a salient patch of about {t.pixels} pixels found in many "
            f"of them, wherever it sat) at {where} into other classes' images"
        )
        controls = _object_controls(t, PATCH_CONTROLS, PATCH_CONTROLS_ALONE, PATCH_OTHERS)
        return f"patch:{place}", what, controls
    return f"{kind}:{place}", f"pasting its {kind} {place or ''} into other classes' images", OTHER_PIXELS


def _object_controls(t: Transplant, both: str, alone: str, others: str) -> str:
    """The controls' words of a paste with an object control: `both` counted, `alone` (not run), or
    `others` and why it was not counted where it flipped more than the counted control
    (`evidence.object_counts`)."""
    if t.same_class_flip_rate is None:
        return alone
    if t.same_class_flip_rate <= t.control_flip_rate:
        return both
    return (
        f"{others}; from its other images {_pct(t.same_class_flip_rate)}, not counted: no more than "
        f"from other classes at a one-sided p ≤ {OBJECT_SIGNIFICANCE:g}, so not a part its images share there"
    )


def _tests(
    figures: dict[str, ClassFigures], levels: dict[str, str]
) -> Iterator[tuple[str, TransplantKind, str | None, Transplant]]:
    """Every transplant that is a test: of an auditable class, with pairs, its family not off."""
    for name, f in figures.items():
        if f.n_correct < MIN_IMAGES:
            continue
        for kind, place, t in f.transplants():
            if t.pairs and levels[family_of(kind)] != "off":
                yield name, kind, place, t


def _transplant_findings(
    figures: dict[str, ClassFigures], a: AuditParams, levels: dict[str, str], rgb: bool
) -> tuple[list[Finding], list[Finding], list[Hypothesis]]:
    """(failures, warnings, every test) of the transplants of every class: a finding where the flip
    rate beats its control by the threshold or more at a Benjamini-Hochberg adjusted p-value at most
    `significance`; a failure when its family's severity is error."""
    tests = list(_tests(figures, levels))
    raw = [p_value(t) for *_, t in tests]
    adjusted = [float(v) for v in false_discovery_control(raw, method="bh")] if raw else []
    failures, warnings, records = [], [], []
    for (name, kind, place, t), p, q in zip(tests, raw, adjusted, strict=True):
        test, what, control = _transplant_words(kind, place, t, a, rgb)
        family = family_of(kind)
        level = levels[family]
        records.append(
            Hypothesis(
                class_name=name, test=test, family=family, severity=level, effect=round(t.excess, 4),  # type: ignore[arg-type]
                p_value=round(p, 6), p_adjusted=round(q, 6),
            )
        )  # fmt: skip
        if t.excess < a.transplant_flip_threshold:
            continue
        c = f"'{name}'"
        flips = f"class {c}: {what} flips {_pct(t.flip_rate)} of them to {c}"
        odds = f"{_p_words(p)}, {_p_words(q).replace('p', 'adjusted', 1)} over {len(tests)} tests"
        if q > a.significance:  # a pass on too few pairs is no evidence: say so (a family at warning: no)
            if level == "error":
                why = (
                    f"{t.pairs} images are too few to show it ({odds}, above significance {a.significance:g})"
                )
                warnings.append(
                    _measured(
                        name, f"{UNDERPOWERED}:{test}", t, (p, q), a,
                        f"{flips} ({_pct(t.control_flip_rate)} for its largest control), over the threshold, "
                        f"but {why}: not failed; audit more test images a class before trusting a pass",
                    )
                )  # fmt: skip
            continue
        finding = _measured(
            name, test, t, (p, q), a,
            f"{flips} ({_pct(t.control_flip_rate)} {control}; {t.pairs} images, {odds})"
            + (f". {_genuine(family, level)}" if family != "place" or level == "warning" else ""),
        )  # fmt: skip
        (failures if level == "error" else warnings).append(finding)
    return failures, warnings, records


def _measured(
    name: str, test: str, t: Transplant, p: tuple[float, float], a: AuditParams, sentence: str
) -> Finding:
    """A transplant's finding with its effect and its raw and adjusted p-value (`p`). `underpowered:`
    ones are over the threshold but not significant after adjustment: on a small test split a learned
    cue then passes (a patch on 40 photo crops a class, docs/audit.md)."""
    return Finding(
        class_name=name,
        test=test,
        value=round(t.excess, 4),
        threshold=a.transplant_flip_threshold,
        p_value=round(p[0], 6),
        p_adjusted=round(p[1], 6),
        sentence=sentence,
    )


def _genuine(family: str, level: str) -> str:
    """The end of a finding's sentence: how to tell the class from a shortcut, and which key to set."""
    text = GENUINE[family]
    if level == "warning":
        return f"Reported, not failed (audit.severity.{family}: warning): {text}"
    return text[0].upper() + text[1:]


def _deletion_finding(name: str, f: ClassFigures, a: AuditParams) -> list[Finding]:
    """The deletion failure, when removing the most-attended pixels (mostly off the object) hurts
    more than removing a random place."""
    d = f.deletion
    if d.gap < a.deletion_gap_threshold or f.top_off_object < OFF_OBJECT_FOR_DELETION:
        return []
    sentence = (
        f"class '{name}': removing its most-attended pixels ({_where(f.transplant_top.where)}, "
        f"{_pct(f.top_off_object)} of them off the object) lowers "
        f"its confidence by {d.drop_top:.2f}, {d.gap:.2f} more than removing a random region "
        "of the same size; the object's extent is estimated from pixels unless data/annotations.csv "
        "gives masks: if the removed pixels are the object itself, masks make this exact "
        "(audit.severity.deletion decides whether it fails)"
    )
    return [
        Finding(
            class_name=name,
            test="deletion",
            value=d.gap,
            threshold=a.deletion_gap_threshold,
            sentence=sentence,
        )
    ]


def _mask_finding(name: str, f: ClassFigures, a: AuditParams) -> list[Finding]:
    """The masks failure, when too few of the most-attended pixels lie inside the annotated objects."""
    m = f.masks
    if m is None or m.top_inside >= a.mask_inside_threshold:
        return []
    sentence = (
        f"class '{name}': only {_pct(m.top_inside)} of its most-attended pixels lie "
        f"inside the annotated objects (the peak hits the object in "
        f"{_pct(m.pointing_hit_rate)} of {m.n} images)"
    )
    return [
        Finding(
            class_name=name,
            test="masks",
            value=m.top_inside,
            threshold=a.mask_inside_threshold,
            sentence=sentence,
        )
    ]


def _band_warning(name: str, f: ClassFigures) -> list[Finding]:
    """A pointer, never a failure: more of the class's saliency in the outer band than the others'."""
    band, band_others = f.energy[OUTER_BAND], f.energy_others[OUTER_BAND]
    if band - band_others < BAND_EXCESS_WARNING:
        return []
    sentence = (
        f"class '{name}': {_pct(band)} of its saliency sits in the outer band against "
        f"{_pct(band_others)} for other classes (saliency only: see the transplant figures)"
    )
    return [
        Finding(
            class_name=name,
            test="border_energy",
            value=round(band, 4),
            threshold=BAND_EXCESS_WARNING,
            sentence=sentence,
        )
    ]


def class_findings(
    name: str, f: ClassFigures, a: AuditParams, levels: dict[str, str]
) -> tuple[list[Finding], list[Finding]]:
    """(failures, warnings) of one class's tests that are not transplants (those are judged together,
    `_transplant_findings`): deletion and masks at their severity, the saliency pointer, coverage."""
    if f.n_correct < MIN_IMAGES:
        sentence = (
            f"class '{name}': only {f.n_correct} correctly classified test image(s); too few to audit "
            "(add test images or train longer)"
        )
        return [], [
            Finding(
                class_name=name, test=COVERAGE, value=f.n_correct, threshold=MIN_IMAGES, sentence=sentence
            )
        ]
    failures, warnings = [], _band_warning(name, f)
    for family, found in (("deletion", _deletion_finding(name, f, a)), ("masks", _mask_finding(name, f, a))):
        if levels[family] == "error":
            failures += found
        elif levels[family] == "warning":
            warnings += [_at_warning(r, family) for r in found]
    return failures, warnings


def _at_warning(finding: Finding, family: str) -> Finding:
    """A finding of a family at warning: reported, with the key that made it so."""
    return replace(
        finding, sentence=f"{finding.sentence} (reported, not failed: audit.severity.{family}: warning)"
    )


def _probe_warnings(probe: PropertyProbe, a: AuditParams) -> list[Finding]:
    """A warning per class that simple image properties alone predict: a cue in the data."""
    top = ", ".join(p.name for p in probe.top_properties) or "none"
    return [
        Finding(
            class_name=name,
            test="data_properties",
            value=f1,
            threshold=a.property_f1_threshold,
            sentence=f"class '{name}': simple image properties alone (mostly {top}) predict it with F1 "
            f"{f1:.2f}: a cue in the data the model may have taken",
        )
        for name, f1 in probe.per_class_f1.items()
        if f1 >= a.property_f1_threshold
    ]


def _property_warnings(probe: PropertyProbe, a: AuditParams) -> list[Finding]:
    """A warning per class and image property that alone tells the class from the rest on the train
    split (one-vs-rest AUROC at `property_auroc` or beyond, permutation p at most `significance`)."""
    found = []
    for name, scores in probe.auroc.items():
        for prop, s in scores.items():
            strength = max(s.auroc, 1 - s.auroc)
            if strength < a.property_auroc or s.p_value > a.significance:
                continue
            side = "higher" if s.class_median > s.others_median else "lower"
            found.append(
                Finding(
                    class_name=name,
                    test=f"data_property:{prop}",
                    value=round(strength, 4),
                    threshold=a.property_auroc,
                    p_value=s.p_value,
                    sentence=f"class '{name}': its train images' {prop} alone tells it from the others "
                    f"(AUROC {s.auroc:.2f}, {side}: median {s.class_median:.3g} against "
                    f"{s.others_median:.3g}, "
                    f"permutation {_p_words(s.p_value)}): a cue in the data; the property transplant says "
                    "whether the model uses it",
                )
            )
    return found


def _cancelling(t: Transplant) -> tuple[str, float, float] | None:
    """(the warning's test prefix, its rate, the largest other control's) where one control alone can
    cancel a paste: the evened place, or the object control of the most-attended pixels and of a
    recurring patch (`evidence.other_donors`; counted with their other-classes control only, a
    patch's shuffled pixels being reported beside)."""
    if t.evened_flip_rate is not None:
        arm, rate, others = "evened", t.evened_flip_rate, (t.other_classes_flip_rate, t.shuffled_flip_rate)
    elif t.same_class_flip_rate is not None:
        arm, rate, others = "object", t.same_class_flip_rate, (t.other_classes_flip_rate,)
    else:
        return None
    measured = [v for v in others if v is not None]
    return (arm, rate, max(measured)) if measured else None


def _why_not_blamed(arm: str, kind: TransplantKind, rate: float, name: str) -> str:
    """The end of a cancelled paste's warning: what cancelled it and what that suggests."""
    if arm == "evened":
        return (
            f"the place filled in from its surroundings alone flips {_pct(rate)}, so it is not blamed: a "
            f"smooth or empty place there may be what the model reads as '{name}' (look at the place)"
        )
    what, look = ("the patch is", "its exemplars") if kind == "patch" else ("those pixels are", "overlays")
    return (
        f"the same places cut from its other images flip nearly as often ({_pct(rate)}), so it is not "
        f"blamed: {what} likely part of the '{name}' itself, or a cue at one place in all its images, "
        f"which the fixed places test (look at {look} in the gallery)"
    )


def _cancelled_warnings(figures: dict[str, ClassFigures], a: AuditParams, rgb: bool) -> list[Finding]:
    """A warning where a paste beats its other controls by the threshold but one control alone flips
    as often (`_cancelling`): the evened place (removing the place's content is what cancels the
    flip, so a "smooth place -> class" shortcut would pass silently) or a recurring patch's object
    control (the patch is likely the class's object). The warning says where to look."""
    found = []
    for name, f in figures.items():
        if f.n_correct < MIN_IMAGES:
            continue
        for kind, place, t in f.transplants():
            cancel = _cancelling(t)
            if cancel is None or t.excess >= a.transplant_flip_threshold:
                continue
            arm, rate, others = cancel
            beyond = t.flip_rate - others
            if beyond < a.transplant_flip_threshold or rate < others:
                continue
            test, what, _ = _transplant_words(kind, place, t, a, rgb)
            found.append(
                Finding(
                    class_name=name,
                    test=f"{arm}:{test}",
                    value=round(beyond, 4),
                    threshold=a.transplant_flip_threshold,
                    sentence=f"class '{name}': {what} flips {_pct(t.flip_rate)} of them to '{name}', "
                    f"{_pct(beyond)} beyond the other controls, but {_why_not_blamed(arm, kind, rate, name)}",
                )
            )
    return found


def decide(
    figures: dict[str, ClassFigures], probe: PropertyProbe | None, a: AuditParams, *, rgb: bool = False
) -> Decision:
    """The verdict block of reports/audit.json: verdict, failures (worst first), warnings, the
    families run at warning and every test with its raw and adjusted p-value. `rgb`: the audited
    images have three channels (resolves `auto` severities)."""
    levels = severities(a, rgb)
    failures, warnings, tests = _transplant_findings(figures, a, levels, rgb)
    for name, f in figures.items():
        fail, warn = class_findings(name, f, a, levels)
        failures += fail
        warnings += warn
    warnings += _cancelled_warnings(figures, a, rgb)
    if probe is not None:
        warnings += _probe_warnings(probe, a) + _property_warnings(probe, a)
    failures.sort(key=lambda r: -r.value if r.test != "masks" else r.value - 1)
    # A class too few images to audit was never looked at: no failure there is not a pass.
    unaudited = any(w.test == COVERAGE for w in warnings)
    return Decision(
        verdict="fail" if failures else "inconclusive" if unaudited else "pass",
        failed_classes=tuple(sorted({r.class_name for r in failures})),
        failures=tuple(failures),
        warnings=tuple(warnings),
        at_warning=tuple(family for family, level in levels.items() if level == "warning"),
        tests=tuple(tests),
    )
