"""Recurring salient patches wherever they sit in a class's images, and whether pasting them flips
other classes (SpRAy-style: Lapuschkin et al., 2019, "Unmasking Clever Hans predictors").

The fixed places (`regions`) miss a tag that moves from image to image, and the class mean
averages it away. Here each donor's most-attended pixels are split into connected components;
each component is described by the target layer's pooled activations of the component alone,
centred on a neutral canvas, so two copies of one tag at different places get one description;
the descriptions are clustered within the class, and a cluster found in enough of the class's
images is a recurring patch. Then the intervention decides: each recipient (another class's image)
gets a random member pasted at a random place, and at its own place, against the same shape cut
at the same places from another class's image and from another image of the class itself (the
member's own pixels shuffled are reported beside: see `paste_test`). An object part rarely flips
an image pasted alone somewhere else; a learned tag does wherever it lands. Pasted at its own
place an object part can flip (the middle of a '9', where every '9' has its loop), but then the
same place cut from any other '9' flips as often: the patch is the class's object, not a cue its
images carry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from scipy import ndimage
from sklearn.cluster import AgglomerativeClustering
from torch import nn

from cnnops.audit.contract import RecurringPatch, Transplant
from cnnops.audit.evidence import (
    Batch,
    as_unit,
    describe_place,
    other_donors,
    paired,
    rate_of,
    subsample,
    top_mask,
)
from cnnops.models import Classifier

PER_IMAGE = 2  # components kept an image, largest first: the tag and at most one more
MIN_PIXELS = 4  # smaller components are specks of the map, not patches
EXEMPLARS = 6  # crops of a patch the gallery shows


@dataclass(frozen=True)
class Component:
    """One connected piece of a donor's most-attended pixels."""

    image: int  # position among the donors
    mask: np.ndarray  # bool H x W, in the donor's frame
    box: tuple[int, int, int, int]  # rows y0:y1, columns x0:x1 of the mask


@dataclass(frozen=True)
class Discovered:
    """A class's recurring patches, and for the gallery each one's exemplar crops (C x h x w, [0, 1])."""

    patches: tuple[RecurringPatch, ...]
    exemplars: tuple[tuple[np.ndarray, ...], ...]


def components(tops: np.ndarray) -> list[Component]:
    """The `PER_IMAGE` largest 8-connected components of each image's top mask, of `MIN_PIXELS` or more."""
    out = []
    for i, top in enumerate(tops):
        labels, n = ndimage.label(top, structure=np.ones((3, 3)))
        sizes = ndimage.sum_labels(top, labels, range(1, n + 1))
        for k in np.argsort(-sizes, kind="stable")[:PER_IMAGE]:
            if sizes[k] < MIN_PIXELS:
                break
            mask = labels == k + 1
            ys, xs = np.nonzero(mask)
            out.append(Component(i, mask, (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)))
    return out


def describe(
    model: Classifier, layer: nn.Module, donors: torch.Tensor, comps: list[Component], canvas: torch.Tensor
) -> np.ndarray:
    """Each component's description: the target layer's activations averaged over its map, with the
    component's pixels alone centred on `canvas` (1 x C x H x W), less the empty canvas's, unit length.

    Centred, a tag gets the same description wherever it sat; pooled, a coarse layer describes it too.
    """
    h, w = canvas.shape[-2:]
    kept: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: kept.append(out.mean((2, 3))))
    try:
        with torch.no_grad():
            model(canvas.to(_device(model)))
            for i in range(0, len(comps), 64):
                model(
                    torch.cat([_centred(donors, c, canvas, h, w) for c in comps[i : i + 64]]).to(
                        _device(model)
                    )
                )
    finally:
        hook.remove()
    empty, *parts = kept
    desc = (torch.cat(parts) - empty).cpu().numpy() if parts else np.zeros((0, empty.shape[1]))
    return desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-8)


def _centred(donors: torch.Tensor, c: Component, canvas: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`canvas` with component `c`'s pixels pasted so that its box sits in the middle."""
    y0, y1, x0, x1 = c.box
    ty, tx = (h - (y1 - y0)) // 2, (w - (x1 - x0)) // 2
    return _pasted(canvas[0], as_unit(donors[c.image]), c, (ty, tx))[None]


def _pasted(target: torch.Tensor, source: torch.Tensor, c: Component, at: tuple[int, int]) -> torch.Tensor:
    """A copy of `target` (C x H x W) with `source`'s pixels under `c`'s mask, its box moved to `at`."""
    y0, y1, x0, x1 = c.box
    ty, tx = at
    out = target.clone()
    m = torch.as_tensor(c.mask[y0:y1, x0:x1])
    window = out[:, ty : ty + y1 - y0, tx : tx + x1 - x0]
    window[:, m] = source[:, y0:y1, x0:x1][:, m]
    return out


def clusters(desc: np.ndarray, comps: list[Component], distance: float, min_images: int) -> list[np.ndarray]:
    """Groups of components whose descriptions lie within `distance` (cosine, average linkage), found
    in `min_images` donors or more, those found in most donors first."""
    if len(comps) == 0:
        return []
    labels = (
        np.zeros(1, dtype=int)
        if len(comps) == 1
        else AgglomerativeClustering(
            n_clusters=None, distance_threshold=distance, metric="cosine", linkage="average"
        ).fit_predict(desc)
    )
    groups = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    support = [len({comps[i].image for i in g}) for g in groups]
    order = np.argsort([-s for s in support], kind="stable")
    return [groups[k] for k in order if support[k] >= min_images]


def paste_test(
    model: Classifier,
    donors: torch.Tensor,
    members: list[Component],
    recipients: torch.Tensor,
    cls: int,
    rng: np.random.Generator,
    batch_size: int,
    *,
    own_place: bool,
) -> Transplant:
    """Paste a random member into each recipient, at its own place or a random one, and the share now
    predicted `cls`, against two controls at the same places, the larger counting: the same shape
    cut at the member's box from another class's image (a random recipient), and the object
    control, the same cut from another of the class's images (a random donor but the member's own);
    paired, so the discordant recipients are kept for the exact test.

    The object control (`evidence.other_donors`) tells a part of the class's object from a cue that
    moves; with too few other images it is not run and excuses nothing. The member's own
    pixels shuffled at the same places are measured and reported beside, not counted in the
    control: as with a corner tag (docs/audit.md), a model that learned a tag as "bright pixels
    there" flips on them too (a centre tag on digits: 44% shuffled, 52% pasted), and the tag would be
    excused; an object part pasted alone rarely flips anything, shuffled or not.
    """
    n = len(recipients)
    h, w = recipients.shape[-2:]
    pick = rng.integers(0, len(members), n)
    other = rng.integers(0, n, n)
    at = [_place(members[k], h, w, rng, own_place) for k in pick]
    orders = [rng.permutation(int(members[k].mask.sum())) for k in pick]
    kin = other_donors(np.array([members[k].image for k in pick]), len(donors), rng)

    def flips(source: str) -> np.ndarray:
        out = []
        device = next(model.parameters()).device
        cut_from = other if kin is None or source != "same_class" else kin
        with torch.no_grad():
            for i in range(0, n, batch_size):
                batch = [_one(donors, recipients, members[pick[j]], j, cut_from[j], at[j], orders[j], source)
                         for j in range(i, min(n, i + batch_size))]  # fmt: skip
                x = torch.stack(batch).to(device, memory_format=torch.channels_last)
                out.append(model(x).argmax(1).cpu().numpy() == cls)
        return np.concatenate(out)

    pasted, cut, shuffled = flips("member"), flips("other"), flips("shuffled")
    return replace(  # the shuffled pixels reported beside, not a control (above)
        paired(pasted, cut, same_class=None if kin is None else flips("same_class")),
        other_classes_flip_rate=rate_of(cut),
        shuffled_flip_rate=rate_of(shuffled),
        pixels=int(np.median([c.mask.sum() for c in members])),
        where=_where(members) if own_place else "random places",
    )


def _where(members: list[Component]) -> str:
    """Where most members sit, in words, or "its own places" when they sit apart."""
    common = np.mean([c.mask for c in members], 0) >= 0.5
    return describe_place(common) if common.any() else "its own places"


def _one(
    donors: torch.Tensor,
    recipients: torch.Tensor,
    c: Component,
    j: int,
    k: int,
    at: tuple[int, int],
    order: np.ndarray,
    source: str,
) -> torch.Tensor:
    """Recipient `j` with `c`'s shape pasted at `at`: from its donor, cut at the member's own box from
    recipient `k` (another class's image, "other") or from donor `k` (another of the class's images,
    "same_class"), or the donor's pixels in the order `order` ("shuffled")."""
    target = as_unit(recipients[j])
    if source in ("other", "same_class"):
        return _pasted(target, as_unit((recipients if source == "other" else donors)[k]), c, at)
    donor = as_unit(donors[c.image])
    if source == "shuffled":
        donor = donor.clone()
        ys, xs = np.nonzero(c.mask)
        donor[:, ys, xs] = donor[:, ys[order], xs[order]]
    return _pasted(target, donor, c, at)


def _place(c: Component, h: int, w: int, rng: np.random.Generator, own: bool) -> tuple[int, int]:
    """Where the member's box goes: its own top-left corner, or a random one that keeps it inside."""
    y0, y1, x0, x1 = c.box
    if own:
        return y0, x0
    return int(rng.integers(0, h - (y1 - y0) + 1)), int(rng.integers(0, w - (x1 - x0) + 1))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def recurring_patches(
    model: Classifier,
    layer: nn.Module,
    donors: torch.Tensor,
    tops: np.ndarray,
    recipients: torch.Tensor,
    canvas: torch.Tensor,
    cls: int,
    rng: np.random.Generator,
    *,
    max_patches: int,
    min_support: float,
    distance: float,
    batch_size: int,
) -> Discovered:
    """The class's recurring salient patches (at most `max_patches`, in `min_support` of its donors
    or more) with their pastes into `recipients` at random places and at their own places."""
    if max_patches == 0 or len(donors) == 0 or len(recipients) == 0:
        return Discovered((), ())
    comps = components(tops)
    desc = describe(model, layer, donors, comps, canvas)
    min_images = max(2, int(np.ceil(min_support * len(donors))))
    patches, exemplars = [], []
    for group in clusters(desc, comps, distance, min_images)[:max_patches]:
        members = [comps[i] for i in group]
        images = len({c.image for c in members})
        test = partial(paste_test, model, donors, members, recipients, cls, rng, batch_size)
        patches.append(
            RecurringPatch(
                images=images,
                support=round(images / len(donors), 4),
                members=len(members),
                at_random_places=test(own_place=False),
                at_own_place=test(own_place=True),
            )
        )
        exemplars.append(tuple(_crop(donors, c) for c in members[:EXEMPLARS]))
    return Discovered(tuple(patches), tuple(exemplars))


def _crop(donors: torch.Tensor, c: Component) -> np.ndarray:
    """The member's box of its donor (C x h x w, [0, 1]): what a person looks at in the gallery."""
    y0, y1, x0, x1 = c.box
    return as_unit(donors[c.image][:, y0:y1, x0:x1]).numpy()


def discover(
    model: Classifier,
    layer: nn.Module,
    batch: Batch,
    cls: int,
    rng: np.random.Generator,
    *,
    top_fraction: float,
    max_images: int,
    max_patches: int,
    min_support: float,
    distance: float,
    batch_size: int,
) -> Discovered:
    """`recurring_patches` of class `cls` in the audited `batch`: its correct images are the donors
    (their `top_fraction` most-attended pixels the patches), other classes' correct ones the
    recipients, at most `max_images` of each, drawn from `rng`; the canvas is the audited mean."""
    correct = subsample(np.flatnonzero((batch.labels == cls) & (batch.preds == cls)), max_images, rng)
    others = subsample(np.flatnonzero((batch.labels != cls) & (batch.preds == batch.labels)), max_images, rng)
    return recurring_patches(
        model, layer, batch.x[correct], top_mask(batch.maps[correct], top_fraction), batch.x[others],
        batch.mean, cls, rng, max_patches=max_patches, min_support=min_support, distance=distance,
        batch_size=batch_size,
    )  # fmt: skip
