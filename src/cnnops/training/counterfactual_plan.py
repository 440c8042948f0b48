"""From a failed audit's findings to the cure's counterfactuals (`counterfactual.Cue`s).

Apart from the transform (`counterfactual`), which train imports: this reads the audit's report and
its geometry (`audit.regions`), which the train stage does not depend on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnnops.audit import property_interventions, regions
from cnnops.audit.contract import PropertyScore
from cnnops.data.splits import PreparedSplit
from cnnops.training.counterfactual import (
    CHANGES,
    Cue,
    PatchCue,
    PlaceCue,
    PropertyCue,
    ToneCue,
    class_means,
    tone_banks,
)


@dataclass(frozen=True)
class Plan:
    """The counterfactuals a failed audit calls for: the cues, and each failure addressed or not (why)."""

    cues: tuple[Cue, ...]
    addressed: tuple[dict[str, Any], ...]  # {"class", "test", "cue"}: what answers it
    not_addressed: tuple[dict[str, Any], ...]  # {"class", "test", "why"}


Exemplars = Callable[
    [], dict[str, tuple[tuple[np.ndarray, ...], ...]]
]  # class -> per patch, C x h x w in [0, 1]


def plan(
    audit: dict[str, Any],
    split: PreparedSplit,
    size: tuple[int, int],
    batch_size: int,
    seed: int,
    exemplars: Exemplars | None = None,
) -> Plan:
    """Cues for every failure of `audit` (reports/audit.json) that has one: a place (a fixed-place
    transplant, or the most-attended pixels' and deletion's place when it is one of the audit's) or
    the tone, or a recurring patch (its exemplars from `exemplars`, called once and only for a patch
    finding: it re-runs the audit's discovery). Places are the audit's own geometry (`regions`, at
    its thresholds) at the model's input `size`. Of one class's places, smallest first, one that
    holds most of a place already kept is answered by it: the smaller place holds the cue, and
    replacing a larger one in the class's own images would replace its object too."""
    places = _places(audit["thresholds"], size)
    found = functools.cache(exemplars) if exemplars is not None else None
    wanted: dict[tuple[int, str], list[dict[str, Any]]] = {}
    not_addressed = []
    for f in audit["failures"]:
        cue, why = _cue_of(f["test"], audit["classes"][f["class"]], places, found is not None)
        if cue is None:
            not_addressed.append({"class": f["class"], "test": f["test"], "why": why})
        else:
            key = (split.class_names.index(f["class"]), cue)
            wanted.setdefault(key, []).append({"class": f["class"], "test": f["test"]})
    cues: list[Cue] = []
    addressed = []
    for (cls, cue), answered in sorted(wanted.items(), key=lambda kv: _area(kv[0][1], places)):
        if cue == TONE:
            cues.append(ToneCue(cls, *tone_banks(split, cls, size, batch_size, seed)))
        elif cue.startswith(PATCH) and found is not None:
            cues.append(_patch_cue(cls, cue, audit, split.class_names[cls], found()))
        elif cue.startswith(PROPERTY):
            made = _property_cue(cls, cue.removeprefix(PROPERTY), audit, split, size, batch_size, seed)
            same = next((c for c in cues if isinstance(c, PropertyCue) and _same_change(c, made)), None)
            cues += [] if same is not None else [made]
            cue = f"{PROPERTY}{same.prop}" if same is not None else cue
        else:
            mask = torch.from_numpy(places[cue])
            held = next((c.place for c in cues if _holds(mask, c, cls)), None)
            if held is None:
                cues.append(PlaceCue(cls, cue, mask, *class_means(split, cls, size, batch_size)))
            cue = held or cue
        addressed += [{**a, "cue": cue} for a in answered]
    return Plan(tuple(cues), tuple(addressed), tuple(not_addressed))


def _places(thresholds: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """The audit's places at `size`, from the thresholds its report records (so the same pixels)."""
    t = thresholds
    return regions.intervention_regions(
        *size,
        border_fraction=t["border_fraction"],
        corner_fraction=t["corner_fraction"],
        edge_fractions=tuple(t["edge_fractions"]),
        centre_fraction=t["centre_fraction"],
        grids=tuple(t["grids"]),
    )


def _holds(mask: torch.Tensor, cue: Cue, cls: int) -> bool:
    """Whether `mask` holds most (80%) of a place cue of the same class."""
    return isinstance(cue, PlaceCue) and cue.cls == cls and (cue.mask & mask).sum() >= 0.8 * cue.mask.sum()


TONE = "tone"
PATCH = "recurring patch "
PROPERTY = "property:"
PROPERTY_SAMPLE = 256  # other classes' train images the property's strength is chosen on


def _same_change(kept: PropertyCue, made: PropertyCue) -> bool:
    """Whether `made` is the change a kept cue of its class already makes (sharpness and
    high-frequency energy both sharpen): one change answers both findings."""
    return (kept.cls, kept.change, kept.mirror) == (made.cls, made.change, made.mirror)


def _property_cue(
    cls: int,
    prop: str,
    audit: dict[str, Any],
    split: PreparedSplit,
    size: tuple[int, int],
    batch_size: int,
    seed: int,
) -> PropertyCue:
    """The property `prop` of class `cls` spread over every class: the audit's own choice of change and
    strength (`property_interventions._chosen`: the rung that brings a sample of the other classes'
    images nearest the class's median, and the opposite change at the same rung for the class)."""
    name = split.class_names[cls]
    score = PropertyScore(**audit["data_properties"]["auroc"][name][prop])
    others = torch.nonzero(split.labels != cls).flatten()
    pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:PROPERTY_SAMPLE]
    sample = split.floats(others[pick].sort().values, size)
    change, strength, mirror, mirror_strength, _ = property_interventions._chosen(prop, score, sample)
    return PropertyCue(
        cls, prop, _change_name(change), float(strength), _change_name(mirror), float(mirror_strength)
    )


def _change_name(change: Callable[..., Any]) -> str:
    """The counterfactual's name for one of the audit's property changes (`_blur` -> `blur`)."""
    name = change.__name__.removeprefix("_")
    if name not in CHANGES:
        raise ValueError(f"audit property change {change.__name__!r} has no counterfactual in CHANGES")
    return name


def _area(cue: str, places: dict[str, Any]) -> int:
    return int(places[cue].sum()) if cue in places else 0


def _patch_cue(
    cls: int, cue: str, audit: dict[str, Any], name: str, found: dict[str, tuple[tuple[np.ndarray, ...], ...]]
) -> PatchCue:
    """The patch `cue` ("recurring patch <i>") of class `name`: its exemplars as uint8, its support."""
    i = int(cue.removeprefix(PATCH)) - 1
    crops = tuple(torch.from_numpy(np.rint(e * 255.0)).to(torch.uint8) for e in found[name][i])
    return PatchCue(cls, cue, crops, float(audit["classes"][name]["recurring"][i]["support"]))


def _cue_of(
    test: str, figures: dict[str, Any], places: dict[str, Any], patches: bool
) -> tuple[str | None, str]:
    """(the cue answering a failure: a place name, TONE or a recurring patch, or None and why not)."""
    kind, _, place = test.partition(":")
    if kind == "patch":  # one that sits at one of the audit's places is that place's cue
        patch = place.partition(" at ")[0]
        where = figures["recurring"][int(patch.removeprefix(PATCH)) - 1]["at_own_place"].get("where")
        if where in places or patches:
            return (where if where in places else patch), ""
    if kind in ("transplant", "transplant_mean") and place in places:
        return place, ""
    if kind in ("transplant_top", "deletion"):
        where = figures["transplant_top"].get("where") or ""
        edge = where.removesuffix(" edge")
        strips = [p for p in places if edge != where and p.startswith(f"{edge} strip ")]
        if where in places or strips:
            return (where if where in places else strips[0]), ""
        return None, f"its most-attended pixels sit at '{where}', not one of the audit's places"
    if kind == "transplant_tone":
        return TONE, ""
    if kind == "property":
        return f"{PROPERTY}{place}", ""
    if kind == "masks":
        return None, "a masks finding says where the model looks, not what it reads there"
    return (
        None,
        f"no counterfactual for {kind!r} findings yet (places, most-attended, deletion, patches, tone, "
        "properties)",
    )
