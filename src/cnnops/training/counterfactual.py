"""Counterfactual augmentation: training batches in which an audited shortcut no longer tells the class.

The audit proves a shortcut by an intervention: the cued class's pixels pasted at a place flip other
classes' images, its tone or an image property given to them flips them. The cure trains on those
same interventions, so the cue shows as often outside the class as in it and stops paying: at a
place, a cued class's image's pixels there are pasted into other classes' images and the place is
replaced by another class's content in the cued class's own images; a tone is swapped between the
class and the rest; a property (blur, grain, saturation, hue, JPEG quality) is given to the other
classes' images at the class's level and the opposite change to the class's. Each at `cure.rate` of
the images, drawn afresh each step.

It is a batch transform (images, labels) -> (images, labels) on the uint8 batches of the training
path, as torchvision's v2.MixUp and v2.CutMix are: a paste needs the label, and other-class content
comes from the batch. It runs in the loader's collate (`collate`), so in the loader's workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cnnops.data.splits import PreparedSplit

TONE_BANK = 2048  # images of each side whose tone is drawn from: a sample, so memory stays flat


@dataclass(frozen=True)
class PlaceCue:
    """A place finding: where (at the model's input size) and the class's and the others' mean there."""

    cls: int
    place: str
    mask: torch.Tensor  # H x W bool
    cued_mean: torch.Tensor  # C x H x W uint8: the cued class's mean train image (a batch without one)
    others_mean: torch.Tensor  # C x H x W uint8: the other classes' (when a batch holds none of them)


@dataclass(frozen=True)
class ToneCue:
    """A tone finding: per-channel (mean, std) of sampled train images of the class and of the rest."""

    cls: int
    cued: torch.Tensor  # K x C x 2, grey levels
    others: torch.Tensor  # K x C x 2


@dataclass(frozen=True)
class PatchCue:
    """A recurring-patch finding: exemplars of the patch, pasted at random places into `share` of the
    other classes' images, the patch's prevalence in the class (at least the rate): where it sits in
    each of the class's own images is not known, so it is evened by how often it shows, not removed."""

    cls: int
    place: str  # "recurring patch <i>", as the findings name it
    exemplars: tuple[torch.Tensor, ...]  # uint8 C x h x w
    share: float


@dataclass(frozen=True)
class PropertyCue:
    """An image-property finding (`property:<name>`: sharpness, noise, saturation, hue, JPEG quality,
    ...): the change (a `CHANGES` name) that moves an image to the class's level of the property and
    the opposite one, each at the strength the audit's intervention chose from the measured medians."""

    cls: int
    prop: str
    change: str
    strength: float
    mirror: str
    mirror_strength: float


Cue = PlaceCue | ToneCue | PatchCue | PropertyCue


class Counterfactual(v2.Transform):
    """Every cue's counterfactual at `rate` of a batch's images (uint8 N x C x H x W, labels N)."""

    def __init__(self, cues: Sequence[Cue], rate: float) -> None:
        super().__init__()
        self.cues, self.rate = tuple(cues), rate

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = images.clone()
        for cue in self.cues:
            hit = torch.rand(len(labels)) < self.rate
            if isinstance(cue, PlaceCue):
                _paste_place(out, images, labels, hit, cue)
            elif isinstance(cue, PatchCue):
                _paste_patch(out, labels, torch.rand(len(labels)) < max(self.rate, cue.share), cue)
            elif isinstance(cue, PropertyCue):
                _randomise_property(out, labels, hit, cue)
            else:
                _swap_tone(out, labels, hit, cue)
        return out, labels

    def collate(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's collate_fn: the default stacking, then the counterfactuals."""
        return self(*default_collate(batch))

    def describe(self) -> list[dict[str, Any]]:
        """What each cue does, as JSON: the report's and the resume fingerprint's record of it."""
        return [_described(c) for c in self.cues] + [{"rate": self.rate}]


def _described(c: Cue) -> dict[str, Any]:
    if isinstance(c, PlaceCue):
        return {"class": c.cls, "kind": "place", "place": c.place, "pixels": int(c.mask.sum())}
    if isinstance(c, PatchCue):
        return {"class": c.cls, "kind": "patch", "place": c.place, "share": c.share}
    if isinstance(c, PropertyCue):
        return {
            "class": c.cls, "kind": "property", "property": c.prop, "change": c.change,
            "strength": c.strength, "mirror": c.mirror, "mirror_strength": c.mirror_strength,
        }  # fmt: skip
    return {"class": c.cls, "kind": "tone"}


def _paste_patch(out: torch.Tensor, labels: torch.Tensor, hit: torch.Tensor, cue: PatchCue) -> None:
    """A random exemplar at a random place (inside the image) of each hit image of the other classes."""
    h, w = out.shape[-2:]
    for i in torch.nonzero(hit & (labels != cue.cls)).flatten().tolist():
        patch = cue.exemplars[int(torch.randint(len(cue.exemplars), ()))]
        ph, pw = min(patch.shape[1], h), min(patch.shape[2], w)
        y, x = int(torch.randint(h - ph + 1, ())), int(torch.randint(w - pw + 1, ()))
        out[i, :, y : y + ph, x : x + pw] = patch[:, :ph, :pw]


def _paste_place(
    out: torch.Tensor, source: torch.Tensor, labels: torch.Tensor, hit: torch.Tensor, cue: PlaceCue
) -> None:
    """Other classes' hit images get a cued class's image at the place, the cued class's hit images
    another class's image there: one of the batch's as it came (`source`, not as pasted), or the
    side's mean when the batch holds none. Real images, not only the mean: a cue whose content varies
    (a text line's digits) averages to a smear that the model need not read as the cue."""
    cued = labels == cue.cls
    for into, donors, mean in ((hit & ~cued, cued, cue.cued_mean), (hit & cued, ~cued, cue.others_mean)):
        idx, pool = torch.nonzero(into).flatten(), torch.nonzero(donors).flatten()
        if len(idx) == 0:
            continue
        pasted = source[pool[torch.randint(len(pool), (len(idx),))]] if len(pool) else mean
        out[idx] = torch.where(cue.mask, pasted, out[idx])


def _swap_tone(out: torch.Tensor, labels: torch.Tensor, hit: torch.Tensor, cue: ToneCue) -> None:
    """Hit images of the other classes take the tone of a random image of the class, and the
    class's hit images that of a random other image: (x - mean) / std * std' + mean' per channel,
    the audit's tone transplant, which keeps each image's shapes.

    Not v2.ColorJitter: its brightness multiplies, and a black background times any factor stays
    black, so it cannot make or undo a lifted background (the planted tint)."""
    for target, bank in ((hit & (labels != cue.cls), cue.cued), (hit & (labels == cue.cls), cue.others)):
        idx = torch.nonzero(target).flatten()
        if len(idx) == 0:
            continue
        x = out[idx].float()
        mu, sd = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True).clamp_min(1.0)
        drawn = bank[torch.randint(len(bank), (len(idx),))][..., None, None]  # n x C x 2 x 1 x 1
        toned = (x - mu) / sd * drawn[:, :, 1] + drawn[:, :, 0]
        out[idx] = toned.round().clamp(0, 255).to(torch.uint8)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    s = max(sigma * x.shape[-1] / 32.0, 1e-3)  # strengths are given at 32 px, as the audit's
    k = 2 * math.ceil(3 * s) + 1
    return F.gaussian_blur(x, [k, k], [s, s])


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round().to(torch.uint8)


# The property changes on float N x C x H x W in [0, 1], named as the audit's property interventions
# name theirs (audit.property_interventions), whose strengths they take. Written here, not imported:
# the train stage imports this module and not the audit, and the audit's grain is seeded by the batch
# size (the same evidence each run) where training needs fresh grain every step.
CHANGES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "blur": _blur,
    "sharpen": lambda x, a: (x + a * (x - _blur(x, 1.0))).clamp(0, 1),
    "grain": lambda x, s: F.gaussian_noise(x, sigma=s),
    "saturation": F.adjust_saturation,
    "hue": lambda x, t: F.adjust_hue(x, max(-0.5, min(0.5, t))),
    "jpeg": lambda x, q: F.jpeg(_bytes(x), int(q)).float() / 255,
    "equalize": lambda x, _: F.equalize(_bytes(x)).float() / 255,
    "posterize": lambda x, bits: F.posterize(_bytes(x), int(bits)).float() / 255,
}
JITTERED = {"blur", "sharpen", "grain", "hue"}  # amounts drawn in [0.5, 1.5] x the strength each step


def _randomise_property(out: torch.Tensor, labels: torch.Tensor, hit: torch.Tensor, cue: PropertyCue) -> None:
    """Hit images of the other classes changed to the class's level of the property, the class's own
    hit images by the opposite change: the property is spread over every class (at a strength around
    the measured one, drawn afresh each call), so it stops telling the class."""
    for target, change, strength in (
        (hit & (labels != cue.cls), cue.change, cue.strength),
        (hit & (labels == cue.cls), cue.mirror, cue.mirror_strength),
    ):
        idx = torch.nonzero(target).flatten()
        if len(idx) == 0:
            continue
        if change in JITTERED:
            strength *= float(torch.empty(()).uniform_(0.5, 1.5))
        out[idx] = _bytes(CHANGES[change](out[idx].float() / 255, strength))


def class_means(
    split: PreparedSplit, cls: int, size: tuple[int, int], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the class's, the other classes') mean image at the model's input size, as uint8, streamed
    a batch at a time (centre-cropped as evaluate and the audit feed the model)."""
    sums = torch.zeros(2, split.images.shape[1], *size, dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in split.batches(batch_size, size):
        for side, keep in enumerate((y == cls, y != cls)):
            sums[side] += x[keep].double().sum(0)
            counts[side] += int(keep.sum())
    means = sums / counts.clamp_min(1)[:, None, None, None] * 255.0
    return means[0].round().to(torch.uint8), means[1].round().to(torch.uint8)


def tone_banks(
    split: PreparedSplit, cls: int, size: tuple[int, int], batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) in grey levels of up to TONE_BANK sampled train images of the class,
    and of the rest: the range of tones the swap draws from is the measured one."""
    generator = torch.Generator().manual_seed(seed)
    banks = []
    for keep in (split.labels == cls, split.labels != cls):
        idx = torch.nonzero(keep).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)[:TONE_BANK]].sort().values
        stats = []
        for i in range(0, len(idx), batch_size):
            x = split.floats(idx[i : i + batch_size], size) * 255.0
            stats.append(torch.stack([x.mean((2, 3)), x.std((2, 3))], -1))
        banks.append(torch.cat(stats) if stats else torch.zeros(0, split.images.shape[1], 2))
    return banks[0], banks[1]
