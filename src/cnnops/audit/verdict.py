"""From figures to a verdict, with one sentence per finding that a person can act on.

Saliency maps alone miss unknown spurious signals and raise false alarms (Adebayo et al., ICLR
2022, "Post hoc explanations may be ineffective for detecting unknown spurious correlation"), so
a `fail` rests only on an intervention (transplant, deletion) or on annotated masks. Saliency
statistics and the data-property probe become warnings: they say where to look.
"""

from __future__ import annotations

from typing import Any

from scipy.stats import fisher_exact

from cnnops.config import AuditParams

OFF_OBJECT_FOR_DELETION = 0.5  # deletion counts only when most of the removed pixels lie off the object
BAND_EXCESS_WARNING = 0.1  # outer-band saliency share above the other classes' by this much: a pointer
MIN_IMAGES = 3  # fewer correctly classified images than this: the class cannot be judged
OTHER_PIXELS = "when the same pixels come from other classes"
PLACE_CONTROLS_NO_SHUFFLE = "for the larger control: that place from other classes, or evened out"
PLACE_CONTROLS = "for the larger control: that place from other classes, evened out, or its pixels shuffled"


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _excess(r: dict[str, Any]) -> float:
    return r["flip_rate"] - r["control_flip_rate"]


def p_value(r: dict[str, Any]) -> float:
    """One-sided Fisher exact test that the flips beat the control by more than chance, given the pairs.

    A test split of a few dozen images gives each flip a weight of several percent; the threshold
    says how large an effect must be, this says whether so few pairs can show it.
    """
    n = r["pairs"]
    k, c = round(r["flip_rate"] * n), round(r["control_flip_rate"] * n)
    return float(fisher_exact([[k, n - k], [c, n - c]], alternative="greater").pvalue)


def _p_words(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _crossing(name: str, candidates: list[tuple], a: AuditParams) -> list[dict[str, Any]]:
    """Findings of the transplants whose flip rate beats their control by the threshold or more,
    at the significance level.

    Each candidate is (test, figures, what was pasted, what its control pasted).
    """
    q = f"'{name}'"
    found = []
    for test, r, what, control in candidates:
        if not r["pairs"] or _excess(r) < a.transplant_flip_threshold:
            continue
        p = p_value(r)
        if p > a.significance:
            continue
        found.append(
            {
                "class": name,
                "test": test,
                "value": round(_excess(r), 4),
                "threshold": a.transplant_flip_threshold,
                "p_value": round(p, 6),
                "sentence": f"class {q}: {what} flips {_pct(r['flip_rate'])} of them to {q} "
                f"({_pct(r['control_flip_rate'])} {control}; {r['pairs']} images, {_p_words(p)})",
            }
        )
    return found


def _transplant_findings(name: str, f: dict[str, Any], a: AuditParams) -> list[dict[str, Any]]:
    top = f["transplant_top"]
    return _crossing(
        name,
        [
            (
                "transplant_top",
                top,
                f"pasting its most-attended {top['pixels']} pixels ({_pct(a.top_fraction)} of the image, "
                f"mostly at the {top['where']}) into other classes' images",
                OTHER_PIXELS,
            ),
            *[
                (
                    f"transplant:{region}",
                    r,
                    f"pasting the {region} of its images into other classes' images",
                    PLACE_CONTROLS if "shuffled_flip_rate" in r else PLACE_CONTROLS_NO_SHUFFLE,
                )
                for region, r in f["transplant_regions"].items()
            ],
            *[
                (
                    f"transplant_mean:{region}",
                    r,
                    f"pasting the {region} its images have in common (their mean) into other classes' images",
                    "for the larger control: the other classes' mean there, or the place evened out",
                )
                for region, r in f["transplant_regions_mean"].items()
            ],
            (
                "transplant_tone",
                f["transplant_tone"],
                "giving other classes' images the brightness and contrast of its images",
                "with other classes' tone, or the opposite change",
            ),
        ],
        a,
    )


def class_findings(name: str, f: dict[str, Any], a: AuditParams) -> tuple[list[dict], list[dict]]:
    """(failures, warnings) of one class."""
    q = f"'{name}'"
    if f["n_correct"] < MIN_IMAGES:
        return [], [
            {
                "class": name,
                "test": "coverage",
                "value": f["n_correct"],
                "threshold": MIN_IMAGES,
                "sentence": f"class {q}: only {f['n_correct']} correctly classified test image(s); "
                "too few to audit "
                "(add test images or train longer)",
            }
        ]
    failures = _transplant_findings(name, f, a)
    d = f["deletion"]
    if d["gap"] >= a.deletion_gap_threshold and f["top_off_object"] >= OFF_OBJECT_FOR_DELETION:
        failures.append(
            {
                "class": name,
                "test": "deletion",
                "value": d["gap"],
                "threshold": a.deletion_gap_threshold,
                "sentence": f"class {q}: removing its most-attended pixels (mostly at the "
                f"{f['transplant_top']['where']}, {_pct(f['top_off_object'])} of them off the object) lowers "
                f"its confidence by {d['drop_top']:.2f}, {d['gap']:.2f} more than removing a random region "
                "of the same size",
            }
        )
    masks = f.get("masks")
    if masks and masks["top_inside"] < a.mask_inside_threshold:
        failures.append(
            {
                "class": name,
                "test": "masks",
                "value": masks["top_inside"],
                "threshold": a.mask_inside_threshold,
                "sentence": f"class {q}: only {_pct(masks['top_inside'])} of its most-attended pixels lie "
                f"inside the annotated objects (the peak hits the object in "
                f"{_pct(masks['pointing_hit_rate'])} of {masks['n']} images)",
            }
        )
    warnings = []
    band, band_others = f["energy"]["outer band"], f["energy_others"]["outer band"]
    if band - band_others >= BAND_EXCESS_WARNING:
        warnings.append(
            {
                "class": name,
                "test": "border_energy",
                "value": round(band, 4),
                "threshold": BAND_EXCESS_WARNING,
                "sentence": f"class {q}: {_pct(band)} of its saliency sits in the outer band against "
                f"{_pct(band_others)} for other classes (saliency only: see the transplant figures)",
            }
        )
    return failures, warnings


def decide(figures: dict[str, dict], probe: dict | None, a: AuditParams) -> dict[str, Any]:
    """The verdict block of reports/audit.json: verdict, failures (worst first), warnings."""
    failures, warnings = [], []
    for name, f in figures.items():
        fail, warn = class_findings(name, f, a)
        failures += fail
        warnings += warn
    if probe is not None:
        top = ", ".join(p["property"] for p in probe["top_properties"]) or "none"
        for name, f1 in probe["per_class_f1"].items():
            if f1 >= a.property_f1_threshold:
                warnings.append(
                    {
                        "class": name,
                        "test": "data_properties",
                        "value": f1,
                        "threshold": a.property_f1_threshold,
                        "sentence": f"class '{name}': simple image properties alone (mostly {top}) "
                        f"predict it with F1 "
                        f"{f1:.2f}: a cue in the data the model may have taken",
                    }
                )
    failures.sort(key=lambda r: -r["value"] if r["test"] != "masks" else r["value"] - 1)
    return {
        "verdict": "fail" if failures else "pass",
        "failed_classes": sorted({r["class"] for r in failures}),
        "failures": failures,
        "warnings": warnings,
    }
