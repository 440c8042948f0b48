"""Presets: training images are augmented as configured, evaluation images never are."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cnnops.config import AugmentParams
from cnnops.data.transforms import EvalPreset, TrainPreset, get_mixup_cutmix
from cnnops.training.engine import LoopSettings

NO_AUGMENTATION = {
    "random_resized_crop": False, "horizontal_flip": 0.0, "vertical_flip": 0.0, "random_rotation": 0.0,
    "color_jitter": 0.0, "randaugment": False, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
}  # fmt: skip


def image(channels: int = 1) -> torch.Tensor:
    return (
        torch.arange(channels * 16 * 16, dtype=torch.int64)
        .remainder(256)
        .to(torch.uint8)
        .view(channels, 16, 16)
    )


def test_eval_preset_leaves_the_pixels_and_the_loop_scales_them_on_the_device() -> None:
    x = image()
    assert torch.equal(EvalPreset()(x), x)
    on_device = LoopSettings(torch.device("cpu")).to_device(x[None])
    torch.testing.assert_close(on_device, x[None].float() / 255)


def test_train_preset_without_augmentation_is_the_eval_preset() -> None:
    x = image()
    assert torch.equal(
        TrainPreset(AugmentParams.from_defaults(**NO_AUGMENTATION), (16, 16), "L")(x), EvalPreset()(x)
    )


def test_train_preset_builds_each_configured_transform() -> None:
    augment = AugmentParams.from_defaults(
        random_resized_crop=True, horizontal_flip=0.5, vertical_flip=0.5, random_rotation=10,
        color_jitter=0.3, randaugment=True,
    )  # fmt: skip
    preset = TrainPreset(augment, (16, 16), "RGB")
    kinds = [type(t) for t in preset.transforms.transforms]
    assert kinds == [
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomRotation,
        v2.ColorJitter, v2.RandAugment,
    ]  # fmt: skip
    torch.manual_seed(0)
    out = preset(image(3))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8  # scaled to [0, 1] on the device


def test_grayscale_color_jitter_has_no_saturation() -> None:
    augment = AugmentParams.from_defaults(**{**NO_AUGMENTATION, "color_jitter": 0.4})
    preset = TrainPreset(augment, (16, 16), "L")
    (jitter,) = [t for t in preset.transforms.transforms if isinstance(t, v2.ColorJitter)]
    assert jitter.saturation is None and jitter.brightness == (0.6, 1.4)
    assert preset(image()).shape == (1, 16, 16)


def test_mixup_cutmix_is_none_when_off_and_gives_soft_labels_when_on() -> None:
    assert get_mixup_cutmix(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=3) is None
    mix = get_mixup_cutmix(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=3)
    assert isinstance(mix, v2.RandomChoice)
    torch.manual_seed(0)
    images, targets = mix(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert images.shape == (4, 1, 8, 8) and targets.shape == (4, 3)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_training_crops_the_input_from_the_stored_image_and_evaluation_centre_crops_it() -> None:
    """The reference recipe: images stored at 40 px, the network fed 32 px crops."""
    stored = torch.arange(40 * 40, dtype=torch.int32).reshape(1, 40, 40).to(torch.uint8)
    crop = AugmentParams.from_defaults(**{**NO_AUGMENTATION, "random_resized_crop": True})
    assert TrainPreset(crop, (32, 32), "L")(stored).shape == (1, 32, 32)
    assert TrainPreset(AugmentParams.from_defaults(**NO_AUGMENTATION), (32, 32), "L")(stored).shape == (
        1,
        32,
        32,
    )
    centre = EvalPreset((32, 32))(stored)
    assert torch.equal(centre, stored[:, 4:36, 4:36])
    torch.testing.assert_close(EvalPreset((40, 40))(stored), EvalPreset()(stored))
