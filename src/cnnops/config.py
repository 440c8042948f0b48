"""params.yaml: one schema, validated once at load time.

Every section is a frozen pydantic model that forbids unknown keys, so a typo is an error that
names the key path and suggests the closest valid key instead of a knob silently ignored.
Stages receive their typed section, never a dict.
"""

from __future__ import annotations

import difflib
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cnnops.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    """Base of every params section: frozen, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseParams(Section):
    seed: int = Field(0, ge=0, description="seed for splits, initialisation and augmentation")


class TrackingParams(Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set",
    )
    artifact_location: str = Field(
        "mlartifacts", description="artifact folder for a new experiment on a local store (relative to cwd)"
    )
    experiment: str = Field("cnnops", min_length=1, description="MLflow experiment name")

    @property
    def resolved_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.uri


class DataParams(Section):
    color_mode: Literal["RGB", "L"] = Field("RGB", description="colour mode every image is converted to")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="larger images are refused as decompression bombs (Pillow's default)"
    )
    hidden_files: Literal["error", "skip"] = Field(
        "skip", description="files or folders starting with '.' under data/: refuse, or skip with a warning"
    )
    # 4 on the digits example: the largest group is 8 near-identical 6s and no group spans two classes;
    # at 6 chaining glues 45 images into one group and the first two-class group appears.
    near_duplicate_distance: int = Field(
        4, ge=0, le=64, description="max Hamming distance of 64-bit perceptual hashes for near duplicates"
    )


Severity = Literal["error", "warning", "off"]


class Severities(Section):
    """Per check of `cnnops validate`: error stops the pipeline, warning is reported, off skips it."""

    decodes: Severity = "error"
    format: Severity = "error"
    mode: Severity = "error"
    size: Severity = "error"
    min_classes: Severity = "error"
    min_images_per_class: Severity = "error"
    imbalance: Severity = "warning"
    label_conflict: Severity = "error"
    exact_duplicates: Severity = "warning"
    near_duplicates: Severity = "warning"


def _pillow_names() -> dict[str, set[str]]:
    """Format and mode names Pillow knows, so a typo in allowed_* is an error, not a silent no-match."""
    from PIL import Image, ImageMode

    Image.init()
    candidates = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                  "LAB", "HSV", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # fmt: skip
    modes = {m for m in candidates if ImageMode.getmode(m)}
    return {"allowed_formats": set(Image.OPEN), "allowed_modes": modes}


class ValidateParams(Section):
    allowed_formats: tuple[str, ...] = Field(
        ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"), description="Pillow format names accepted"
    )
    allowed_modes: tuple[str, ...] = Field(
        ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I;16B", "I", "F"),
        description="Pillow modes accepted (as stored in the file)",
    )
    min_width: int = Field(8, ge=1)
    min_height: int = Field(8, ge=1)
    max_width: int = Field(10_000, ge=1)
    max_height: int = Field(10_000, ge=1)
    min_classes: int = Field(2, ge=2)
    min_images_per_class: int = Field(10, ge=1)
    max_imbalance_ratio: float = Field(10.0, ge=1.0, description="largest class count / smallest")
    severity: Severities = Severities()

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
    image_size: tuple[int, int] = Field((32, 32), description="[height, width] of the cached tensors")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5)

    @model_validator(mode="after")
    def _positive_size(self) -> PrepareParams:
        if min(self.image_size) < 8:
            raise ValueError(f"image_size {list(self.image_size)} is too small: each side must be >= 8")
        return self


class AugmentParams(Section):
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)
    horizontal_flip: float = Field(0.0, ge=0.0, le=1.0, description="probability")
    vertical_flip: float = Field(0.0, ge=0.0, le=1.0, description="probability")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="brightness/contrast/saturation strength")
    randaugment: bool = False
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    random_rotation: float = Field(0.0, ge=0.0, le=180.0, description="max degrees")

    @model_validator(mode="after")
    def _crop_scale_range(self) -> AugmentParams:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must be [min, max], 0 < min <= max <= 1")
        return self


class TrainParams(Section):
    model: str = Field("convnet", description="'convnet' or any torchvision classification model name")
    mode: Literal["scratch", "linear_probe", "finetune"] = "scratch"
    weights: str | None = Field(
        None, description="torchvision weights enum name, e.g. DEFAULT or IMAGENET1K_V1"
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    backbone_lr_scale: float = Field(0.1, gt=0.0, le=1.0, description="finetune: backbone lr = lr * this")
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; null turns clipping off")
    early_stopping_patience: int | None = Field(None, ge=1, description="epochs without improvement")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="autocast on CUDA; off on CPU")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    num_workers: int = Field(0, ge=0)
    augment: AugmentParams = AugmentParams()

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
    top_k: int = Field(3, ge=1)
    ece_bins: int = Field(15, ge=2)


class AuditParams(Section):
    methods: tuple[Literal["gradcam", "gradcam++", "scorecam"], ...] = Field(
        ("gradcam", "scorecam"),
        min_length=1,
        description="saliency methods; the first drives the evidence, the others are compared with it",
    )
    target_layer: str | None = Field(None, description="dotted module path in the network; null finds it")
    batch_size: int = Field(64, ge=1)
    max_images_per_class: int = Field(100, ge=1, description="images audited per class (and recipients)")
    seed: int = Field(0, ge=0)
    top_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="share of pixels called most-attended")
    border_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="width of the outer band (share of side)")
    corner_fraction: float = Field(
        0.3, gt=0.0, le=0.5, description="side of each corner region (share of side)"
    )
    transplant_flip_threshold: float = Field(0.2, gt=0.0, le=1.0, description="flip rate minus control")
    significance: float = Field(
        0.05, gt=0.0, le=1.0, description="one-sided Fisher exact p-value a transplant's flips must reach"
    )
    deletion_gap_threshold: float = Field(0.25, gt=0.0, le=1.0, description="drop(top) minus drop(random)")
    mask_inside_threshold: float = Field(
        0.3, gt=0.0, le=1.0, description="min share of the most-attended pixels inside the masks"
    )
    property_f1_threshold: float = Field(0.9, gt=0.0, le=1.0, description="probe F1 that raises a warning")
    gallery_images_per_class: int = Field(8, ge=1)


class ExportParams(Section):
    opset: int = Field(18, ge=11, le=23)
    parity_atol: float = Field(1e-4, gt=0.0, description="max abs difference of ORT from PyTorch on test")
    latency_runs: int = Field(50, ge=5, description="timed batch-1 runs per engine")
    throughput_batch: int = Field(32, ge=1, description="batch of the images/s figures and the parity run")
    output: Literal["logits", "probabilities"] = Field(
        "logits", description="graph output; probabilities appends a softmax"
    )
    compression: Literal["none", "int8", "fp16"] = Field(
        "none", description="also write an ORT dynamic-INT8 or FP16 copy and report its accuracy change"
    )


class ReleaseParams(Section):
    model_name: str = Field("cnnops-classifier", min_length=1, description="MLflow registered model name")
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1"] = "accuracy"
    margin: float = Field(0.0, ge=0.0, description="the challenger must beat the champion by more than this")


class OrchestrateParams(Section):
    incoming: str | None = Field(
        None,
        description="folder (relative to the workspace) whose <class>/<image> files retrain adds to data/",
    )
    schedule: str = Field(
        "0 3 * * *", description="cron schedule of the retrain deployment (checked by Prefect when deploying)"
    )
    timezone: str = Field("UTC", description="IANA time zone of the schedule")
    notify_webhook: str | None = Field(
        None, pattern=r"^https?://", description="URL posted to (JSON) on failure or a new champion"
    )
    notify_block: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+/[^/]+$",
        description="Prefect notification block as <block-type-slug>/<name>, e.g. slack-webhook/ops",
    )
    git_commit: bool = Field(False, description="commit data.dvc and dvc.lock to git_branch after a retrain")
    git_branch: str = Field("cnnops/retrain", min_length=1)
    retries: int = Field(2, ge=0, description="retries of a stage that failed for a transient reason")
    retry_delay: float = Field(10.0, ge=0.0, description="seconds before the first retry; doubles each retry")
    lock_timeout: float = Field(
        0.0, ge=0.0, description="seconds a run waits for another to free the workspace; 0 refuses at once"
    )


class Params(Section):
    base: BaseParams = BaseParams()
    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    audit: AuditParams = AuditParams()
    export: ExportParams = ExportParams()
    release: ReleaseParams = ReleaseParams()
    orchestrate: OrchestrateParams = OrchestrateParams()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @cached_property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        """`validate` is a pydantic method name, so the section is stored as `validate_`."""
        return self.validate_


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The section model that owns the key at `loc`, for close-match suggestions."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            break
        model = field.annotation
    return model


def _format(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        valid = [f.alias or n for n, f in model.model_fields.items()]
        hint = _suggest(str(loc[-1]), valid)
        return f"{source}: unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}"
    value = error.get("input")
    return f"{source}: '{key}' = {value!r} is not allowed: {error['msg']}"


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; every problem is reported at once, each naming its key path."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = [_format(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; a missing file means the embedded defaults."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
