"""Know the network before training it: the lecture's memory table for any model at any input size.

Per layer: output shape, parameters, activation memory and multiply-accumulates for one image.
Totals: parameters, activations (forward, and x2 for backward: each kept output gets a gradient of
its size), weights + gradients + optimizer state, and for a batch size and precision the estimated
peak training memory: what train's pre-flight check compares with the device's free memory, and
what `train.batch_size: auto` inverts into the largest batch that fits (as Ultralytics' AutoBatch).

Shapes and parameters come from torchinfo, multiply-accumulates from torch.utils.flop_counter:
torchinfo counts a Linear once an image, not once a position, so it misses most of ConvNeXt's
(0.32 G against 4.45 G at 224 px); the flop counter counts the aten ops (conv, matmul, attention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import psutil
import torch
import torchinfo
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnops.errors import StageInputError
from cnnops.models import Classifier

log = logging.getLogger(__name__)

FP32 = 4  # bytes of a float32: weights, gradients, optimizer state and fp32 activations
AMP = 2  # bytes of a bf16 / fp16 activation under autocast (weights stay fp32)
PRECISIONS = {"fp32": FP32, "bf16": AMP, "fp16": AMP}
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each
# fp32 buffers the optimizer keeps per trainable parameter: Adam's two moments; SGD's momentum
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}
INPUT = "input"  # the row of the normalised image the network reads


@dataclass(frozen=True)
class Layer:
    """One module of the network, as one image sees it."""

    name: str  # module path in the Classifier, e.g. net.features.0 (INPUT: the normalised image)
    kind: str  # module class
    depth: int  # 0: the network's own children; a child is one deeper than its parent
    leaf: bool  # no child modules: the rows of the full table
    output_shape: tuple[int, ...]  # without the batch dimension
    params: int
    activation_bytes: int  # new fp32 memory its outputs hold (0: a view or an in-place op); of a
    #   block: its leaves' sum
    macs: int  # multiply-accumulates (convolutions, matmuls, attention)


@dataclass(frozen=True)
class ModelSummary:
    """A model at one input size: its layers in execution order and the totals for one image."""

    model: str
    input_shape: tuple[int, int, int]  # C, H, W the Classifier takes
    layers: tuple[Layer, ...]
    params: int
    trainable_params: int
    buffer_elements: int  # BatchNorm running statistics and the like: on the device with the weights
    activation_bytes: int  # forward, fp32, one image: the sum of the leaves' (and the input row)
    macs: int

    def rows(self, depth: int | None = None) -> list[Layer]:
        """The table's rows: every leaf, or the modules at `depth` (leaves above it as they are)."""
        if depth is None:
            return [layer for layer in self.layers if layer.leaf]
        return [row for row in self.layers if row.depth == depth or (row.leaf and row.depth < depth)]


@dataclass(frozen=True)
class TrainingMemory:
    """The estimated peak memory of one training step (the lecture's accounting, fp32 master weights).

    Affine in the batch: fixed weights, gradients and optimizer state, plus a cost an image.
    """

    batch_size: int
    precision: str  # fp32, bf16 or fp16 (autocast on a GPU)
    optimizer: str
    optimizer_states: int  # fp32 buffers per trainable parameter
    weight_bytes: int  # parameters and buffers
    gradient_bytes: int  # trainable parameters only
    optimizer_bytes: int
    image_activation_bytes: int  # one image's, forward + backward, in `precision`
    image_input_bytes: int  # one image as float32 on the device

    @property
    def fixed_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def image_bytes(self) -> int:
        return self.image_activation_bytes + self.image_input_bytes

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.batch_size * self.image_bytes

    def at(self, batch_size: int) -> TrainingMemory:
        return replace(self, batch_size=batch_size)

    def largest_batch(self, budget_bytes: int, cap: int) -> int:
        """The largest batch, at most `cap`, whose estimate fits `budget_bytes` (0: not even one)."""
        return max(0, min(cap, (budget_bytes - self.fixed_bytes) // self.image_bytes))


def summarize(model: Classifier) -> ModelSummary:
    """The model's summary at its spec's input size, from one eval-mode forward pass of one image."""
    spec = model.spec
    shape = (spec.in_channels, *spec.image_size)
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # attention's eval-mode fast path is one fused op the flop counter does not count (ViT-B/16:
    # 11.3 G MACs counted instead of 17.6 G); the unfused path is the one training runs
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as flops, _fresh_output_bytes(model) as fresh:
            # input_data, not input_size: torchinfo would move a CPU model to the GPU
            image = torch.zeros(1, *shape, device=model.mean.device)
            info = torchinfo.summary(model, input_data=image, depth=64, verbose=0)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    names = {id(module): name for name, module in model.named_modules()}
    prefix = f"{type(model).__name__}."  # the flop counter names modules from the root's class
    macs = {key.removeprefix(prefix): sum(ops.values()) // 2 for key, ops in flops.get_flop_counts().items()}
    first = _input_row(model)
    leaves = {id(m): fresh.get(id(m), 0) for m in model.net.modules() if not list(m.children())}
    layers = [first]
    for row in info.summary_list:
        name = names.get(id(row.module), "")
        if not name.startswith("net."):
            continue  # the Classifier and its `net`: the totals
        layers.append(
            Layer(
                name=name,
                kind=row.class_name,
                depth=name.count(".") - 1,
                leaf=row.is_leaf_layer,
                output_shape=tuple(row.output_size[1:]),
                params=max(row.num_params, 0),
                activation_bytes=sum(leaves.get(id(m), 0) for m in row.module.modules()),
                macs=macs.get(name, 0),
            )
        )
    return ModelSummary(
        model=spec.model,
        input_shape=shape,
        layers=tuple(layers),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        buffer_elements=sum(b.numel() for b in model.buffers()),
        activation_bytes=first.activation_bytes + sum(leaves.values()),
        macs=macs.get("Global", 0),
    )


def _input_row(model: Classifier) -> Layer:
    """The normalised image: (x - mean) / std is a new tensor the first layer keeps for backward."""
    h, w = model.spec.image_size
    channels = 3 if model.expand_gray else model.spec.in_channels
    return Layer(INPUT, "Normalize", 0, True, (channels, h, w), 0, FP32 * channels * h * w, 0)


@contextmanager
def _fresh_output_bytes(model: Classifier) -> Iterator[dict[int, int]]:
    """Per leaf module (by id), the bytes of the outputs that hold new memory, for one forward pass.

    Hand-written forward hooks: torchinfo gives every output's size but not whether it is a view
    (Flatten, Permute) or an in-place op (ReLU(inplace=True)) of its input, which hold no memory of
    their own (the lecture's VGG16 table counts a convolution and its in-place ReLU once).
    """
    fresh: dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        fresh[id(module)] = fresh.get(id(module), 0) + sum(
            t.numel() * t.element_size()
            for t in outputs
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in taken
        )

    handles = [m.register_forward_hook(hook) for m in model.net.modules() if not list(m.children())]
    try:
        yield fresh
    finally:
        for handle in handles:
            handle.remove()


def optimizer_states(optimizer: str, momentum: float) -> int:
    """fp32 buffers an optimizer keeps per trainable parameter (SGD without momentum keeps none)."""
    return 0 if optimizer == "sgd" and momentum == 0 else OPTIMIZER_STATES[optimizer]


def training_memory(
    summary: ModelSummary, batch_size: int, precision: str, optimizer: str, momentum: float
) -> TrainingMemory:
    """The estimated peak of one training step at `batch_size` (activations in `precision`)."""
    states = optimizer_states(optimizer, momentum)
    return TrainingMemory(
        batch_size=batch_size,
        precision=precision,
        optimizer=optimizer,
        optimizer_states=states,
        weight_bytes=FP32 * (summary.params + summary.buffer_elements),
        gradient_bytes=FP32 * summary.trainable_params,
        optimizer_bytes=FP32 * states * summary.trainable_params,
        image_activation_bytes=2 * summary.activation_bytes * PRECISIONS[precision] // FP32,
        image_input_bytes=FP32 * math.prod(summary.input_shape),
    )


@dataclass(frozen=True)
class Budget:
    """The memory a run may fill: a share of what a device has free."""

    label: str  # what the free memory is, e.g. "free on cuda:0", "RAM available"
    free_bytes: int
    fraction: float  # train.memory_fraction: the rest is for the allocator's cache and workspaces
    gpu: bool  # an estimate over a GPU's budget stops the run; over RAM it warns

    @property
    def bytes(self) -> int:
        return int(self.free_bytes * self.fraction)

    def describe(self) -> str:
        return f"{_size(self.bytes)} ({self.fraction:g} of the {_size(self.free_bytes)} {self.label})"


def device_budget(device: torch.device, fraction: float) -> Budget:
    """What `device` has free now: torch.cuda.mem_get_info on a GPU, psutil's available RAM on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return Budget(f"free on {device}", int(free), fraction, gpu=True)
    return Budget("RAM available", int(psutil.virtual_memory().available), fraction, gpu=False)


def configured_precision(amp: str, device: torch.device) -> str:
    """The precision `train.amp` gives on `device`: autocast on CUDA only (auto: bf16 where supported)."""
    if device.type != "cuda" or amp == "off":
        return "fp32"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


def _size(n: float) -> str:
    """Bytes in binary units, as the lecture's MB (2**20) and a GPU's GB (2**30)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    """A count in thousands, millions or billions (parameters, MACs)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def fit_batch(summary: ModelSummary, memory: TrainingMemory, budget: Budget, *, auto: bool, cap: int) -> int:
    """The pre-flight check: the batch to train with, decided before the first step.

    `auto` (`train.batch_size: auto`) picks the largest batch whose estimate fits the budget, at
    most `cap`. A given batch (`memory.batch_size`) whose estimate exceeds a GPU's budget stops the
    run, naming the largest that fits; on CPU, where RAM swaps before it runs out, it warns.
    """
    fits = memory.largest_batch(budget.bytes, cap)
    where = f"{summary.model} at {_shape(summary.input_shape[1:])} px, {memory.precision}, {memory.optimizer}"
    if auto:
        if fits == 0:
            raise StageInputError(
                f"train.batch_size auto: {where}: not even one image fits {budget.describe()} (one image: "
                f"{_size(memory.at(1).peak_bytes)}); choose a smaller train.model or train.input_size"
            )
        peak = _size(memory.at(fits).peak_bytes)
        log.info(
            "train.batch_size auto: %d (%s; estimated peak %s of %s)", fits, where, peak, budget.describe()
        )
        return fits
    if memory.peak_bytes <= budget.bytes:
        return memory.batch_size
    message = (
        f"{where}, batch {memory.batch_size}: estimated peak training memory {_size(memory.peak_bytes)} "
        f"exceeds {budget.describe()}; the largest batch that fits is {fits}"
    )
    if not budget.gpu:
        log.warning("%s: training may swap or be killed (cnnops summary shows the table)", message)
        return memory.batch_size
    hint = f"set train.batch_size: {fits} (or auto)" if fits else "choose a smaller model or input size"
    raise StageInputError(f"{message}: {hint} (cnnops summary shows the table)")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def totals(summary: ModelSummary, memory: TrainingMemory) -> dict[str, float]:
    """The summary's totals as MLflow metrics."""
    return {
        "model_params": summary.params,
        "model_trainable_params": summary.trainable_params,
        "model_macs_per_image": summary.macs,
        "model_activation_mib_per_image": summary.activation_bytes / 2**20,
        "train_batch_size": memory.batch_size,
        "train_memory_estimate_mib": memory.peak_bytes / 2**20,
    }


def render(
    summary: ModelSummary, memory: TrainingMemory, depth: int | None = None, budget: Budget | None = None
) -> str:
    """The summary as Markdown: the per-layer table, then the totals (and what fits `budget`)."""
    lines = [
        f"## {summary.model} at {_shape(summary.input_shape)} (C x H x W)",
        "",
        "| layer | type | output shape | parameters | activations / image | MACs / image |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for layer in summary.rows(depth):
        lines.append(
            f"| {layer.name} | {layer.kind} | {_shape(layer.output_shape)} | "
            f"{layer.params:,} | {_size(layer.activation_bytes)} | {_count(layer.macs)} |"
        )
    lines += ["", "| total | |", "| --- | ---: |"]
    lines += [f"| {name} | {value} |" for name, value in _total_rows(summary, memory, budget)]
    return "\n".join(lines) + "\n"


def _total_rows(
    summary: ModelSummary, memory: TrainingMemory, budget: Budget | None
) -> list[tuple[str, str]]:
    m = memory
    state = (
        f"{m.optimizer} state (x{m.optimizer_states})" if m.optimizer_states else f"{m.optimizer} (no state)"
    )
    rows = [
        ("parameters (trainable)", f"{summary.params:,} ({summary.trainable_params:,})"),
        ("multiply-accumulates / image", _count(summary.macs)),
        ("activations / image, forward (fp32)", _size(summary.activation_bytes)),
        ("activations / image, forward + backward (x2)", _size(2 * summary.activation_bytes)),
        (
            f"weights {_size(m.weight_bytes)} + gradients {_size(m.gradient_bytes)} + {state} "
            f"{_size(m.optimizer_bytes)}",
            _size(m.fixed_bytes),
        ),
        (
            f"estimated peak training memory, batch {m.batch_size}, {m.precision} activations",
            _size(m.peak_bytes),
        ),
    ]
    if budget is not None:
        rows.append((f"largest batch in {budget.describe()}", f"{m.largest_batch(budget.bytes, 2**62):,}"))
    return rows
