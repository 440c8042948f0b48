"""Saliency: the target layer is found for the ConvNet and torchvision families, batching changes
nothing, in-place ReLU and train mode are handled, and a bad layer name is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_model import one_thread
from pytorch_grad_cam import AblationCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cnnops.audit.evidence import describe_place, top_mask
from cnnops.audit.saliency import (
    find_target_layer,
    layer_grid,
    occlusion_squares,
    pointing_fn,
    saliency,
)
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


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "ablationcam"])
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


def test_ablation_cam_equals_the_grad_cam_package() -> None:
    """Our batched Ablation-CAM gives the package's AblationCAM maps (one image at a time, a layer
    swapped in): the ConvNet's last block ends in ReLU and max-pooling, so both zero a channel, and
    the targets are the classes with the highest (positive) scores, where y_c and |y_c| agree."""
    model = _model("convnet", 32, "RGB")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        targets = model(x).argmax(1)
        assert (model(x).gather(1, targets[:, None]) > 0).all()
    ours = saliency(model, x, targets, method="ablationcam")
    cam = AblationCAM(model=model, target_layers=[find_target_layer(model)[1]], batch_size=64)
    try:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
    assert (np.ptp(theirs.reshape(4, -1), axis=1) > 0.5).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


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


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_score_and_ablation_cam_forward_at_most_a_batch_of_masked_images(method: str) -> None:
    model = _model("convnet")  # 64 channels in its last block
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))  # the copy keeps it
    saliency(model, torch.rand(7, 1, 32, 32), torch.zeros(7, dtype=torch.long), method=method, batch_size=5)
    assert max(batches) <= 5
    assert sum(batches) == 1 + 7 + 7 * 64  # the layer search, each image's own forward, each (image, channel)


TAG = (slice(13, 18), slice(23, 28))  # a 5x5 tag beside the middle of the right edge: in no corner
METHODS_ON_TAG = ("gradcam", "ablationcam")


def _tagged_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: scikit-learn digits at 32 px; label 1 = the image carries the tag, 0 = it does not
    (whatever the digit), so the tag is the only evidence of the label."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images[rng.choice(1797, n, replace=False)] / 16.0
    x = torch.nn.functional.interpolate(torch.tensor(digits, dtype=torch.float32)[:, None], size=32)
    labels = torch.as_tensor(np.arange(n) % 2)
    x[labels == 1, :, TAG[0], TAG[1]] = 1.0
    return x, labels


def _trained_on_tags(name: str, lr: float, steps: int) -> torch.nn.Module:
    """`name` at 32 px trained `steps` Adam steps to tell tagged digits from plain ones."""
    torch.manual_seed(0)
    model = create_classifier(default_spec(name, ["plain", "tagged"], "L", (32, 32)))
    x, y = _tagged_digits(256, 0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with one_thread():
        for step in range(steps):
            part = slice(32 * (step % 8), 32 * (step % 8 + 1))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tag_resnet() -> torch.nn.Module:
    """ResNet-18 trained on the tagged digits: its target layer (layer3) is a 2x2 map, too coarse to
    say where the tag is."""
    return _trained_on_tags("resnet18", 1e-3, 60)


@pytest.fixture(scope="module")
def tag_convnet() -> torch.nn.Module:
    """The small ConvNet trained on the tagged digits: its target layer is an 8x8 map."""
    return _trained_on_tags("convnet", 3e-3, 40)


def _share_on_tag(maps: np.ndarray) -> float:
    """Share of each map's top 5% pixels on the tag or within 3 px of it, over the images."""
    on_tag = np.zeros((32, 32), dtype=bool)
    on_tag[TAG[0].start - 3 : TAG[0].stop + 3, TAG[1].start - 3 : TAG[1].stop + 3] = True
    tops = top_mask(maps, 0.05)
    return float((tops & on_tag).sum() / tops.sum())


def test_ablation_cam_points_at_a_learned_tag_as_grad_cam_does(tag_convnet: torch.nn.Module) -> None:
    x, y = _tagged_digits(24, 1)
    with torch.no_grad():
        assert (tag_convnet(x).argmax(1) == y).float().mean() > 0.9  # it learned the tag
    tagged = x[y == 1]
    targets = torch.ones(len(tagged), dtype=torch.long)
    with one_thread():
        shares = {m: _share_on_tag(saliency(tag_convnet, tagged, targets, method=m)) for m in METHODS_ON_TAG}
    # measured: Ablation-CAM 0.96, Grad-CAM 0.46 (its mean gradients spread over the digit's strokes)
    assert shares["ablationcam"] > 0.8 and shares["ablationcam"] >= shares["gradcam"], shares


def test_occlusion_chooses_the_place_where_a_resnet_map_is_coarse(tag_resnet: torch.nn.Module) -> None:
    x, y = _tagged_digits(24, 1)
    tagged = x[y == 1]
    with torch.no_grad():
        assert (tag_resnet(x).argmax(1) == y).float().mean() > 0.9  # it learned the tag
    assert layer_grid(tag_resnet, find_target_layer(tag_resnet)[1]) == (2, 2)
    targets = torch.ones(len(tagged), dtype=torch.long)

    with one_thread():
        pointed, why = pointing_fn(
            tag_resnet, method="gradcam", target_layer=None, batch_size=64, occlusion_patch=0.25
        )
        cam = saliency(tag_resnet, tagged, targets)
        maps = pointed(tagged, targets)
    assert why == "occlusion: the target layer's map is 2x2"
    assert _share_on_tag(maps) > 0.8  # the most-attended pixels sit on the tag
    assert _share_on_tag(cam) < 0.5  # the 2x2 CAM alone puts them in a quadrant's outer corner
    assert describe_place(top_mask(maps, 0.05).mean(0) > 0.5) == "right edge"


def test_a_fine_map_keeps_its_own_method() -> None:
    fn, why = pointing_fn(
        _model("convnet"), method="gradcam", target_layer=None, batch_size=8, occlusion_patch=0.25
    )
    assert why is None  # the ConvNet's last block is 8x8 at 32 px
    assert fn(torch.rand(2, 1, 32, 32), torch.tensor([0, 1])).shape == (2, 32, 32)


def test_occlusion_in_chunks_equals_one_forward_and_covers_every_pixel() -> None:
    model = _model("convnet")
    x, targets = torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 2])
    squares = occlusion_squares(32, 32, 0.25)
    assert squares.shape == (49, 1, 32, 32) and (squares.sum(0) > 0).all()  # 8 px moved by 4: 7 x 7
    chunked = saliency(model, x, targets, method="occlusion", batch_size=5)
    whole = saliency(model, x, targets, method="occlusion", batch_size=3 * 49)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
