"""Saliency: the target layer is found for the ConvNet and torchvision families, batching changes
nothing, in-place ReLU and train mode are handled, and a bad layer name is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cnnops.audit.saliency import find_target_layer, saliency
from cnnops.errors import ConfigError
from cnnops.models import create_classifier, default_spec


def _model(name: str, size: int = 32, color: str = "L"):
    torch.manual_seed(0)
    return create_classifier(default_spec(name, ["a", "b", "c"], color, (size, size))).eval()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("convnet", "features"),
        ("resnet18", "layer4"),
        ("mobilenet_v3_small", "features"),
        ("vgg11", "features"),
        ("efficientnet_b0", "features"),
        ("shufflenet_v2_x0_5", "conv5"),
    ],
)
def test_target_layer_found_for_each_family(name: str, expected: str) -> None:
    size = 32 if name == "convnet" else 64
    assert find_target_layer(_model(name, size), None)[0] == expected


def test_target_layer_from_params_and_bad_name() -> None:
    model = _model("convnet")
    assert find_target_layer(model, "features.6")[0] == "features.6"
    with pytest.raises(ConfigError, match=r"audit.target_layer: 'featurs' .*did you mean features"):
        find_target_layer(model, "featurs")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_batched_maps_equal_one_at_a_time(method: str) -> None:
    model = _model("convnet")
    x = torch.rand(6, 1, 32, 32)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    batched = saliency(model, x, targets, method=method, batch_size=6)
    single = np.concatenate(
        [saliency(model, x[i : i + 1], targets[i : i + 1], method=method) for i in range(6)]
    )
    assert batched.shape == (6, 32, 32)
    assert batched.min() >= 0.0 and batched.max() <= 1.0
    np.testing.assert_allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize(("name", "size"), [("convnet", 32), ("resnet18", 64)])
@pytest.mark.parametrize(("method", "reference"), [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus)])
def test_maps_equal_the_grad_cam_package(name: str, size: int, method: str, reference: type) -> None:
    """Our head-only backward gives the package's maps (its full backward, cv2 resize, numpy scaling).

    Both scale each map to [0, 1] after a bilinear upsample to the input size (cv2 there, torch here:
    the same half-pixel interpolation), so they agree at the input size to float32 rounding.
    """
    model = _model(name, size, "RGB")
    x = torch.rand(5, 3, size, size)
    targets = torch.tensor([0, 1, 2, 0, 1])
    ours = saliency(model, x, targets, method=method)
    cam = reference(model=model, target_layers=[find_target_layer(model)[1]])
    try:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
    assert ours.shape == theirs.shape == (5, size, size)
    assert (np.ptp(theirs.reshape(5, -1), axis=1) > 0.5).sum() >= 2  # some maps are not all zeros
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_saliency_leaves_the_model_alone_and_ignores_train_mode() -> None:
    model = _model("convnet").train()  # BatchNorm/Dropout in train mode would make maps batch-dependent
    x, targets = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    first = saliency(model, x, targets)
    again = saliency(model, x[:2], targets[:2])
    np.testing.assert_allclose(first[:2], again, atol=1e-5)
    assert model.training  # the caller's model is not switched to eval
    assert all(m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU))  # nor its ReLUs
    assert all(p.requires_grad for p in model.parameters())  # nor its parameters' gradients


def test_a_planted_square_draws_the_map() -> None:
    """A hand-made ConvNet whose only evidence is a bright corner square: the map must peak there."""
    model = _model("convnet")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        conv1, conv2 = model.net.features[0], model.net.features[4]
        conv1.weight.fill_(1.0 / 25)  # mean brightness
        conv2.weight[:, 0].fill_(1.0 / 9)
        for bn in (model.net.features[1], model.net.features[5]):
            bn.weight.fill_(1.0)
        head = model.net.classifier[1]
        head.weight.fill_(0.01)
        model.net.classifier[4].weight[0].fill_(1.0)
    x = torch.zeros(1, 1, 32, 32)
    x[:, :, 2:6, 26:30] = 1.0
    m = saliency(model, x, torch.tensor([0]))[0]
    y, xx = np.unravel_index(m.argmax(), m.shape)
    assert y < 10 and xx > 22


def test_score_cam_in_chunks_equals_one_forward_of_every_masked_image() -> None:
    """batch_size 3 makes its 4 x 64 masked images 3 at a time; 256 makes them all in one forward."""
    model = _model("convnet")
    x, targets = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    chunked = saliency(model, x, targets, method="scorecam", batch_size=3)
    whole = saliency(model, x, targets, method="scorecam", batch_size=4 * 64)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_score_cam_forwards_at_most_a_batch_of_masked_images() -> None:
    model = _model("convnet")  # 64 channels in its last block
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))  # the copy keeps it
    saliency(
        model, torch.rand(7, 1, 32, 32), torch.zeros(7, dtype=torch.long), method="scorecam", batch_size=5
    )
    assert max(batches) <= 5
    assert sum(batches) == 1 + 7 + 7 * 64  # the layer search, each image's own forward, each (image, channel)
