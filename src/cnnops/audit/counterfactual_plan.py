"""From a failed audit's findings to the cure's counterfactuals (`counterfactual.Cue`s).

It lives in the audit layer, apart from the transform (`training.counterfactual`, which train
imports): it reads the audit's report, its geometry (`audit.regions`) and its property changes
(`audit.property_interventions`), which the train stage does not depend on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnnops.audit import property_interventions, regions
from cnnops.audit.contract import PropertyScore
from cnnops.audit.properties import COLOUR_PROPERTIES
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
    transplant, or the most-attended pixels' and deletion's place when it is one of the audit's), the
    tone, an image property, or a recurring patch (its exemplars from `exemplars`, called once and
    only for a patch finding: it re-runs the audit's discovery). Places are the audit's own geometry
    (`regions`, at its thresholds) at the model's input `size`; which of a class's failing places
    get a cue, `place_answers` decides. An image property of a class that also has a place or patch
    cue its transplant proved is answered by that cue (a tag's hard edges raise the class's
    sharpness), and the re-audit says whether it was; a colour property (hue, saturation) always gets
    its own cue."""
    places = _places(audit["thresholds"], size)
    found = functools.cache(exemplars) if exemplars is not None else None
    wanted: dict[Key, list[dict[str, Any]]] = {}
    not_addressed = []
    for f in audit["failures"]:
        cue, why = _cue_of(f["test"], audit["classes"][f["class"]], places, found is not None)
        if cue is None:
            not_addressed.append({"class": f["class"], "test": f["test"], "why": why})
        else:
            key = (split.class_names.index(f["class"]), cue)
            wanted.setdefault(key, []).append({"class": f["class"], "test": f["test"], "value": f["value"]})
    flips = {key: max(a["value"] for a in answered) for key, answered in wanted.items() if key[1] in places}
    answer = place_answers(flips, places)
    cues: list[Cue] = [
        PlaceCue(cls, place, torch.from_numpy(places[place]), *class_means(split, cls, size, batch_size))
        for cls, place in dict.fromkeys((key[0], by) for key, by in answer.items())
    ]
    seen = _seen_at_a_place(wanted)
    for cls, cue in sorted((k for k in wanted if k not in answer), key=lambda k: k[1].startswith(PROPERTY)):
        local = [c for c in cues if not isinstance(c, PlaceCue | PatchCue) or c.cls in seen]
        made, answer[(cls, cue)] = _made(cls, cue, local, audit, split, (size, batch_size, seed), found)
        cues += [made] if made is not None else []
    addressed = [
        {"class": a["class"], "test": a["test"], "cue": answer[key]}
        for key, answered in wanted.items()
        for a in answered
    ]
    return Plan(tuple(cues), tuple(addressed), tuple(not_addressed))


def _seen_at_a_place(wanted: dict[Key, list[dict[str, Any]]]) -> set[int]:
    """The classes with a place or patch cue that a transplant of that place or patch proved. Only
    those answer the class's property findings: a place known only from the most-attended pixels or
    deletion is where a global property's saliency happens to peak (a sharpened digit's strokes), and
    swapping it leaves the property paying (measured: docs/audit.md, "Cue kinds beyond the proofs")."""
    direct = ("transplant", "transplant_mean", "patch")
    return {
        cls
        for (cls, cue), answered in wanted.items()
        if not cue.startswith(PROPERTY) and cue != TONE
        and any(a["test"].partition(":")[0] in direct for a in answered)
    }  # fmt: skip


def _made(
    cls: int,
    cue: str,
    cues: list[Cue],
    audit: dict[str, Any],
    split: PreparedSplit,
    sizing: tuple[tuple[int, int], int, int],
    found: Exemplars | None,
) -> tuple[Cue | None, str]:
    """(the new cue for the tone, property or patch `cue` of class `cls`, or None when one of `cues`
    already answers it; the name of the cue that answers it; properties come last). `sizing`: the
    model's input size, the batch size and the seed."""
    size, batch_size, seed = sizing
    if cue == TONE:
        return ToneCue(cls, *tone_banks(split, cls, size, batch_size, seed)), cue
    local = next((c for c in cues if isinstance(c, PlaceCue | PatchCue) and c.cls == cls), None)
    # A place's cue answers a tag's hard edges (sharpness, grain), not a colour: a hue turn or saturation
    # lies in every pixel, and a place's swap leaves the rest of the image turned. Measured: the scenes
    # hue '3' (seed 3), its hue answered by the outer band: flips 0.72 -> 0.56, the hue's 25% -> 36%.
    if cue.startswith(PROPERTY) and local is not None and cue.removeprefix(PROPERTY) not in COLOUR_PROPERTIES:
        return None, local.place  # a bright tag raises sharpness: the place's cue first, the re-audit checks
    if cue.startswith(PROPERTY):
        made = _property_cue(cls, cue.removeprefix(PROPERTY), audit, split, size, batch_size, seed)
        same = next((c for c in cues if isinstance(c, PropertyCue) and _same_change(c, made)), None)
        return (made, cue) if same is None else (None, f"{PROPERTY}{same.prop}")
    assert found is not None  # `_cue_of` names a wandering patch only when its exemplars can be found
    return _patch_cue(cls, cue, audit, split.class_names[cls], found()), cue


Key = tuple[int, str]  # (class index, cue name)


def cue_key(cue: Cue) -> Key:
    """A cue's (class index, name), the name the `addressed` entries it answers give it: what tells a
    later round's cue from one an earlier round trained with."""
    if isinstance(cue, ToneCue):
        return cue.cls, TONE
    if isinstance(cue, PropertyCue):
        return cue.cls, f"{PROPERTY}{cue.prop}"
    return cue.cls, cue.place


def residuals(
    audit: dict[str, Any], classes: Collection[str], significance: float
) -> tuple[dict[str, Any], ...]:
    """The tests of `audit` (a re-audit that did not fail) on `classes` (those a cure acted on) whose
    flip rate beats their control at a Benjamini-Hochberg adjusted p-value at most `significance`, as
    failures (`plan` reads them so): under the audit's flip threshold, so no failure, but evidence
    that a class known to have had a shortcut still reads part of it (a text line's other end)."""
    return tuple(
        {"class": t["class"], "test": t["test"], "value": t["effect"], "p_adjusted": t["p_adjusted"]}
        for t in audit["tests"]
        if t["class"] in classes and t["effect"] > 0 and t["p_adjusted"] <= significance
    )


def beyond(plan: Plan, used: Collection[Key], class_names: Sequence[str]) -> Plan:
    """`plan` (of a re-audit) less the cues in `used` (an earlier round trained with them): a finding
    one of those answers still fails with its counterfactual in the training, so it is not addressed
    anew but listed in `not_addressed` with that reason. A recurring patch is named by its rank in
    its audit, so a re-audit's patch of a class counts as the earlier round's patch of that rank."""
    new: list[dict[str, Any]] = []
    again: list[dict[str, Any]] = []
    for a in plan.addressed:
        (again if (class_names.index(a["class"]), a["cue"]) in used else new).append(a)
    repeated = tuple(
        {"class": a["class"], "test": a["test"],
         "why": f"its counterfactual ({a['cue']}) was in an earlier round's training and the re-audit "
                "still finds it"}
        for a in again
    )  # fmt: skip
    cues = tuple(c for c in plan.cues if cue_key(c) not in used)
    return Plan(cues, tuple(new), plan.not_addressed + repeated)


HOLDS = 0.8  # a place holds another when it covers this share of the other's pixels


def _holds(outer: np.ndarray, inner: np.ndarray) -> bool:
    """Whether place `outer` covers `HOLDS` of place `inner`'s pixels."""
    return bool((outer & inner).sum() >= HOLDS * inner.sum())


def place_answers(flips: dict[Key, float], places: dict[str, Any]) -> dict[Key, str]:
    """For each failing (class, place), with the largest flip rate of its findings, the place whose
    cue answers it. Of one class's places, smallest first: one that holds most of one kept place is
    answered by it (a corner square's corner, not the strip around it: replacing the strip in the
    class's own images would replace its object too); one that holds most of two or more kept places
    answers them (a text line along an edge spans both of its corners: the edge's strip holds it).
    Then, strongest first, a weaker place that shares pixels with a stronger kept one is answered by
    it: it flips through those pixels (a frame's band and the quarter strips along it). A place no
    finding failed can answer too: see `_spanning`."""
    flips = _spanning(flips, places)
    answer: dict[Key, str] = {}
    for cls, place in sorted(flips, key=lambda key: int(places[key[1]].sum())):
        mask = places[place]
        kept = [p for (c, p), by in answer.items() if c == cls and by == p]
        held = [p for p in kept if _holds(mask, places[p])]
        answer[(cls, place)] = held[0] if len(held) == 1 else place
        for spanned in held if len(held) > 1 else ():
            answer.update({k: place for k, by in answer.items() if k[0] == cls and by == spanned})
    strongest: dict[Key, float] = {}
    for key, by in answer.items():
        strongest[(key[0], by)] = max(strongest.get((key[0], by), 0.0), flips[key])
    merged: dict[Key, str] = {}
    for cls, place in sorted(strongest, key=lambda key: -strongest[key]):
        kept = [p for (c, p), by in merged.items() if c == cls and by == p]
        merged[(cls, place)] = next((p for p in kept if (places[p] & places[place]).any()), place)
    return {key: merged[(key[0], by)] for key, by in answer.items()}


def _spanning(flips: dict[Key, float], places: dict[str, Any]) -> dict[Key, float]:
    """`flips` and, for each class, the smallest place no finding failed that holds two or more of
    its failing places, at their largest flip, unless another failing place touches each of them.

    A text line along an edge sits at one place in every image of its class, so the audit's object
    control excuses its most-attended pixels, and its strip (judged against its own pixels shuffled)
    may not fail: only the edge's two corners do. A cue at each corner breaks the line there only
    (measured on test_cure's text line: flips 0.053 after, over the 0.05 bound); the strip that
    holds both breaks all of it. A frame's band touches every corner: its corners stay the band's."""
    out = dict(flips)
    for cls in dict.fromkeys(c for c, _ in flips):
        failing = [p for c, p in flips if c == cls]
        for name in sorted(places.keys() - set(failing), key=lambda p: int(places[p].sum())):
            held = [p for p in failing if _holds(places[name], places[p])]
            touched = any(all((places[q] & places[p]).any() for p in held) for q in failing if q not in held)
            if len(held) > 1 and not touched:
                out[(cls, name)] = max(flips[(cls, p)] for p in held)
                break
    return out


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
    strength (`property_interventions.chosen`: the rung that brings a sample of the other classes'
    images nearest the class's median, and the opposite change at the same rung for the class)."""
    name = split.class_names[cls]
    score = PropertyScore(**audit["data_properties"]["auroc"][name][prop])
    others = torch.nonzero(split.labels != cls).flatten()
    pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:PROPERTY_SAMPLE]
    sample = split.floats(others[pick].sort().values, size)
    change, strength, mirror, mirror_strength, _ = property_interventions.chosen(prop, score, sample)
    return PropertyCue(
        cls, prop, _change_name(change), float(strength), _change_name(mirror), float(mirror_strength)
    )


def _change_name(change: Callable[..., Any]) -> str:
    """The counterfactual's name for one of the audit's property changes (`_blur` -> `blur`)."""
    name = change.__name__.removeprefix("_")
    if name not in CHANGES:
        raise ValueError(f"audit property change {change.__name__!r} has no counterfactual in CHANGES")
    return name


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
