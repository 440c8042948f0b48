"""params.yaml: one schema, validated once at load time.

Every section is a frozen pydantic model that forbids unknown keys, so a typo is an error that
names the key path and suggests the closest valid key instead of a knob silently ignored.
Stages receive their typed section, never a dict.

The schema holds types, ranges and descriptions but no default value: the defaults are the
project's params.yaml, shipped in the package as `cnnops/params.yaml` (a link to it in the
source tree), so a value is written in one place only. A params file, or a partial mapping given to
`parse_params`, is merged over them key by key, then validated.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from cnnops.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")  # the file a command reads unless --params names another
MAX_WORKERS = 64  # DataLoader worker processes: more only exhausts memory and file handles
# Upper bounds: a value past them exhausts memory, disk or time instead of doing more of the same.
SEED_LIMIT = 2**32  # exclusive: numpy's legacy seeding and scikit-learn's random_state take 32 bits
MIN_IMAGE_SIDE = 8  # pixels: the smallest the pipeline is built for (the ConvNet's two poolings leave 2x2)
MAX_IMAGE_SIDE = 4096  # pixels: 50 MB an RGB image in a prepared split; bounds ONNX input_size too
MAX_IMAGE_PIXELS = 2 * 89_478_485  # twice Pillow's default Image.MAX_IMAGE_PIXELS, where Pillow itself
# refuses an image outright: a larger limit turns the decompression-bomb protection off
MAX_CLASSES = 100_000  # of a dataset or an ONNX file's class_names (ImageNet-21k has 21,841)
MAX_BATCH = 65_536  # images a batch: their activations at 224x224 exceed any accelerator's memory
MAX_EPOCHS = 10_000  # full passes over the training split: past any schedule the pipeline runs
MAX_RUNS = 10_000  # timed runs a latency engine: 10,000 runs of a ResNet-50 on a CPU take minutes
SHIPPED_PARAMS = "params.yaml"  # package data of `cnnops`: every default value


class Section(BaseModel):
    """Base of every params section: frozen, strict about unknown keys, numbers finite.

    Numbers and switches are Strict* types, never coerced: `true` is not the int 1, nor "32" the
    int 32. Not `strict=True` here: strict tuples refuse the lists YAML gives."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def from_defaults(cls, **values: Any) -> Self:
        """This section as params.yaml ships it with `values` on top, validated: one section for code
        (tests, benchmarks) that needs no whole params file."""
        return cls.model_validate(deep_merge(_defaults_of(cls), values))


def _image_sides(size: tuple[int, int]) -> tuple[int, int]:
    if not all(MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE for side in size):
        raise ValueError(f"each side must be {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels")
    return size


ImageSize = Annotated[tuple[StrictInt, StrictInt], AfterValidator(_image_sides)]  # [height, width]


class BaseParams(Section):
    seed: StrictInt = Field(
        ge=0, lt=SEED_LIMIT, description="seed for splits, initialisation and augmentation"
    )


class TrackingParams(Section):
    uri: str = Field(
        description="MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set",
    )
    artifact_location: str = Field(
        description="artifact folder for a new experiment on a local store (relative to cwd)"
    )
    experiment: str = Field(min_length=1, description="MLflow experiment name")

    @property
    def resolved_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.uri


WindowEnd = Annotated[StrictFloat | StrictInt, Field(ge=-(2**31), le=2**32)]  # a high-bit pixel value
Percentile = Annotated[StrictFloat | StrictInt, Field(ge=0, le=100)]


class DataParams(Section):
    color_mode: Literal["RGB", "L"] = Field(description="colour mode every image is converted to")
    max_image_pixels: StrictInt = Field(
        gt=0,
        le=MAX_IMAGE_PIXELS,
        description="larger images are refused as decompression bombs (Pillow's default)",
    )
    hidden_files: Literal["error", "skip"] = Field(
        description="files or folders starting with '.' under data/: refuse, or skip with a warning"
    )
    # 4 on the digits example: the largest group is 8 near-identical 6s and no group spans two classes;
    # at 6 chaining glues 45 images into one group and the first two-class group appears.
    near_duplicate_distance: StrictInt = Field(
        ge=0, le=64, description="max Hamming distance of 64-bit perceptual hashes for near duplicates"
    )
    window: Literal["range", "percentiles"] | tuple[WindowEnd, WindowEnd] = Field(
        description="high-bit images: the type's full range, the train split's percentiles, or [low, high]"
    )
    window_percentiles: tuple[Percentile, Percentile] = Field(
        description="train split percentiles `window: percentiles` maps to 0 and 255"
    )
    window_sample: StrictInt = Field(
        ge=1, le=100_000, description="train images the percentiles are measured on"
    )

    @model_validator(mode="after")
    def _window_rises(self) -> Self:
        for key in ("window", "window_percentiles"):
            value = getattr(self, key)
            if isinstance(value, tuple) and not value[0] < value[1]:
                raise ValueError(f"data.{key} {list(value)}: low must be below high")
        return self


Severity = Literal["error", "warning", "off"]


class Severities(Section):
    """Per check of `cnnops validate`: error stops the pipeline, warning is reported, off skips it."""

    decodes: Severity
    format: Severity
    mode: Severity
    size: Severity
    min_classes: Severity
    min_images_per_class: Severity
    imbalance: Severity
    label_conflict: Severity
    exact_duplicates: Severity
    near_duplicates: Severity


def _pillow_names() -> dict[str, set[str]]:
    """Format and mode names Pillow knows, so a typo in allowed_* is an error, not a silent no-match."""
    from PIL import Image, ImageMode

    Image.init()
    candidates = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                  "LAB", "HSV", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # fmt: skip
    modes = {m for m in candidates if ImageMode.getmode(m)}
    return {"allowed_formats": set(Image.OPEN), "allowed_modes": modes}


class ValidateParams(Section):
    allowed_formats: tuple[str, ...] = Field(description="Pillow format names accepted")
    allowed_modes: tuple[str, ...] = Field(
        description="Pillow modes accepted (as stored in the file)",
    )
    # a side is at most max_image_pixels long: a longer image is refused as a bomb before it is measured
    min_width: StrictInt = Field(ge=1, le=MAX_IMAGE_PIXELS)
    min_height: StrictInt = Field(ge=1, le=MAX_IMAGE_PIXELS)
    max_width: StrictInt = Field(ge=1, le=MAX_IMAGE_PIXELS)
    max_height: StrictInt = Field(ge=1, le=MAX_IMAGE_PIXELS)
    min_classes: StrictInt = Field(ge=2, le=MAX_CLASSES)
    min_images_per_class: StrictInt = Field(ge=1, le=1_000_000, description="ImageNet has ~1,300 a class")
    max_imbalance_ratio: StrictFloat = Field(
        ge=1.0, le=1e6, description="largest class count / smallest; severity.imbalance: off skips the check"
    )
    severity: Severities

    @field_validator("allowed_formats", "allowed_modes")
    @classmethod
    def _pillow_name(cls, names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = _pillow_names()[str(info.field_name)]
        for name in names:
            if name not in known:
                raise ValueError(f"{name!r} is not a Pillow name{_suggest(name, known)}")
        return names

    @model_validator(mode="after")
    def _ordered_bounds(self) -> ValidateParams:
        for side in ("width", "height"):
            low, high = getattr(self, f"min_{side}"), getattr(self, f"max_{side}")
            if low > high:
                raise ValueError(f"min_{side} {low} is larger than max_{side} {high}")
        return self


class PrepareParams(Section):
    image_size: ImageSize = Field(description="[height, width] of the cached tensors")
    val_fraction: StrictFloat = Field(gt=0.0, lt=0.5)
    test_fraction: StrictFloat = Field(gt=0.0, lt=0.5)


class AugmentParams(Section):
    random_resized_crop: StrictBool
    crop_scale: tuple[StrictFloat, StrictFloat]
    horizontal_flip: StrictFloat = Field(ge=0.0, le=1.0, description="probability")
    vertical_flip: StrictFloat = Field(ge=0.0, le=1.0, description="probability")
    color_jitter: StrictFloat = Field(ge=0.0, le=1.0, description="brightness/contrast/saturation strength")
    randaugment: StrictBool
    randaugment_magnitude: StrictInt = Field(ge=0, le=30)
    # Beta(10, 10) already mixes about half-and-half every time; the papers use 0.2 to 1
    mixup_alpha: StrictFloat = Field(ge=0.0, le=10.0)
    cutmix_alpha: StrictFloat = Field(ge=0.0, le=10.0)
    random_rotation: StrictFloat = Field(ge=0.0, le=180.0, description="max degrees")

    @model_validator(mode="after")
    def _crop_scale_range(self) -> AugmentParams:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must be [min, max], 0 < min <= max <= 1")
        return self


_BATCH = TypeAdapter(Annotated[StrictInt, Field(ge=1, le=MAX_BATCH, strict=True)])


class TrainParams(Section):
    model: str = Field(description="'convnet', 'mlp' or any torchvision classification model name")
    mode: Literal["scratch", "linear_probe", "finetune"]
    weights: str | None = Field(description="torchvision weights enum name, e.g. DEFAULT or IMAGENET1K_V1")
    epochs: StrictInt = Field(ge=1, le=MAX_EPOCHS)
    batch_size: StrictInt | Literal["auto"] = Field(
        ge=1, le=MAX_BATCH, description="auto: the largest batch whose memory estimate fits the device"
    )
    auto_batch_max: StrictInt = Field(ge=1, le=MAX_BATCH, description="the most batch_size auto picks")
    memory_fraction: StrictFloat = Field(
        gt=0.0, le=1.0, description="share of the device's free memory the training estimate may fill"
    )
    optimizer: Literal["adamw", "sgd"]
    lr: StrictFloat = Field(gt=0.0, le=10.0, description="a peak above 10 diverges with AdamW and SGD alike")
    backbone_lr_scale: StrictFloat = Field(gt=0.0, le=1.0, description="finetune: backbone lr = lr * this")
    weight_decay: StrictFloat = Field(ge=0.0, le=1.0, description="at 1, decay takes the whole lr step")
    momentum: StrictFloat = Field(ge=0.0, lt=1.0)
    warmup_epochs: StrictInt = Field(ge=0, le=MAX_EPOCHS)
    label_smoothing: StrictFloat = Field(ge=0.0, lt=1.0)
    grad_clip: StrictFloat | None = Field(gt=0.0, description="max gradient norm; null turns clipping off")
    early_stopping_patience: StrictInt | None = Field(
        ge=1, le=MAX_EPOCHS, description="epochs without improvement"
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(description="autocast on CUDA; off on CPU")
    channels_last: StrictBool = Field(description="channels_last memory format on CUDA")
    num_workers: int | Literal["auto"] = Field(
        description="DataLoader worker processes; auto: one per core but one, at most 8"
    )
    input_size: ImageSize | None = Field(
        description="[height, width] of the network's input; null: the prepared size (prepare.image_size)"
    )
    precise_bn: Literal["auto", "on", "off"] = Field(
        description="recompute BatchNorm statistics before validation"
    )
    precise_bn_images: StrictInt = Field(ge=1, le=100_000, description="train images of the precise-BN pass")
    class_weighting: Literal["none", "inverse_frequency", "sampler"] = Field(
        description="cross-entropy class weights (none, inverse class frequency in the train split), or a "
        "weighted sampler drawing every class about equally often"
    )
    select_by: Literal["val_accuracy", "val_balanced_accuracy", "val_macro_f1"] = Field(
        description="validation figure that picks the best epoch (and drives early stopping)"
    )
    augment: AugmentParams

    @field_validator("batch_size", mode="wrap")
    @classmethod
    def _batch(cls, value: Any, handler: Any) -> Any:
        """auto, or an int in bounds with pydantic's own message (a union would report each branch)."""
        if value == "auto":
            return value
        try:
            return _BATCH.validate_python(value)
        except ValidationError as exc:
            error = exc.errors()[0]
            text = "Input should be auto or a valid integer" if isinstance(value, str) else error["msg"]
            raise PydanticCustomError(error["type"], text) from None

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        """One message for both forms (pydantic would report each branch of the union apart)."""
        if value == "auto" or (type(value) is int and 0 <= value <= MAX_WORKERS):
            return value
        raise ValueError(f"use auto or a whole number from 0 to {MAX_WORKERS}")

    @model_validator(mode="after")
    def _weights_need_mode(self) -> TrainParams:
        if self.mode != "scratch" and self.weights is None:
            raise ValueError(f"mode {self.mode!r} needs pretrained weights: set train.weights (e.g. DEFAULT)")
        if self.mode == "scratch" and self.weights is not None:
            raise ValueError(
                f"mode 'scratch' trains from random weights but train.weights is {self.weights!r}: "
                "set train.weights: null, or train.mode: finetune (or linear_probe)"
            )
        return self


class EvaluateParams(Section):
    top_k: StrictInt = Field(ge=1, le=MAX_CLASSES)
    ece_bins: StrictInt = Field(ge=2, le=1000, description="more leave most bins empty on any test split")
    bootstrap_resamples: StrictInt = Field(
        ge=100, le=100_000, description="resamples of the test split behind each confidence interval"
    )
    confidence: StrictFloat = Field(ge=0.5, le=0.999, description="coverage of the bootstrap intervals")
    worst_groups: StrictInt = Field(
        ge=1, le=10_000, description="groups (data/groups.csv) listed by name in the per-group report"
    )


AuditSeverity = Literal["error", "warning", "off", "auto"]


class AuditSeverities(Section):
    """Per test family of `cnnops audit`: error fails the audit, warning only reports, off skips it;
    auto is error on single-channel images and warning on RGB ones (docs/audit.md says why)."""

    place: AuditSeverity
    tone: AuditSeverity
    property: AuditSeverity
    deletion: AuditSeverity
    masks: AuditSeverity


class AuditParams(Section):
    methods: tuple[Literal["gradcam", "gradcam++", "scorecam", "ablationcam", "occlusion"], ...] = Field(
        min_length=1,
        description="saliency methods; the first drives the evidence, the others are compared with it",
    )
    target_layer: str | None = Field(description="dotted module path in the network; null finds it")
    batch_size: StrictInt = Field(ge=1, le=MAX_BATCH)
    max_images_per_class: StrictInt = Field(
        ge=1, le=100_000, description="images audited per class (and recipients); each costs many passes"
    )
    seed: StrictInt = Field(ge=0, lt=SEED_LIMIT)
    top_fraction: StrictFloat = Field(gt=0.0, lt=1.0, description="share of pixels called most-attended")
    border_fraction: StrictFloat = Field(
        gt=0.0, lt=0.5, description="width of the outer band (share of side)"
    )
    corner_fraction: StrictFloat = Field(
        gt=0.0, le=0.5, description="side of each corner region (share of side)"
    )
    edge_fractions: tuple[Annotated[StrictFloat, Field(gt=0.0, le=0.25)], ...] = Field(
        max_length=8, description="depths of the edge strips transplanted (share of the side across them)"
    )
    centre_fraction: StrictFloat = Field(
        gt=0.0, lt=1.0, description="side of the centre region (share of side)"
    )
    grids: tuple[Annotated[StrictInt, Field(ge=2, le=8)], ...] = Field(
        max_length=4, description="coarse grids whose cells are transplanted"
    )
    occlusion_patch: StrictFloat = Field(
        gt=0.0, le=0.5, description="occluding square's side (share of side) when the CAM is 4x4 or coarser"
    )
    discovery_max_patches: StrictInt = Field(ge=0, le=20, description="recurring patches a class tested")
    discovery_min_support: StrictFloat = Field(
        gt=0.0, le=1.0, description="share of a class's images a recurring patch must appear in"
    )
    discovery_distance: StrictFloat = Field(
        gt=0.0, le=2.0, description="cosine distance under which two patch descriptions join one cluster"
    )
    transplant_flip_threshold: StrictFloat = Field(gt=0.0, le=1.0, description="flip rate minus control")
    significance: StrictFloat = Field(
        gt=0.0, le=1.0, description="one-sided Fisher exact p-value a transplant's flips must reach"
    )
    deletion_gap_threshold: StrictFloat = Field(gt=0.0, le=1.0, description="drop(top) minus drop(random)")
    mask_inside_threshold: StrictFloat = Field(
        gt=0.0, le=1.0, description="min share of the most-attended pixels inside the masks"
    )
    property_f1_threshold: StrictFloat = Field(gt=0.0, le=1.0, description="probe F1 that raises a warning")
    gallery_images_per_class: StrictInt = Field(ge=1, le=1000, description="overlays a class on one page")
    property_auroc: StrictFloat = Field(
        gt=0.5, le=1.0, description="one-vs-rest AUROC (or 1 minus it) that flags an image property"
    )
    property_permutations: StrictInt = Field(
        ge=99, le=100_000, description="label permutations of each property's AUROC p-value"
    )
    severity: AuditSeverities


class ExportParams(Section):
    opset: StrictInt = Field(ge=11, le=23)
    parity_atol: StrictFloat = Field(
        gt=0.0,
        lt=1.0,
        description="max abs difference of ORT from PyTorch on test, as probabilities (1 checks nothing)",
    )
    latency_runs: StrictInt = Field(ge=5, le=MAX_RUNS, description="timed batch-1 runs per engine")
    throughput_batch: StrictInt = Field(
        ge=1, le=MAX_BATCH, description="batch of the images/s figures and the parity run"
    )
    output: Literal["logits", "probabilities"] = Field(
        description="graph output; probabilities appends a softmax"
    )
    compression: Literal["none", "int8_static", "int8", "fp16"] = Field(
        description="also write an ORT static-INT8 (QDQ), dynamic-INT8 or FP16 copy, timed against fp32"
    )
    max_accuracy_drop: StrictFloat = Field(
        ge=0.0, le=1.0, description="a compressed copy losing more test accuracy than this is refused"
    )
    calibration_images: StrictInt = Field(
        ge=1, le=MAX_RUNS * 100, description="train images that calibrate static INT8's activation ranges"
    )


class CureParams(Section):
    enabled: StrictBool = Field(description="run the cure when the audit failed; off: a skipped report")
    rate: StrictFloat = Field(
        gt=0.0, le=1.0, description="share of training images each finding's counterfactual changes"
    )
    epochs: StrictInt = Field(ge=1, le=10_000, description="most epochs of the cured model's training")
    mode: Literal["retrain", "finetune", "head"] = Field(
        description="a new model from scratch; the failed model, every layer trained on; or its head only "
        "(backbone frozen)"
    )
    rounds: StrictInt = Field(
        ge=1, le=5, description="most cure rounds: a failing re-audit's findings call for the next one"
    )


class ReleaseParams(Section):
    model_name: str = Field(min_length=1, description="MLflow registered model name")
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1"]
    margin: StrictFloat = Field(
        ge=0.0,
        lt=1.0,
        description="the challenger must beat the champion by more than this (the metrics are 0 to 1)",
    )
    min_score: StrictFloat = Field(ge=0.0, le=1.0, description="a model scoring below this is never champion")
    significance: StrictFloat = Field(
        gt=0.0,
        lt=1.0,
        description="one-sided exact p-value the model must reach against the majority-class baseline "
        "and, in McNemar's test, against the champion",
    )


class OrchestrateParams(Section):
    incoming: str | None = Field(
        description="folder (relative to the workspace) whose <class>/<image> files retrain adds to data/",
    )
    schedule: str = Field(
        description="cron schedule of the retrain deployment (checked by Prefect when deploying)"
    )
    timezone: str = Field(description="IANA time zone of the schedule")
    notify_webhook: str | None = Field(
        pattern=r"^https?://", description="URL posted to (JSON) on failure or a new champion"
    )
    notify_block: str | None = Field(
        pattern=r"^[a-z0-9-]+/[^/]+$",
        description="Prefect notification block as <block-type-slug>/<name>, e.g. slack-webhook/ops",
    )
    git_commit: StrictBool = Field(description="commit data.dvc and dvc.lock to git_branch after a retrain")
    git_branch: str = Field(min_length=1)
    retries: StrictInt = Field(
        ge=0, le=10, description="retries of a stage that failed for a transient reason (10: 1023 delays)"
    )
    retry_delay: StrictFloat = Field(
        ge=0.0, le=3600.0, description="seconds before the first retry (at most an hour); doubles each retry"
    )
    lock_timeout: StrictFloat = Field(
        ge=0.0,
        le=86_400.0,
        description="seconds (a day at most) a run waits for the workspace to be free; 0 refuses at once",
    )
    stage_timeout: StrictFloat = Field(
        gt=0.0,
        le=7 * 86_400.0,
        description="seconds (a week at most) a stage or `dvc add` may run before the flow stops it",
    )
    on_bad_incoming: Literal["fail", "skip"] = Field(
        description="an incoming file that fails its checks fails the retrain (nothing merged), or stays "
        "in the incoming folder while the good ones are merged"
    )
    max_drift: StrictFloat = Field(
        ge=0.0,
        le=100.0,
        description="largest KL divergence (nats) of any image property of an incoming batch from the "
        "training data's before retrain refuses the batch",
    )
    auto_cure: StrictBool = Field(
        description="run the cure stage on a failed audit (as cure.enabled does) and announce its "
        "before/after table from the retrain flow"
    )


class Params(Section):
    base: BaseParams
    tracking: TrackingParams
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    prepare: PrepareParams
    train: TrainParams
    evaluate: EvaluateParams
    audit: AuditParams
    cure: CureParams
    export: ExportParams
    release: ReleaseParams
    orchestrate: OrchestrateParams

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @cached_property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        """`validate` is a pydantic method name, so the section is stored as `validate_`."""
        return self.validate_


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_type(field: FieldInfo | None) -> type[BaseModel] | None:
    """The section model a field holds, or None for a plain value."""
    annotation = field.annotation if field is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The section model that owns the key at `loc`, for close-match suggestions."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        inner = _section_type(field)
        if inner is None:
            break
        model = inner
    return model


def _defaults_of(section: type[BaseModel]) -> dict[str, Any]:
    """The shipped defaults of one section, found where the schema nests it under Params."""
    todo: list[tuple[type[BaseModel], dict[str, Any]]] = [(Params, _shipped_defaults())]
    while todo:
        model, raw = todo.pop()
        if model is section:
            return raw
        for name, field in model.model_fields.items():
            inner = _section_type(field)
            if inner is not None:
                todo.append((inner, raw[field.alias or name]))
    raise TypeError(f"{section.__name__} is not a section of Params")


def _format(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        valid = [f.alias or n for n, f in model.model_fields.items()]
        hint = _suggest(str(loc[-1]), valid)
        return f"{source}: unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}"
    value = error.get("input")
    return f"{source}: '{key}' = {value!r} is not allowed: {error['msg']}{_allowed(loc)}{_text_hint(error)}"


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _allowed(loc: tuple[Any, ...]) -> str:
    """The key's whole range, for every error on it: pydantic names only the bound that was crossed."""
    fields = _model_at(loc).model_fields.items()
    field = next((f for n, f in fields if loc and (f.alias or n) == loc[-1]), None)
    bounds = [
        f"{sign} {getattr(rule, name)}"
        for rule in (field.metadata if field is not None else [])
        for name, sign in _BOUNDS.items()
        if getattr(rule, name, None) is not None
    ]
    return f" (allowed: {' and '.join(bounds)})" if bounds else ""


def _text_hint(error: dict[str, Any]) -> str:
    """A quoted number is text, refused like any text where a number goes: say so, as it looks right."""
    value = error.get("input")
    if error["type"] not in ("int_type", "float_type") or not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return "; it is quoted, so YAML reads it as text: write the number without quotes"


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-5 as a float as YAML 1.2 does: PyYAML's YAML 1.1 wants 1.0e-5
    and gives text, yet `dvc exp run -S train.lr=1e-5` writes 1e-05 (DVC reads YAML 1.2)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ParamsLoader)  # a SafeLoader: plain values only, never objects


@cache
def _shipped_defaults() -> dict[str, Any]:
    """params.yaml as shipped in the package: the only place a default value is written."""
    return _read_yaml(resources.files("cnnops").joinpath(SHIPPED_PARAMS).read_text())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, mapping into mapping (any other value replaces); both stay unchanged."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_mappings else copy.deepcopy(value)
    return merged


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping merged over the shipped defaults, so it needs only the keys it changes;
    every problem is reported at once, each naming its key path."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(deep_merge(_shipped_defaults(), raw or {}))
    except ValidationError as exc:
        lines = [_format(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file (over the shipped defaults, as `parse_params`).

    A missing file is an error, not the defaults: run outside the project, a command would
    otherwise quietly use values its project never chose."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file; run from the project root or pass --params PATH")
    try:
        raw = _read_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
