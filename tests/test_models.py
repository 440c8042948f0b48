"""Model factory: every supported architecture trains a step on grayscale input; pretrained weights
come only from TORCH_HOME; a linear probe never changes the backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cases_hostile import Payload
from fixtures_model import cache_fake_resnet18, one_thread, publish_weights, saved
from torchvision.models import get_model_weights

from cnnops.errors import ConfigError, WeightsNotFoundError
from cnnops.models import (
    Classifier,
    create_classifier,
    default_spec,
    load_classifier,
    save_checkpoint,
    weights_file,
)

CLASSES = ["a", "b", "c"]

# The architectures issue 4 requires, each at the smallest input it takes (alexnet needs >= 63 px).
ARCHITECTURES = {
    "convnet": 16,
    "mlp": 16,
    "resnet18": 32,
    "resnet34": 32,
    "resnet50": 32,
    "vgg16_bn": 32,
    "alexnet": 64,
    "mobilenet_v3_small": 32,
    "mobilenet_v3_large": 32,
    "efficientnet_b0": 32,
    "convnext_tiny": 32,
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_trains_a_step_on_grayscale(name: str) -> None:
    size = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = create_classifier(default_spec(name, CLASSES, "L", (size, size)), check_input=True).train()
    assert model.head.out_features == len(CLASSES)
    assert model.expand_gray == (name not in ("convnet", "mlp"))
    images, labels = torch.rand(2, 1, size, size), torch.tensor([0, 2])
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with one_thread():
        logits = model(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    assert logits.shape == (2, len(CLASSES))
    assert not torch.equal(before, model.head.weight)


def test_mlp_flattens_normalised_pixels_through_relu_hidden_layers() -> None:
    spec = default_spec("mlp", CLASSES, "RGB", (8, 12))
    model = create_classifier(spec, check_input=True)
    layers = [type(m).__name__ for m in model.net.classifier]
    assert layers[0] == "Flatten" and layers[-1] == "Linear" and "ReLU" in layers and "Dropout" in layers
    assert model.net.classifier[1].in_features == 3 * 8 * 12  # every pixel of every channel
    assert model.head.out_features == len(CLASSES) and not model.expand_gray
    assert spec.mean == (0.5,) * 3 and spec.std == (0.5,) * 3  # as the ConvNet: [0, 1] -> [-1, 1]


def test_mlp_has_no_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match=r"the 'mlp' has no pretrained weights; set train.weights: null"):
        create_classifier(default_spec("mlp", CLASSES, "L", (16, 16)), "DEFAULT")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet81'.*resnet18"):
        create_classifier(default_spec("resnet81", CLASSES, "L", (32, 32)))


def test_too_small_input_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"alexnet cannot take 32x32 images.*prepare.image_size"):
        create_classifier(default_spec("alexnet", CLASSES, "L", (32, 32)), check_input=True)


def test_unknown_weights_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"resnet18 has no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        default_spec("resnet18", CLASSES, "L", (32, 32), weights="IMAGENET9K")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = create_classifier(default_spec("convnet", CLASSES, "RGB", (16, 16))).eval()
    save_checkpoint(tmp_path / "m.pt", model, {"run_id": "abc"})
    loaded, extra = load_classifier(tmp_path / "m.pt")
    x = torch.rand(3, 3, 16, 16)
    assert extra == {"run_id": "abc"}
    assert torch.equal(model(x), loaded(x))


def test_missing_weights_error_names_file_path_and_command(torch_home: Path) -> None:
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_file(get_model_weights("resnet18").IMAGENET1K_V1) == expected
    with pytest.raises(WeightsNotFoundError) as caught:
        create_classifier(default_spec("resnet18", CLASSES, "L", (32, 32)), "IMAGENET1K_V1")
    message = str(caught.value)
    assert f"must be at {expected}" in message
    assert "get_model_weights('resnet18').IMAGENET1K_V1.get_state_dict" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not expected.exists()  # nothing was downloaded


def test_pretrained_weights_load_from_torch_home(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = cache_fake_resnet18(torch_home, monkeypatch)
    spec = default_spec("resnet18", CLASSES, "L", (32, 32), weights="DEFAULT")
    model = create_classifier(spec, "DEFAULT")
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.head.out_features == len(CLASSES)  # the ImageNet head is replaced
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))  # the weights' own normalisation


def test_linear_probe_keeps_backbone_weights_and_batchnorm_stats(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_fake_resnet18(torch_home, monkeypatch)
    model = create_classifier(default_spec("resnet18", CLASSES, "L", (32, 32)), "IMAGENET1K_V1")
    model.freeze_backbone()
    model.train()
    before = {k: v.clone() for k, v in model.net.state_dict().items() if not k.startswith("fc.")}
    head_before = model.head.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with one_thread():
        for _ in range(3):
            logits = model(torch.rand(4, 1, 32, 32))
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = model.net.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []  # conv weights, BN affine params, running_mean/var, num_batches_tracked
    assert not torch.equal(head_before, model.head.weight)
    assert model.net.bn1.training is False and model.head.training is True
    backbone, head = model.parameter_groups()
    assert backbone == [] and len(head) == 2


def test_finetune_parameter_groups_split_backbone_and_head() -> None:
    model: Classifier = create_classifier(default_spec("convnet", CLASSES, "L", (16, 16)))
    backbone, head = model.parameter_groups()
    assert {id(p) for p in head} == {id(model.head.weight), id(model.head.bias)}
    assert len(backbone) + len(head) == len(list(model.parameters()))


RESNET18_V1 = get_model_weights("resnet18").IMAGENET1K_V1


def _resnet18_v1() -> Classifier:
    return create_classifier(default_spec("resnet18", CLASSES, "L", (32, 32)), "IMAGENET1K_V1")


def test_planted_pickle_under_the_real_cache_name_is_refused(torch_home: Path, tmp_path: Path) -> None:
    """resnet18-f37072fd.pth holding a code-running pickle: the sha256 check refuses it unread."""
    live = tmp_path / "live"
    torch.save({"conv1.weight": Payload(live)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert live.exists()  # the payload is real: torchvision's weights_only=False load would run it
    marker = tmp_path / "pwned"
    path = weights_file(RESNET18_V1)
    path.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Payload(marker)}, path)
    with pytest.raises(WeightsNotFoundError) as caught:
        _resnet18_v1()
    message = str(caught.value)
    assert f"{path}: sha256 " in message and "does not start with f37072fd" in message
    assert "delete it" in message and "get_model_weights('resnet18').IMAGENET1K_V1.get_state_dict" in message
    assert not marker.exists()


def test_pickle_matching_its_hash_is_still_never_unpickled_as_code(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 8-hex-digit prefix is only 32 bits, so a forger can match it: weights_only=True is the guard."""
    marker = tmp_path / "pwned"
    path = publish_weights(torch_home, monkeypatch, RESNET18_V1, saved({"conv1.weight": Payload(marker)}))
    with pytest.raises(
        WeightsNotFoundError, match=rf"{path.name}: refused as weights \(UnpicklingError.*delete it"
    ):
        _resnet18_v1()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (saved([1, 2]), "holds a list, not a state dict of tensors"),
        (saved({"conv1.weight": torch.zeros(1)}), "do not fit torchvision's resnet18 .*Missing key"),
        (b"not a zip archive", "refused as weights"),
    ],
)
def test_cached_file_that_is_not_a_state_dict_is_refused(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, message: str
) -> None:
    publish_weights(torch_home, monkeypatch, RESNET18_V1, data)
    with pytest.raises(WeightsNotFoundError, match=message):
        _resnet18_v1()


def test_truncated_cache_file_fails_its_hash(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_fake_resnet18(torch_home, monkeypatch)
    path = weights_file(RESNET18_V1)
    path.write_bytes(path.read_bytes()[:1000])  # a half-finished copy
    with pytest.raises(WeightsNotFoundError, match=f"{path.name}: sha256 .* does not start with"):
        _resnet18_v1()
