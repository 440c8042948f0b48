"""From figures to a verdict, with one sentence per finding that a person can act on.

Saliency maps alone miss unknown spurious signals and raise false alarms (Adebayo et al., ICLR
2022, "Post hoc explanations may be ineffective for detecting unknown spurious correlation"), so
a `fail` rests only on an intervention (transplant, deletion) or on annotated masks. Saliency
statistics and the data-property probe become warnings: they say where to look.
"""

from __future__ import annotations

from scipy.stats import fisher_exact

from cnnops.audit.contract import ClassFigures, Decision, Finding, PropertyProbe, Transplant, TransplantKind
from cnnops.audit.regions import OUTER_BAND
from cnnops.config import AuditParams

OFF_OBJECT_FOR_DELETION = 0.5  # deletion counts only when most of the removed pixels lie off the object
BAND_EXCESS_WARNING = 0.1  # outer-band saliency share above the other classes' by this much: a pointer
MIN_IMAGES = 3  # fewer correctly classified images than this: the class cannot be judged
COVERAGE = "coverage"  # the warning of a class with too few images: the verdict is inconclusive
OTHER_PIXELS = "when the same pixels come from other classes"
PLACE_CONTROLS_NO_SHUFFLE = "for the larger control: that place from other classes, or evened out"
PLACE_CONTROLS = "for the larger control: that place from other classes, evened out, or its pixels shuffled"
MEAN_CONTROLS = "for the larger control: the other classes' mean there, or the place evened out"
TONE_CONTROLS = "with other classes' tone, or the opposite change"


def _pct(v: float) -> str:
    """A share as a whole percentage: sentences give rough figures, the report the exact ones."""
    return f"{100 * v:.0f}%"


def p_value(t: Transplant) -> float:
    """One-sided Fisher exact test that the flips beat the control by more than chance, given the pairs.

    A test split of a few dozen images gives each flip a weight of several percent; the threshold
    says how large an effect must be, this says whether so few pairs can show it.
    """
    n = t.pairs
    k, c = round(t.flip_rate * n), round(t.control_flip_rate * n)
    return float(fisher_exact([[k, n - k], [c, n - c]], alternative="greater").pvalue)


def _p_words(p: float) -> str:
    """A p-value as a sentence gives it: tiny ones as a bound."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _transplant_words(
    kind: TransplantKind, place: str | None, t: Transplant, a: AuditParams
) -> tuple[str, str, str]:
    """(test, what was pasted, what its control pasted) of one transplant, for its finding."""
    if kind == "top":
        what = (
            f"pasting its most-attended {t.pixels} pixels ({_pct(a.top_fraction)} of the image, "
            f"mostly at the {t.where}) into other classes' images"
        )
        return "transplant_top", what, OTHER_PIXELS
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
    return (
        "transplant_tone",
        "giving other classes' images the brightness and contrast of its images",
        TONE_CONTROLS,
    )


def _transplant_findings(name: str, f: ClassFigures, a: AuditParams) -> list[Finding]:
    """Findings of the transplants whose flip rate beats their control by the threshold or more,
    at the significance level."""
    q = f"'{name}'"
    found = []
    for kind, place, t in f.transplants():
        if not t.pairs or t.excess < a.transplant_flip_threshold:
            continue
        p = p_value(t)
        if p > a.significance:
            continue
        test, what, control = _transplant_words(kind, place, t, a)
        found.append(
            Finding(
                class_name=name,
                test=test,
                value=round(t.excess, 4),
                threshold=a.transplant_flip_threshold,
                p_value=round(p, 6),
                sentence=f"class {q}: {what} flips {_pct(t.flip_rate)} of them to {q} "
                f"({_pct(t.control_flip_rate)} {control}; {t.pairs} images, {_p_words(p)})",
            )
        )
    return found


def _deletion_finding(name: str, f: ClassFigures, a: AuditParams) -> list[Finding]:
    """The deletion failure, when removing the most-attended pixels (mostly off the object) hurts
    more than removing a random place."""
    d = f.deletion
    if d.gap < a.deletion_gap_threshold or f.top_off_object < OFF_OBJECT_FOR_DELETION:
        return []
    sentence = (
        f"class '{name}': removing its most-attended pixels (mostly at the "
        f"{f.transplant_top.where}, {_pct(f.top_off_object)} of them off the object) lowers "
        f"its confidence by {d.drop_top:.2f}, {d.gap:.2f} more than removing a random region "
        "of the same size"
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


def class_findings(name: str, f: ClassFigures, a: AuditParams) -> tuple[list[Finding], list[Finding]]:
    """(failures, warnings) of one class."""
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
    failures = _transplant_findings(name, f, a) + _deletion_finding(name, f, a) + _mask_finding(name, f, a)
    return failures, _band_warning(name, f)


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


def decide(figures: dict[str, ClassFigures], probe: PropertyProbe | None, a: AuditParams) -> Decision:
    """The verdict block of reports/audit.json: verdict, failures (worst first), warnings."""
    failures: list[Finding] = []
    warnings: list[Finding] = []
    for name, f in figures.items():
        fail, warn = class_findings(name, f, a)
        failures += fail
        warnings += warn
    if probe is not None:
        warnings += _probe_warnings(probe, a)
    failures.sort(key=lambda r: -r.value if r.test != "masks" else r.value - 1)
    # A class too few images to audit was never looked at: no failure there is not a pass.
    unaudited = any(w.test == COVERAGE for w in warnings)
    return Decision(
        verdict="fail" if failures else "inconclusive" if unaudited else "pass",
        failed_classes=tuple(sorted({r.class_name for r in failures})),
        failures=tuple(failures),
        warnings=tuple(warnings),
    )
