"""`cnnops summary` and train's pre-flight: the lecture's memory table, checked against figures
worked out by hand, and the largest batch that fits a given amount of free memory."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from fixtures_model import digits_train_params, one_thread

from cnnops.audit import gallery
from cnnops.cli import main
from cnnops.config import load_params
from cnnops.errors import StageInputError
from cnnops.models import create_classifier, default_spec
from cnnops.stages import summary as command
from cnnops.stages import train
from cnnops.training import features
from cnnops.training.summary import Budget, ModelSummary, fit_batch, summarize, training_memory

DIGITS = [str(d) for d in range(10)]
MiB = 2**20

# The ConvNet on 1x32x32 digits, 10 classes, by hand: (layer, output C x H x W, parameters).
CONVNET = [
    ("net.features.0", (32, 32, 32), 1 * 32 * 5 * 5),  # conv 5x5, pad 2, no bias (BatchNorm follows)
    ("net.features.1", (32, 32, 32), 2 * 32),  # BatchNorm: scale and shift per channel
    ("net.features.2", (32, 32, 32), 0),  # ReLU, in place
    ("net.features.3", (32, 16, 16), 0),  # max pool 2
    ("net.features.4", (64, 16, 16), 32 * 64 * 3 * 3),  # conv 3x3, pad 1
    ("net.features.5", (64, 16, 16), 2 * 64),
    ("net.features.6", (64, 16, 16), 0),
    ("net.features.7", (64, 8, 8), 0),
    ("net.pool", (64, 4, 4), 0),  # adaptive average pool to 4x4
    ("net.classifier.0", (1024,), 0),  # flatten: a view
    ("net.classifier.1", (128,), 1024 * 128 + 128),
    ("net.classifier.2", (128,), 0),
    ("net.classifier.3", (128,), 0),  # dropout: the identity in eval mode
    ("net.classifier.4", (10,), 128 * 10 + 10),
]
# Values each image's forward pass keeps: the normalised input and every output but the in-place
# ReLUs, the flatten view and eval-mode dropout.
CONVNET_VALUES = (
    32 * 32 + 2 * 32 * 32 * 32 + 32 * 16 * 16 + 2 * 64 * 16 * 16 + 64 * 8 * 8 + 64 * 4 * 4 + 128 + 10
)
CONVNET_MACS = 32 * 32 * 32 * 25 + 16 * 16 * 64 * 32 * 9 + 1024 * 128 + 128 * 10  # per output value


@pytest.fixture(scope="module")
def convnet() -> ModelSummary:
    return summarize(create_classifier(default_spec("convnet", DIGITS, "L", (32, 32))))


def test_convnet_figures_match_the_hand_count(convnet: ModelSummary) -> None:
    leaves = [(layer.name, layer.output_shape, layer.params) for layer in convnet.rows()]
    assert leaves == [("input", (1, 32, 32), 0), *CONVNET]
    assert convnet.params == convnet.trainable_params == sum(p for _, _, p in CONVNET) == 151_914
    assert convnet.activation_bytes == 4 * CONVNET_VALUES == 451_112
    assert convnet.macs == CONVNET_MACS == 5_670_144
    assert convnet.buffer_elements == 2 * (32 + 64) + 2 + 2  # running mean/var, counters, mean/std
    blocks = {layer.name: layer for layer in convnet.rows(depth=0)}
    assert list(blocks) == ["input", "net.features", "net.pool", "net.classifier"]
    assert blocks["net.features"].params == 800 + 64 + 18_432 + 128
    assert sum(b.activation_bytes for b in blocks.values()) == convnet.activation_bytes


def test_vgg16_holds_most_parameters_in_its_first_dense_layer() -> None:
    """The lecture's VGG16 slide: 138M parameters, 103M of them in the first FC layer. Its rows of
    activations add up to 15.3M values an image (the slide's total says 24M: its own sum is 15.3M)."""
    vgg = summarize(
        create_classifier(default_spec("vgg16", [str(i) for i in range(1000)], "RGB", (224, 224)))
    )
    first_fc = next(layer for layer in vgg.layers if layer.kind == "Linear")
    assert vgg.params == 138_357_544 and first_fc.params == 7 * 7 * 512 * 4096 + 4096
    assert vgg.activation_bytes == 4 * 15_262_696


def test_training_memory_is_the_lectures_accounting(convnet: ModelSummary) -> None:
    adam = training_memory(convnet, 32, "fp32", "adamw", 0.9)
    weights = 4 * (151_914 + convnet.buffer_elements)
    assert (adam.weight_bytes, adam.gradient_bytes, adam.optimizer_bytes) == (
        weights,
        4 * 151_914,
        8 * 151_914,
    )
    assert adam.peak_bytes == weights + 12 * 151_914 + 32 * (2 * 451_112 + 4 * 32 * 32)
    assert training_memory(convnet, 32, "fp32", "sgd", 0.9).optimizer_bytes == 4 * 151_914
    assert training_memory(convnet, 32, "fp32", "sgd", 0.0).optimizer_bytes == 0
    assert training_memory(convnet, 32, "bf16", "adamw", 0.9).image_activation_bytes == 451_112  # x2, halved


def test_linear_probe_trains_only_the_head() -> None:
    model = create_classifier(default_spec("convnet", DIGITS, "L", (32, 32)))
    model.freeze_backbone()
    probe = training_memory(summarize(model), 8, "fp32", "adamw", 0.9)
    assert probe.gradient_bytes == 4 * 1290 and probe.optimizer_bytes == 8 * 1290


def test_auto_picks_the_largest_batch_that_fits(convnet: ModelSummary) -> None:
    memory = training_memory(convnet, 1, "fp32", "adamw", 0.9)
    budget = Budget("free on cuda:0", 100 * MiB, 0.9, gpu=True)
    batch = fit_batch(convnet, memory, budget, auto=True, cap=10**6)
    assert memory.at(batch).peak_bytes <= budget.bytes < memory.at(batch + 1).peak_bytes
    assert batch == (int(0.9 * 100 * MiB) - memory.fixed_bytes) // memory.image_bytes == 101
    assert fit_batch(convnet, memory, budget, auto=True, cap=64) == 64
    with pytest.raises(StageInputError, match=r"auto: convnet at 32x32 px.*not even one image fits 922 KiB"):
        fit_batch(convnet, memory, Budget("free on cuda:0", 2**20, 0.9, gpu=True), auto=True, cap=64)


def test_a_batch_over_the_gpu_budget_stops_naming_the_largest_that_fits(
    convnet: ModelSummary, caplog: pytest.LogCaptureFixture
) -> None:
    memory = training_memory(convnet, 512, "bf16", "adamw", 0.9)
    gpu = Budget("free on cuda:0", 100 * MiB, 0.9, gpu=True)
    with pytest.raises(StageInputError) as caught:
        fit_batch(convnet, memory, gpu, auto=False, cap=256)
    assert str(caught.value) == (
        "convnet at 32x32 px, bf16, adamw, batch 512: estimated peak training memory 225 MiB exceeds "
        "90 MiB (0.9 of the 100 MiB free on cuda:0); the largest batch that fits is 201: set "
        "train.batch_size: 201 (or auto) (cnnops summary shows the table)"
    )
    assert fit_batch(convnet, memory.at(201), gpu, auto=False, cap=256) == 201
    with caplog.at_level(logging.WARNING):
        cpu = Budget("RAM available", 100 * MiB, 0.9, gpu=False)
        assert fit_batch(convnet, memory, cpu, auto=False, cap=256) == 512
    assert "exceeds 90 MiB (0.9 of the 100 MiB RAM available)" in caplog.text and "may swap" in caplog.text


def test_command_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "summary.md"
    argv = [
        "summary",
        "--prepared",
        str(tmp_path),
        "--classes",
        "10",
        "--batch-size",
        "64",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "| net.features.0 | Conv2d | 32x32x32 | 800 | 128 KiB | 819 K |" in printed
    assert "| parameters (trainable) | 151,914 (151,914) |" in printed
    assert "estimated peak training memory, batch 64, fp32 activations" in printed
    assert "| largest batch in " in printed


def test_command_reads_class_count_from_the_prepared_split(prepared_digits: Path) -> None:
    params = load_params("params.yaml")
    result = command.run(params, command.SummaryPaths(prepared=prepared_digits), command.SummaryRequest())
    assert result.summary.input_shape == (1, 32, 32) and result.summary.params == 151_914
    assert result.memory.batch_size == params.train.batch_size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet81"], "unknown model 'resnet81' (did you mean resnet18, resnet152, resnet101?)"),
        (
            ["--model", "alexnet", "--input-size", "32"],
            "alexnet cannot take 32x32 images (Given input size: (256x1x1). Calculated output size: "
            "(256x0x0). Output size is too small); the smallest it takes is 63x63",
        ),
        (["--model", "convnext_tiny", "--input-size", "16x40"], "the smallest it takes is 32x40"),
        ([], "no prepared split at"),
    ],
)
def test_bad_input_is_a_clear_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = ["--classes", "10"] if argv else []
    assert main(["summary", "--prepared", str(tmp_path), *classes, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cnnops summary: error: ") and message in err and "Traceback" not in err


def test_train_picks_auto_batch_and_records_summary_and_features(
    tmp_path: Path, prepared_digits: Path, digits_params, caplog: pytest.LogCaptureFixture
) -> None:
    params = digits_train_params(tmp_path, digits_params, epochs=1, batch_size="auto", auto_batch_max=16)
    paths = train.TrainPaths(
        prepared=prepared_digits,
        model=tmp_path / "model.pt",
        report=tmp_path / "reports" / "train.json",
        history=tmp_path / "h.csv",
        curves=tmp_path / "h.png",
        state=tmp_path / "state.pt",
    )
    with caplog.at_level(logging.INFO), one_thread():
        result = train.run(params, paths)
    assert "train.batch_size auto: 16 (convnet at 32x32 px, fp32, adamw; estimated peak" in caplog.text
    table = (tmp_path / "reports" / "model_summary.md").read_text()
    assert "| parameters (trainable) | 151,914 (151,914) |" in table and "batch 16, fp32" in table
    c = mlflow.MlflowClient(tracking_uri=params.tracking.resolved_uri)
    run = c.get_run(result.run_id)
    assert run.data.metrics["train_batch_size"] == 16 and run.data.metrics["model_params"] == 151_914
    logged = {a.path for folder in ("train", "features") for a in c.list_artifacts(result.run_id, folder)}
    assert {
        "train/model_summary.md",
        "features/first_conv_filters.png",
        "features/feature_maps.png",
    } <= logged


def test_feature_pictures_show_the_first_filters_and_three_depths() -> None:
    model = create_classifier(default_spec("resnet18", DIGITS, "L", (32, 32)))
    found = features.pictures(model, torch.rand(2, 1, 32, 32))
    assert found.layers == ("net.conv1", "net.layer2.1.conv2", "net.layer4.1.conv2")
    assert found.filters.size == (3 * (8 * 8 + 1),) * 2  # 64 7x7 filters, 8 a row, 1-px gaps, 3x
    assert found.maps.height > found.maps.width / 4  # two image rows
    assert (
        features.pictures(
            create_classifier(default_spec("mlp", DIGITS, "L", (16, 16))), torch.rand(1, 1, 16, 16)
        )
        is None
    )


def test_audit_gallery_section_embeds_both_pictures_with_escaped_layer_names() -> None:
    model = create_classifier(default_spec("convnet", DIGITS, "L", (32, 32)))
    found = features.pictures(model, torch.rand(2, 1, 32, 32))
    section = "".join(gallery._features_section(replace(found, layers=("<b>net.x</b>",))))
    assert section.count("src='data:image/png;base64,") == 2 and "&lt;b&gt;net.x&lt;/b&gt;" in section
    assert gallery._features_section(None) == []
