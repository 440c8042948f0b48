"""Train and eval presets on torchvision.transforms.v2, built from `train.augment` params.

The presets take one uint8 CxHxW image (the prepared-split format, at the stored size) and return
uint8 at the network's input size; the loop turns a batch into float32 in [0, 1] on the device
(`LoopSettings.to_device`), so a quarter of the bytes cross to a GPU and the conversion runs there,
as do MixUp and CutMix (batch transforms, applied after the copy). Geometry: training crops the
stored image at random (RandomResizedCrop, the reference recipe's), evaluation centre-crops it (a
no-op when both sizes agree). Normalisation lives
inside the model (`models.Classifier`), so evaluation, audit and ONNX can never drift from training.
Validation and test use the eval preset only: never augmented.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cnnops.config import AugmentParams


class TrainPreset:
    """Random augmentation for one training image, configured by AugmentParams."""

    def __init__(self, augment: AugmentParams, image_size: tuple[int, int], color_mode: str) -> None:
        steps: list[v2.Transform] = []
        if augment.random_resized_crop:
            steps.append(v2.RandomResizedCrop(image_size, scale=augment.crop_scale, antialias=True))
        else:
            steps.append(v2.CenterCrop(image_size))
        if augment.horizontal_flip > 0:
            steps.append(v2.RandomHorizontalFlip(augment.horizontal_flip))
        if augment.vertical_flip > 0:
            steps.append(v2.RandomVerticalFlip(augment.vertical_flip))
        if augment.random_rotation > 0:
            steps.append(v2.RandomRotation(augment.random_rotation))
        if augment.color_jitter > 0:
            s = augment.color_jitter
            # Saturation is meaningless on one channel, so grayscale data jitters brightness/contrast only.
            steps.append(
                v2.ColorJitter(brightness=s, contrast=s, saturation=s if color_mode == "RGB" else 0.0)
            )
        if augment.randaugment:
            steps.append(v2.RandAugment(magnitude=augment.randaugment_magnitude))
        self.transforms = v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transforms(image)


class EvalPreset:
    """Validation/test preprocessing: a centre crop to the input size, nothing random."""

    def __init__(self, image_size: tuple[int, int] | None = None) -> None:
        self.transforms = v2.Identity() if image_size is None else v2.CenterCrop(image_size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transforms(image)


def get_mixup_cutmix(*, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """A batch transform (images, labels) -> (mixed images, soft labels); None when both are off."""
    choices: list[v2.Transform] = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
