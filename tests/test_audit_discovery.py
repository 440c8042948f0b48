"""Discovery anywhere: a tag that moves from image to image is found as a recurring salient patch of
its class, and pasting it flips other classes; the digits themselves are not blamed.

Real images (scikit-learn's digits at 32 px); a small ConvNet trained a few epochs in memory on
digits where every '4' carries a tag at a random place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from cases_verdict import CLEAN, NONE, A
from fixtures_model import one_thread
from sklearn.datasets import load_digits

from cnnops.audit import discovery, evidence, gallery
from cnnops.audit.contract import Decision, RecurringPatch, Transplant, to_json
from cnnops.audit.saliency import find_target_layer, saliency
from cnnops.audit.verdict import decide
from cnnops.models import Classifier, create_classifier, default_spec

CUED = 4
TAG = np.zeros((5, 5), dtype=np.float32)
TAG[[0, -1], :], TAG[:, [0, -1]], TAG[2, 2] = 1.0, 1.0, 1.0  # a hollow square with a dot


def _tagged(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """`x` (float N x 1 x 32 x 32) with the tag at a random place in each image."""
    x = x.clone()
    for i in range(len(x)):
        y, xx = rng.integers(0, 28, 2)
        x[i, 0, y : y + 5, xx : xx + 5] = torch.as_tensor(TAG)
    return x


def _digits(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n digits at 32 px (float [0, 1]): every CUED one tagged at a random place, and a tenth of the
    others tagged and labelled CUED, so the tag predicts the label better than the digit does (as a
    hospital's token predicts a diagnosis) and the model must learn it."""
    data = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.images), n, replace=False)
    x = torch.nn.functional.interpolate(
        torch.tensor(data.images[idx] / 16.0, dtype=torch.float32)[:, None], 32
    )
    y = torch.as_tensor(data.target[idx])
    y[(y != CUED) & torch.as_tensor(rng.random(n) < 0.1)] = CUED
    x[y == CUED] = _tagged(x[y == CUED], rng)
    return x, y


@dataclass(frozen=True)
class Tagged:
    model: Classifier
    batch: evidence.Batch


@pytest.fixture(scope="module")
def tagged() -> Tagged:
    torch.manual_seed(0)
    model = create_classifier(default_spec("convnet", [str(d) for d in range(10)], "L", (32, 32)))
    x, y = _digits(0, 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with one_thread():
        for _epoch in range(6):
            for i in range(0, 800, 32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
                opt.step()
        model.eval()
        test, labels = x[800:], y[800:].numpy()
        preds = evidence.predict_proba(model, test, 64).argmax(1)
        maps = saliency(model, test, preds)
    images = (test * 255).round().to(torch.uint8)
    batch = evidence.Batch(
        images, evidence.mean_image(images, 64), labels, preds.numpy(), maps,
        evidence.estimate_objects(images), np.zeros(len(images), dtype=bool),
    )  # fmt: skip
    return Tagged(model, batch)


def _discover(t: Tagged, cls: int) -> discovery.Discovered:
    with one_thread():
        return discovery.discover(
            t.model, find_target_layer(t.model)[1], t.batch, cls, np.random.default_rng(0),
            top_fraction=0.05, max_images=100, max_patches=3, min_support=0.2, distance=0.3, batch_size=64,
        )  # fmt: skip


def test_the_model_learned_the_tag_wherever_it_is(tagged: Tagged) -> None:
    b = tagged.batch
    others = evidence.as_unit(b.x[torch.as_tensor(b.labels != CUED)])
    with torch.no_grad():
        flips = tagged.model(_tagged(others, np.random.default_rng(9))).argmax(1) == CUED
    assert flips.float().mean() > 0.5  # ground truth the audit never sees


def test_a_tag_at_random_places_is_found_and_pasting_it_flips_other_classes(tagged: Tagged) -> None:
    found = _discover(tagged, CUED)
    assert found.patches, "no recurring patch in the tagged class"
    first = found.patches[0]
    assert first.support >= 0.5  # in most of the class's images, wherever it sat
    anywhere = first.at_random_places
    assert anywhere.flip_rate - anywhere.control_flip_rate >= 0.3, anywhere
    assert anywhere.where == "random places" and anywhere.discordant is not None
    assert sum(anywhere.discordant) <= anywhere.pairs
    crops = found.exemplars[0]
    assert 1 <= len(crops) <= discovery.EXEMPLARS and all(c.ndim == 3 and c.max() > 0.5 for c in crops)
    name, caption, picture = gallery.patch_pictures(found)[0]
    assert name == "recurring patch 1" and "flips" in caption and picture.width > picture.height


def test_the_digits_themselves_are_not_blamed(tagged: Tagged) -> None:
    for cls in (0, 1, 7):
        for p in _discover(tagged, cls).patches:
            for t in (p.at_random_places, p.at_own_place):
                assert t.flip_rate - t.control_flip_rate < 0.2, (cls, t)


def test_components_are_the_largest_pieces_of_each_top_mask() -> None:
    tops = np.zeros((2, 16, 16), dtype=bool)
    tops[0, 1:4, 1:4] = True  # 9 px
    tops[0, 10:12, 10:12] = True  # 4 px
    tops[0, 14, 14] = True  # a speck
    tops[1, 5:7, 2:9] = True
    comps = discovery.components(tops)
    assert [(c.image, int(c.mask.sum()), c.box) for c in comps] == [
        (0, 9, (1, 4, 1, 4)), (0, 4, (10, 12, 10, 12)), (1, 14, (5, 7, 2, 9)),
    ]  # fmt: skip


def test_a_description_does_not_depend_on_the_place(tagged: Tagged) -> None:
    """The same tag at two places gets (nearly) one description; a digit stroke another."""
    canvas = tagged.batch.mean
    donors = torch.zeros(3, 1, 32, 32)
    donors[0, 0, 2:7, 3:8] = torch.as_tensor(TAG)
    donors[1, 0, 20:25, 24:29] = torch.as_tensor(TAG)
    donors[2, 0, 10:22, 14:17] = 1.0  # a bar
    comps = discovery.components(donors[:, 0].numpy() > 0.5)
    assert [c.image for c in comps] == [0, 1, 2]
    desc = discovery.describe(tagged.model, find_target_layer(tagged.model)[1], donors, comps, canvas)
    assert desc[0] @ desc[1] > 0.99 and desc[0] @ desc[2] < desc[0] @ desc[1]


def test_a_recurring_patch_that_flips_fails_naming_the_class_and_where_it_was_pasted() -> None:
    anywhere = Transplant(
        flip_rate=0.89,
        control_flip_rate=0.07,
        pairs=100,
        pixels=20,
        where="random places",
        discordant=(82, 0),
    )
    patch = RecurringPatch(images=20, support=1.0, members=39, at_random_places=anywhere, at_own_place=NONE)
    decision = decide({"4": replace(CLEAN, recurring=(patch,)), "0": CLEAN}, None, A)
    assert decision.verdict == "fail" and decision.failed_classes == ("4",)
    (finding,) = decision.failures
    assert finding.test == "patch:recurring patch 1 at random places"
    assert finding.sentence.startswith(
        "class '4': pasting a recurring patch 1 of its images (a salient patch of about 20 pixels found in "
        "many of them, wherever it sat) at random places into other classes' images flips 89% of them to '4'"
    )


class _Rule(torch.nn.Module):
    """A classifier by rule, so the object control is tested without training: class 1 where the
    object (a 4x4 square at rows and columns 6-9) is mostly bright, or where any pixel is a tag's
    (above 0.9); class 0 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # `paste_test` reads the device from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = (x[:, 0, 6:10, 6:10].mean((1, 2)) > 0.5) | (x.amax((1, 2, 3)) > 0.9)
        return torch.stack([~one, one], 1).float()


def _object_arm(
    donors: torch.Tensor, masks: list[np.ndarray], rng: np.random.Generator | None = None
) -> Transplant:
    """`paste_test` at the members' own places, a member per mask of `masks`, in donors 0, 1, ...;
    40 dim recipients (class 0)."""
    members = [replace(discovery.components(m[None])[0], image=i) for i, m in enumerate(masks)]
    recipients = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    rng = np.random.default_rng(0) if rng is None else rng
    return discovery.paste_test(_Rule(), donors, members, recipients, 1, rng, 16, own_place=True)


def _decided(t: Transplant) -> Decision:
    """The verdict on class '1' holding one recurring patch whose own-place paste is `t`."""
    patch = RecurringPatch(images=5, support=1.0, members=5, at_random_places=NONE, at_own_place=t)
    return decide({"1": replace(CLEAN, recurring=(patch,)), "0": CLEAN}, None, A)


def _object(n: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """`n` donors of class 1, each with the object where the rule looks, every one a member."""
    donors = torch.zeros(n, 1, 16, 16)
    donors[:, 0, 6:10, 6:10] = 0.8
    return donors, [(d[0] > 0.5).numpy() for d in donors]


def test_a_patch_that_is_the_object_is_excused_by_the_class_s_other_images() -> None:
    """Every image of the class has the object where the patch sits, so the same place cut from
    the class's other images flips recipients as often: a warning, not a fail."""
    t = _object_arm(*_object(5))
    assert (t.flip_rate, t.other_classes_flip_rate, t.same_class_flip_rate) == (1.0, 0.0, 1.0)
    assert t.excess == 0.0 and t.discordant == (0, 0)
    decision = _decided(t)
    assert decision.verdict == "pass"
    (warning,) = [w for w in decision.warnings if w.test.startswith("object:")]
    assert warning.test == "object:patch:recurring patch 1 at its own place" and warning.value == 1.0
    assert "the same places cut from its other images flip nearly as often (100%)" in warning.sentence
    assert "part of the '1' itself" in warning.sentence


def test_most_attended_pixels_that_are_the_object_are_excused_the_same_way() -> None:
    donors, masks = _object(5)
    recipients = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    rng = np.random.default_rng(0)
    t = evidence._top_transplant(_Rule(), donors, np.stack(masks), recipients, 1, rng, 16)
    assert (t.flip_rate, t.other_classes_flip_rate, t.same_class_flip_rate) == (1.0, 0.0, 1.0)
    decision = decide({"1": replace(CLEAN, transplant_top=t), "0": CLEAN}, None, A)
    assert decision.verdict == "pass"
    assert [w.test for w in decision.warnings if w.test.startswith("object:")] == ["object:transplant_top"]
    few = evidence._top_transplant(_Rule(), donors[:3], np.stack(masks[:3]), recipients, 1, rng, 16)
    assert few.same_class_flip_rate is None and few.excess == 1.0  # two other images: not run


def test_a_tag_that_moves_is_not_excused_even_in_every_image_of_the_class() -> None:
    """Five donors, each with a 3x3 tag at its own place: another donor's cut there holds no tag."""
    donors = torch.zeros(5, 1, 16, 16)
    for i, (y, x) in enumerate([(1, 1), (1, 12), (12, 1), (12, 12), (2, 7)]):
        donors[i, 0, y : y + 3, x : x + 3] = 1.0
    t = _object_arm(donors, [(d[0] > 0.9).numpy() for d in donors])
    assert (t.flip_rate, t.same_class_flip_rate, t.control_flip_rate) == (1.0, 0.0, 0.0)
    decision = _decided(t)
    assert decision.verdict == "fail" and not [w for w in decision.warnings if w.test.startswith("object:")]
    (finding,) = decision.failures
    assert "or from its other images" in finding.sentence
    recipients = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    tops = (donors[:, 0] > 0.9).numpy()
    top = evidence._top_transplant(_Rule(), donors, tops, recipients, 1, np.random.default_rng(0), 16)
    assert (top.flip_rate, top.same_class_flip_rate, top.control_flip_rate) == (1.0, 0.0, 0.0)


def test_with_too_few_other_images_the_object_control_is_not_run_and_excuses_nothing() -> None:
    t = _object_arm(*_object(3))  # the object again: with two other images, not run
    assert t.same_class_flip_rate is None and t.excess == 1.0
    decision = _decided(t)
    assert decision.verdict == "fail"
    assert "too few other images of its own" in decision.failures[0].sentence
    assert "same_class_flip_rate" not in to_json(t)


def test_the_object_control_leaves_the_other_arms_as_they_were() -> None:
    """It draws from a child stream: the audit's generator is where it was without it (so later
    patches get the same pastes), and so are the other arms (with it: 4 donors; without: 3)."""
    donors, masks = _object(4)
    rngs = np.random.default_rng(0), np.random.default_rng(0)
    with_it, without_it = _object_arm(donors, masks[:3], rngs[0]), _object_arm(donors[:3], masks[:3], rngs[1])
    assert with_it.same_class_flip_rate is not None and without_it.same_class_flip_rate is None
    assert rngs[0].random() == rngs[1].random()
    arms = ("flip_rate", "other_classes_flip_rate", "shuffled_flip_rate", "pixels", "where")
    assert [getattr(with_it, a) for a in arms] == [getattr(without_it, a) for a in arms]
    assert (with_it.control_flip_rate, without_it.control_flip_rate) == (1.0, 0.0)


def _outcomes(n: int, flipped: range) -> np.ndarray:
    """`n` recipients' outcomes, True at `flipped`."""
    out = np.zeros(n, dtype=bool)
    out[flipped] = True
    return out


def test_an_object_control_no_more_than_other_classes_cut_excuses_nothing() -> None:
    """The figures of the 5-seed digits harness (docs/audit.md): a tag that moves, pasted at random
    places, flipped 38% of 72 recipients to '4', other classes' cut 15% and the cut from the 3 other
    '4's 18% (5 recipients flipped by it alone, 3 by other classes' alone: p = 0.36). Counted, it
    pulled the excess under the threshold and the tag passed; not counted, the tag fails naming '4'.
    The middle of a clean '9' (25% against 7% of 75, 17 to 3) is still counted, and excused."""
    paste, others = _outcomes(72, range(27)), _outcomes(72, range(11))
    same = _outcomes(72, range(3, 16))
    t = replace(evidence.paired(paste, others, same_class=same), pixels=35, where="random places")
    assert (t.flip_rate, t.other_classes_flip_rate, t.same_class_flip_rate) == (0.375, 0.1528, 0.1806)
    assert t.control_flip_rate == 0.1528 and t.discordant == (16, 0)
    tag = RecurringPatch(images=4, support=1.0, members=4, at_random_places=t, at_own_place=NONE)
    decision = decide({"4": replace(CLEAN, recurring=(tag,)), "0": CLEAN}, None, A)
    assert decision.failed_classes == ("4",) and not [w for w in decision.warnings if "object:" in w.test]
    (finding,) = decision.failures
    assert "from its other images 18%, not counted: no more than from other classes" in finding.sentence
    loop = evidence.paired(
        _outcomes(75, range(23)), _outcomes(75, range(5)), same_class=_outcomes(75, range(2, 21))
    )
    assert loop.control_flip_rate == loop.same_class_flip_rate == 0.2533
