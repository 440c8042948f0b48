"""Regions at several scales, the inpainted removal control, and the warning when that control is
what cancels a flip."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from cases_verdict import CLEAN, A
from skimage.data import camera
from skimage.restoration import inpaint_biharmonic

from cnnops.audit import evidence, regions
from cnnops.audit.contract import Transplant
from cnnops.audit.verdict import decide


def _regions(h: int = 32, w: int = 32) -> dict[str, np.ndarray]:
    return regions.intervention_regions(
        h, w, border_fraction=0.1, corner_fraction=0.3, edge_fractions=(0.125, 0.25), centre_fraction=0.5,
        grids=(2, 3),
    )  # fmt: skip


def test_every_scale_is_a_place_and_the_probes_places_come_first() -> None:
    r = _regions(32, 40)
    assert list(r)[:5] == list(regions.candidate_regions(32, 40, 0.1, 0.3))
    assert r["top strip 25%"][:8].all() and not r["top strip 25%"][8:].any()  # a quarter of 32 rows
    assert r["right strip 25%"][:, 30:].all() and r["right strip 25%"].sum() == 32 * 10
    assert r["left strip 12%"].sum() == 32 * 5
    centre = np.argwhere(r["centre"])
    assert centre.min(0).tolist() == [8, 10] and centre.max(0).tolist() == [23, 29]
    for n in (2, 3):
        cells = [m for name, m in r.items() if name.endswith(f"cell of {n}x{n}")]
        assert len(cells) == n * n and (np.sum(cells, 0) == 1).all()  # the cells tile the image
    assert "middle-centre cell of 3x3" in r and "bottom-right cell of 2x2" in r
    assert not regions.shape_matters("top-left corner") and regions.shape_matters("top strip 25%")
    assert regions.off_object_only("centre") and not regions.off_object_only(regions.OUTER_BAND)


def test_a_batch_is_inpainted_as_each_image_alone_and_keeps_a_gradient() -> None:
    photo = camera()[::8, ::8][:32, :32] / 255.0
    x = torch.tensor(np.stack([photo, photo.T, 1 - photo]), dtype=torch.float32)[:, None]
    corner = _regions()["top-left corner"]
    batch = evidence.inpaint(x, corner)
    for i in range(3):
        alone = inpaint_biharmonic(x[i, 0].double().numpy(), corner)
        np.testing.assert_allclose(batch[i, 0].numpy(), alone, atol=1e-5)
    np.testing.assert_array_equal(batch[:, :, ~corner], x[:, :, ~corner])  # only the place changes
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)[None, None]  # a gradient: a flat mean would break it
    filled, truth = evidence.inpaint(ramp, corner)[0, 0].numpy()[corner], ramp[0, 0].numpy()[corner]
    flat = np.abs(truth - ramp[0, 0].numpy()[corner].mean()).mean()  # the mean fill's error: 0.1
    assert np.abs(filled - truth).mean() < flat / 2


class Smooth(torch.nn.Module):  # class 1 when the top-left corner varies less than `level`
    def __init__(self, level: float) -> None:
        super().__init__()
        self.w, self.level = torch.nn.Parameter(torch.zeros(1)), level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.level - x[:, :, :10, :10].flatten(1).std(1) + self.w
        return torch.stack([-s, s], 1)


def _camera_corner(level: float):
    """Camera crops with film grain (textured everywhere) as recipients, flat patches as donors,
    pasted at the top-left corner."""
    photo = torch.tensor(camera() / 255.0, dtype=torch.float32)
    recipients = torch.stack([photo[300 + 8 * i : 332 + 8 * i, 200:232] for i in range(8)])[:, None]
    grain = torch.randn(recipients.shape, generator=torch.Generator().manual_seed(0))
    recipients = (recipients + 0.2 * grain).clamp(0, 1)
    donors = torch.full((6, 1, 32, 32), 0.7)
    corner = _regions()["top-left corner"]
    rng = np.random.default_rng(0)
    return (
        evidence.region_transplant(Smooth(level), donors, corner, recipients, 1, rng, 4),
        recipients,
        corner,
    )


def test_a_smooth_place_shortcut_is_not_excused_by_a_flat_fill() -> None:
    """A model that reads "flat corner" as the class: a flat mean as the evened control flips every
    recipient too and cancels the paste; the inpainted corner keeps the photo's gradient and does not."""
    t, recipients, corner = _camera_corner(0.02)
    m = torch.as_tensor(corner).float()
    flat = recipients * (1 - m) + (recipients * m).sum((2, 3), keepdim=True) / m.sum() * m
    assert (Smooth(0.02)(flat).argmax(1) == 1).all()  # the old control: 100%, the flip excused
    assert t.flip_rate == 1.0 and t.evened_flip_rate <= 0.25 and t.excess >= 0.75


def test_the_evened_control_that_cancels_a_flip_is_reported() -> None:
    """Figures as a smoother shortcut gives them: the inpainted corner flips as often as the paste."""
    t = Transplant(
        flip_rate=1.0, control_flip_rate=1.0, pairs=50, other_classes_flip_rate=0.0, evened_flip_rate=1.0
    )
    figures = {"sky": replace(CLEAN, transplant_regions={"top-left corner": t}), "ground": CLEAN}
    decision = decide(figures, None, A)
    assert decision.verdict == "pass"
    (warning,) = [w for w in decision.warnings if w.test.startswith("evened:")]
    assert warning.class_name == "sky" and warning.test == "evened:transplant:top-left corner"
    assert "filled in from its surroundings alone flips 100%" in warning.sentence
    assert not [
        w for w in decide({"sky": CLEAN, "ground": CLEAN}, None, A).warnings if w.test.startswith("evened")
    ]
