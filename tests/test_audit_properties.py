"""Image properties, their one-vs-rest AUROC, and the interventions that test whether they cause."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnops.audit import property_interventions as pi
from cnnops.audit.contract import PropertyProbe, PropertyScore
from cnnops.audit.properties import image_properties, jpeg_quality, property_scores
from cnnops.config import parse_params

A = parse_params({}).audit


def _textured(n: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_properties_move_the_way_their_change_does() -> None:
    x = _textured(8) * 0.5 + 0.25
    base = image_properties(x)
    blurred = image_properties(pi._blur(x, 1.2))
    grainy = image_properties(pi._grain(pi._blur(x, 1.2), 0.1))
    assert (blurred["sharpness"] < base["sharpness"] / 4).all()
    assert (blurred["high-frequency energy"] < base["high-frequency energy"]).all()
    assert (grainy["noise"] > 3 * blurred["noise"]).all()
    assert (image_properties(pi._posterize(x, 1))["entropy"] < base["entropy"]).all()
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    colour = image_properties(red)
    assert torch.allclose(colour["saturation"], torch.ones(2)) and torch.allclose(
        colour["hue cos"], torch.ones(2)
    )
    assert "saturation" not in base  # grey images have no colour properties


def test_jpeg_quality_is_read_from_the_file(tmp_path: Path) -> None:
    image = Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    for quality in (20, 50, 90):
        image.save(tmp_path / f"{quality}.jpg", quality=quality)
        assert abs(jpeg_quality(tmp_path / f"{quality}.jpg") - quality) <= 2
    image.save(tmp_path / "x.png")
    assert np.isnan(jpeg_quality(tmp_path / "x.png"))


def test_auroc_and_its_permutation_p_value() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    values = np.stack([rng.normal(labels == 1, 0.3), rng.normal(0, 1, 90)], 1)  # property 0 tells class 1
    scores = property_scores(values, ["told", "random"], labels, ["a", "b", "c"], 199, seed=0)
    assert scores["b"]["told"].auroc > 0.95 and scores["b"]["told"].p_value <= 0.01
    assert scores["a"]["told"].auroc < 0.3  # lower than the rest: AUROC under 0.5 flags it too
    assert scores["b"]["random"].p_value > 0.05
    assert scores["b"]["told"].class_median > scores["b"]["told"].others_median


class Smooth(torch.nn.Module):
    """Class 1 for smooth images (low Laplacian variance), else class 0: a "blur" shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 0.002 - image_properties(x)["sharpness"] + self.w
        return torch.stack([-s, s], 1)


class Fragile(torch.nn.Module):
    """Class 1 whenever an image is changed at all from the recipients' exact pixels."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        changed = (x - self.reference[: len(x)]).abs().flatten(1).amax(1) > 1e-3
        s = changed.float() - 0.5 + self.w
        return torch.stack([-s, s], 1)


def test_a_blur_shortcut_flips_on_blurring_and_not_on_its_mirror() -> None:
    recipients = (_textured(20) * 255).to(torch.uint8)
    blurred = image_properties(pi._blur(recipients.float() / 255, 1.5))["sharpness"]
    score = PropertyScore(auroc=0.02, p_value=0.001, class_median=float(blurred.median()), others_median=0.08)
    t = pi.property_transplant(Smooth(), recipients, 1, "sharpness", score, batch_size=8)
    assert t.flip_rate == 1.0 and t.control_flip_rate == 0.0 and t.discordant == (20, 0)
    assert "blurred" in t.where
    fragile = pi.property_transplant(Fragile(recipients.float() / 255), recipients, 1, "sharpness", score, 8)
    assert fragile.flip_rate == 1.0 and fragile.excess == 0.0  # any change flips it: the mirror says so


class Grainy(torch.nn.Module):
    """Class 1 for grainy images (Immerkaer's noise estimate high), else class 0: a "grain" shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = image_properties(x)["noise"] - 0.02 + self.w
        return torch.stack([-s, s], 1)


def test_two_classes_test_only_the_change_that_adds() -> None:
    smooth = (pi._blur(_textured(20), 2.0) * 255).to(torch.uint8)  # class 0's images: no grain
    grained = image_properties(pi._grain(smooth.float() / 255, 0.07))["noise"]
    high = PropertyScore(auroc=0.99, p_value=0.001, class_median=float(grained.median()), others_median=0.002)
    low = PropertyScore(auroc=0.01, p_value=0.001, class_median=0.002, others_median=high.class_median)
    assert pi.two_class_test("noise", high) and not pi.two_class_test("noise", low)  # blurring: not
    assert pi.two_class_test("hue", low) and not pi.two_class_test("entropy", high)  # equalizing: ungraded
    t = pi.property_transplant(Grainy(), smooth, 1, "noise", high, batch_size=8)
    assert t.flip_rate == 1.0 and t.control_flip_rate == 0.0 and "grain" in t.where


def test_only_flagged_properties_with_an_intervention_are_tested() -> None:
    strong = PropertyScore(auroc=0.95, p_value=0.001, class_median=1.0, others_median=0.0)
    probe = PropertyProbe(
        accuracy=0.5, majority_accuracy=0.5, used_file_properties=False, top_properties=(), per_class_f1={},
        auroc={"a": {"noise": strong, "brightness": strong, "entropy": PropertyScore(0.6, 0.001, 1.0, 0.0)},
               "b": {"noise": PropertyScore(0.95, 0.5, 1.0, 0.0)}},
    )  # fmt: skip
    assert pi.flagged(probe, A) == {"a": {"noise": strong}, "b": {}}  # brightness is the tone transplant's


def test_validate_warns_of_a_property_that_alone_tells_a_class(tmp_path: Path) -> None:
    import json

    from cnnops.data.planted import make_planted
    from cnnops.stages import validate

    make_planted(tmp_path / "data", "noise", "3", seed=0, per_class=20, fraction=1.0)
    params = parse_params(
        {
            "data": {"color_mode": "L", "near_duplicate_distance": 0},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": str(tmp_path / "a"),
            },
        },
        "validate property test",
    )
    report = tmp_path / "validation.json"
    validate.run(params, validate.ValidatePaths(tmp_path / "data", report, tmp_path / "docs"))
    found = json.loads(report.read_text())["image_properties"]
    assert {(f["class"], f["property"]) for f in found} >= {("3", "noise")}
    noise = {f["class"]: f["auroc"] for f in found if f["property"] == "noise"}  # a 1's thin strokes: low
    assert noise["3"] > 0.95 and max(noise.values()) == noise["3"]
