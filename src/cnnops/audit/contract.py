"""The audit's results as types: what the evidence and the probe measure, what the verdict decides.

A module of its own, not part of evidence.py, because most of its readers (the verdict, the
gallery, the detection benchmark) never touch a tensor: importing the types loads no model code.
Every key of reports/audit.json is a field name here (or a field's `KEY`), and `to_json` is the
one place that turns them into the report's dicts, in field order: the report's layout is the
order of the fields below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

KEY = "key"  # field metadata: the report's key where the field cannot be named so (`class`)
OMIT_NONE = "omit_none"  # field metadata: no key at all while None (a control that was not measured)
INLINE = "inline"  # field metadata: the field's own fields sit in its parent (the verdict's)

TransplantKind = Literal["top", "region", "mean", "tone", "property", "patch"]


def _measured_only() -> Any:
    """A field that is None, and absent from the report, where its test did not measure it."""
    return field(default=None, metadata={OMIT_NONE: True})


@dataclass(frozen=True)
class Transplant:
    """One transplant: the share of recipients now predicted as the class, against its control.

    `control_flip_rate` is the largest of the controls measured; the measured ones are kept apart.
    `pairs` (the pasted recipients) is the number of images behind both rates, the p-value's input.
    `pixels` and `where` say how large the most-attended place is and where it sits.
    """

    flip_rate: float
    control_flip_rate: float
    pairs: int
    other_classes_flip_rate: float | None = _measured_only()
    evened_flip_rate: float | None = _measured_only()
    shuffled_flip_rate: float | None = _measured_only()
    # a recurring patch's object control: the same shape cut at the same places from another of the
    # class's own images (None: too few of them, or not a recurring patch)
    same_class_flip_rate: float | None = _measured_only()
    pixels: int | None = _measured_only()
    where: str | None = _measured_only()
    # (recipients the paste flipped and the largest control did not, the reverse): the exact paired
    # test's input (McNemar); None where the evidence kept only the rates (then Fisher's test is used)
    discordant: tuple[int, int] | None = _measured_only()

    @property
    def excess(self) -> float:
        """What the class's content adds beyond the control: the figure the threshold applies to."""
        return self.flip_rate - self.control_flip_rate


@dataclass(frozen=True)
class Attention:
    """How fixed the saliency peak is across images, against how much the objects move."""

    peak_spread: float
    object_spread: float
    peak_off_object: float


@dataclass(frozen=True)
class Deletion:
    """Confidence drop when the most-attended pixels go, against a random place of the same shape."""

    drop_top: float
    drop_random: float
    gap: float


@dataclass(frozen=True)
class MaskAgreement:
    """Saliency against the annotated objects of `n` images."""

    n: int
    energy_inside: float
    top_inside: float
    pointing_hit_rate: float


@dataclass(frozen=True)
class Errors:
    """The saliency figures of the class's misclassified images (None without any)."""

    n: int
    energy: dict[str, float] | None
    attention: Attention | None


@dataclass(frozen=True)
class RecurringPatch:
    """A salient patch that recurs in the class's images wherever it sits (`discovery`), pasted into
    other classes' images at random places and at its own places, each against its controls."""

    images: int  # the class's images holding it
    support: float  # their share of the class's audited correct images
    members: int  # components in its cluster
    at_random_places: Transplant
    at_own_place: Transplant


@dataclass(frozen=True)
class ClassFigures:
    """Every test's figures for one class: `classes.<name>` in the report."""

    n_correct: int
    n_errors: int
    attention: Attention
    top_off_object: float
    energy: dict[str, float]  # saliency share per candidate region
    energy_others: dict[str, float]  # the same on other classes' images
    transplant_top: Transplant
    transplant_regions: dict[str, Transplant]
    transplant_regions_mean: dict[str, Transplant]
    transplant_tone: Transplant
    deletion: Deletion
    masks: MaskAgreement | None
    errors: Errors
    method_agreement: dict[str, float] = field(default_factory=dict)  # IoU with the first method
    # per flagged image property (`properties.PROPERTIES`): recipients changed to the class's level
    transplant_properties: dict[str, Transplant] = field(default_factory=dict)
    recurring: tuple[RecurringPatch, ...] = ()  # recurring salient patches anywhere (discovery)

    def transplants(self) -> list[tuple[TransplantKind, str | None, Transplant]]:
        """Every transplant with its kind and place (a candidate region, or None), in report order."""
        return [
            ("top", None, self.transplant_top),
            *[("region", place, t) for place, t in self.transplant_regions.items()],
            *[("mean", place, t) for place, t in self.transplant_regions_mean.items()],
            ("tone", None, self.transplant_tone),
            *[("property", name, t) for name, t in self.transplant_properties.items()],
            *[
                ("patch", f"recurring patch {i} at {where}", t)
                for i, p in enumerate(self.recurring, 1)
                for where, t in (("random places", p.at_random_places), ("its own place", p.at_own_place))
            ],
        ]


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One failure or warning: which class, which test, its figure against the threshold, in words."""

    class_name: str = field(metadata={KEY: "class"})
    test: str
    value: float
    threshold: float
    p_value: float | None = _measured_only()  # transplants only: their flips against the control
    p_adjusted: float | None = _measured_only()  # ... Benjamini-Hochberg over every test of every class
    sentence: str


@dataclass(frozen=True, kw_only=True)
class Hypothesis:
    """One statistical test of the audit (a transplant of one class) with its raw and adjusted p-value:
    `tests` in the report lists every one the false-discovery control counted."""

    class_name: str = field(metadata={KEY: "class"})
    test: str
    family: str  # the `audit.severity` key that governs it
    severity: Literal["error", "warning"]
    effect: float  # flip rate minus the largest control
    p_value: float
    p_adjusted: float


@dataclass(frozen=True)
class Decision:
    """The verdict block: `fail` when any finding is a failure, `inconclusive` when none is but a
    class could not be audited (too few correct images); failures worst first."""

    verdict: Literal["pass", "fail", "inconclusive"]
    failed_classes: tuple[str, ...]
    failures: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    at_warning: tuple[str, ...] = ()  # test families (`audit.severity`) run at warning: they cannot fail
    tests: tuple[Hypothesis, ...] = ()  # every test the false-discovery control counted, raw and adjusted


@dataclass(frozen=True)
class PropertyWeight:
    """A property the data-property probe split on, with its share of the tree's importance."""

    name: str = field(metadata={KEY: "property"})
    importance: float


@dataclass(frozen=True)
class PropertyScore:
    """How well one image property alone tells a class from the rest: one-vs-rest AUROC (0.5: not at
    all; 0 or 1: perfectly, lower or higher) with its permutation p-value, on the train split."""

    auroc: float
    p_value: float
    class_median: float
    others_median: float


@dataclass(frozen=True)
class PropertyProbe:
    """Whether simple image and file properties alone predict the label (a warning, never a fail)."""

    accuracy: float
    majority_accuracy: float
    used_file_properties: bool
    top_properties: tuple[PropertyWeight, ...]
    per_class_f1: dict[str, float]
    auroc: dict[str, dict[str, PropertyScore]] = field(default_factory=dict)  # class -> property -> score


@dataclass(frozen=True)
class AuditReport:
    """reports/audit.json: the verdict, what was audited and how, and every class's figures."""

    decision: Decision = field(metadata={INLINE: True})
    model: str
    methods: tuple[str, ...]
    target_layer: str
    n_images: int
    annotated_images: int
    thresholds: dict[str, Any]  # params.yaml `audit:` as used
    data_properties: PropertyProbe
    classes: dict[str, ClassFigures]
    # what chose the places instead of the first method's map, and why (absent when it chose them)
    places_chosen_by: str | None = _measured_only()
    # which model was audited: its MLflow run and its checkpoint's SHA-256 (what `cure` checks it acts on)
    run_id: str | None = _measured_only()
    checkpoint_sha256: str | None = _measured_only()


def to_json(value: Any) -> Any:
    """`value` as the report's JSON values: dataclasses become dicts keyed as the fields say."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            v = getattr(value, f.name)
            if v is None and f.metadata.get(OMIT_NONE):
                continue
            if f.metadata.get(INLINE):
                out.update(to_json(v))
            else:
                out[f.metadata.get(KEY, f.name)] = to_json(v)
        return out
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value
