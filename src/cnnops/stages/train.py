"""`cnnops train`: train or fine-tune the classifier on the prepared splits, recorded in MLflow.

The stage wires the parts together: model factory (models), presets (transforms), loops (engine),
optimizer and schedule (optim), per-epoch resume state (resume), ranks (distributed) and the
MLflow run (tracking, rank 0 only). Outputs: the best checkpoint, reports/train.json with the run
id, and the per-epoch history that DVC plots.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from cnnops import atomic
from cnnops.config import Params, TrainParams
from cnnops.data.loaders import SplitDataset, eval_loader, resolve_workers, train_loader
from cnnops.data.splits import PreparedSplit, load_splits, split_files
from cnnops.data.transforms import EvalPreset, TrainPreset, get_mixup_cutmix
from cnnops.errors import StageInputError
from cnnops.models import Classifier, ModelSpec, create_classifier, default_spec, save_checkpoint
from cnnops.progress import progress_bar
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import distributed, features, plots, resume
from cnnops.training import summary as table
from cnnops.training.counterfactual import Counterfactual
from cnnops.training.engine import (
    BatchTransform,
    BestEpoch,
    EpochStats,
    LoopSettings,
    evaluate_epoch,
    recalibrate_batchnorm,
    train_one_epoch,
)
from cnnops.training.metrics import class_weights, sampling_weights, selection_score
from cnnops.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# train.precise_bn: auto recalibrates runs shorter than this: after 100 steps the momentum-0.1
# averages keep 0.9**100 (3e-5) of their initial values; after 27 they kept 6%, and a ResNet-18's
# validation accuracy was 0.40 against 0.89 recalibrated (tests/test_train.py)
PRECISE_BN_AUTO_STEPS = 100
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@dataclass(frozen=True)
class TrainPaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    prepared: Path = path_arg("prepared", "prepare's output folder ({train,val}.pt)", POSITIONAL)
    model: Path = path_arg("models/model.pt", "best checkpoint", "--out")
    report: Path = path_arg("reports/train.json", "report with the MLflow run id")
    history: Path = path_arg("reports/plots/train_history.csv", "per-epoch CSV")
    curves: Path = path_arg("reports/plots/train_history.png", "training curves PNG")
    # resume state: outside DVC outs, which DVC deletes before running the stage
    state: Path = path_arg(".cnnops/train/state.pt", "resume state")
    params_file: Path | None = None  # logged to the run as params.yaml (the CLI's --params)
    summary: Path | None = path_arg(
        None, "per-layer summary and memory estimate; none: model_summary.md beside --report"
    )

    @property
    def summary_file(self) -> Path:
        return self.summary or self.report.parent / "model_summary.md"


@dataclass(frozen=True)
class TrainResult:
    run_id: str | None  # None on ranks other than 0
    report: dict[str, Any]
    history: list[dict[str, float]]


@dataclass(frozen=True)
class Retraining:
    """What `cure` changes in a run: counterfactual training batches and, for a head-only or
    fine-tuning cure, the failed model to start from (`head_only`: its backbone frozen)."""

    counterfactual: Counterfactual
    start_from: Classifier | None = None
    head_only: bool = False


def run(
    params: Params, paths: TrainPaths = TrainPaths(), retraining: Retraining | None = None
) -> TrainResult:
    """Train `params.train.model` on `<paths.prepared>/{train,val}.pt`; resumes a killed run of the
    same inputs. `retraining`: the cure's changes (`cnnops.stages.cure`)."""
    dist = distributed.setup()
    try:
        return _train(params, paths, dist, retraining)
    finally:
        distributed.teardown(dist)


@dataclass
class _Parts:
    """Everything the loop needs, built from params and data (the state dicts are what resume restores)."""

    model: Classifier
    settings: LoopSettings
    loader: DataLoader
    val_loader: DataLoader
    bn_loader: DataLoader | None  # train images for precise BN before each validation (None: off)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mix: BatchTransform | None
    summary: table.ModelSummary  # the pre-flight's: what the network costs an image
    memory: table.TrainingMemory  # at the batch size trained with

    def state_dict(self) -> dict[str, Any]:
        return {
            name: getattr(self, name).state_dict() for name in ("model", "optimizer", "scheduler", "scaler")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("model", "optimizer", "scheduler", "scaler"):
            getattr(self, name).load_state_dict(state[name])


def _build(
    params: Params,
    train_split: PreparedSplit,
    val_split: PreparedSplit,
    dist: distributed.Dist,
    retraining: Retraining | None,
) -> _Parts:
    t = params.train
    torch.manual_seed(params.base.seed)
    spec = _spec(t, train_split)
    model = create_classifier(spec, t.weights, check_input=True)
    start_from = retraining.start_from if retraining is not None else None
    if start_from is not None:
        model.load_state_dict(start_from.state_dict())
    if t.mode == "linear_probe" or (retraining is not None and retraining.head_only):
        model.freeze_backbone()
    settings = _loop_settings(t, dist.device)
    summary, memory = _preflight(t, model, len(train_split), dist)
    model.to(
        dist.device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format
    )
    collate = retraining.counterfactual.collate if retraining is not None else None
    loader, val_loader, bn_loader = _loaders(
        params, spec, train_split, val_split, dist, memory.batch_size, collate
    )
    optimizer = build_optimizer(
        model,
        name=t.optimizer,
        lr=t.lr,
        backbone_lr=t.lr * t.backbone_lr_scale if t.mode == "finetune" else t.lr,
        weight_decay=t.weight_decay,
        momentum=t.momentum,
    )
    steps = len(loader)
    return _Parts(
        model=model,
        settings=settings,
        loader=loader,
        val_loader=val_loader,
        bn_loader=bn_loader if _precise_bn(t, model, t.epochs * steps) else None,
        optimizer=optimizer,
        scheduler=build_scheduler(
            optimizer, warmup_steps=t.warmup_epochs * steps, total_steps=t.epochs * steps
        ),
        scaler=torch.amp.GradScaler(dist.device.type, enabled=settings.amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(
            weight=class_weights(t.class_weighting, train_split.labels, spec.num_classes, dist.device),
            label_smoothing=t.label_smoothing,
        ),
        mix=get_mixup_cutmix(
            mixup_alpha=t.augment.mixup_alpha,
            cutmix_alpha=t.augment.cutmix_alpha,
            num_classes=spec.num_classes,
        ),
        summary=summary,
        memory=memory,
    )


def _preflight(
    t: TrainParams, model: Classifier, n_train: int, dist: distributed.Dist
) -> tuple[table.ModelSummary, table.TrainingMemory]:
    """Before the first step: the model's summary and the batch to train with. `train.batch_size:
    auto` picks the largest whose estimated memory fits the device; a given one that does not fit
    stops a GPU run here, not with out-of-memory an hour in (on CPU it warns)."""
    summary = table.summarize(model)
    auto = t.batch_size == "auto"
    precision = table.configured_precision(t.amp, dist.device)
    memory = table.training_memory(summary, 1 if auto else t.batch_size, precision, t.optimizer, t.momentum)
    budget = table.device_budget(dist.device, t.memory_fraction)
    cap = min(t.auto_batch_max, max(1, n_train // dist.world_size))
    batch = table.fit_batch(summary, memory, budget, auto=auto, cap=cap)
    return summary, memory.at(distributed.all_reduce_min(batch, dist))  # every rank steps alike


def _spec(t: TrainParams, split: PreparedSplit) -> ModelSpec:
    """The model's spec: its input is `train.input_size`, cropped from the stored images when smaller."""
    stored = split.image_size
    size = tuple(t.input_size) if t.input_size is not None else stored
    if size[0] > stored[0] or size[1] > stored[1]:
        raise StageInputError(
            f"train.input_size {list(size)} is larger than the prepared images {list(stored)}: a crop cannot "
            "grow an image; raise prepare.image_size (and re-run prepare) or lower train.input_size"
        )
    spec = default_spec(t.model, split.class_names, split.color_mode, size, t.weights)
    spec = replace(spec, window=split.window)  # predict decodes through the window prepare used
    return replace(spec, stored_size=stored) if size != stored else spec


def _loaders(
    params: Params,
    spec: ModelSpec,
    train_split: PreparedSplit,
    val_split: PreparedSplit,
    dist: distributed.Dist,
    batch_size: int,
    collate: Callable[[list], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Training batches (augmented, seeded; `collate`: the cure's counterfactuals), validation
    batches, and the precise-BN sample: a fixed seeded subset of the train split, un-augmented as at
    inference, whose statistics BN should hold."""
    t = params.train
    workers, pin = resolve_workers(t.num_workers), dist.device.type == "cuda"
    loader = train_loader(
        SplitDataset(train_split, TrainPreset(t.augment, spec.image_size, spec.color_mode)),
        batch_size=batch_size,
        seed=params.base.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=workers,
        pin_memory=pin,
        weights=sampling_weights(t.class_weighting, train_split.labels, spec.num_classes),
        collate_fn=collate,
    )
    val_loader = eval_loader(
        SplitDataset(val_split, EvalPreset(spec.image_size)),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin,
    )
    sample = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(params.base.seed))
    bn_images = Subset(
        SplitDataset(train_split, EvalPreset(spec.image_size)), sample[: t.precise_bn_images].tolist()
    )
    return loader, val_loader, eval_loader(bn_images, batch_size=batch_size, pin_memory=pin)


def _precise_bn(t: TrainParams, model: Classifier, total_steps: int) -> bool:
    """Whether BatchNorm statistics are recomputed before each validation (`train.precise_bn`)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if t.precise_bn == "off" or not has_bn:
        return False
    if model.frozen_backbone:
        if t.precise_bn == "on":
            log.warning(
                "train.precise_bn: on is skipped in linear_probe mode: the frozen backbone keeps its "
                "statistics"
            )
        return False
    return t.precise_bn == "on" or total_steps < PRECISE_BN_AUTO_STEPS


def _load_train_val(prepared: Path) -> tuple[PreparedSplit, PreparedSplit]:
    splits = load_splits(prepared, ("train", "val"))
    if splits["val"].class_names != splits["train"].class_names:
        raise StageInputError(f"{prepared}: train and val splits have different class names; rerun prepare")
    if len(splits["val"]) == 0:
        raise StageInputError(
            f"{split_files(prepared, 'val')[1]} has no images: best-checkpoint selection needs a validation "
            "split; raise prepare.val_fraction or add images, then rerun prepare"
        )
    return splits["train"], splits["val"]


@dataclass
class _Progress:
    """What a killed run resumes from: epochs done, their history, the best epoch and the run id."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    run_id: str | None = None
    seconds: float = 0.0

    def state(self) -> dict[str, Any]:
        """Its fields for the resume state, shallow (asdict would deep-copy the best weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _resume(
    params: Params, paths: TrainPaths, parts: _Parts, dist: distributed.Dist, retraining: Retraining | None
) -> tuple[str, _Progress, BestEpoch]:
    """The inputs' fingerprint, and the saved progress when a killed run of the same inputs left one."""
    cure = {} if retraining is None else {"cure": retraining.counterfactual.describe()}
    fingerprint = resume.fingerprint(
        {
            **cure,
            "train": params.train.model_dump(mode="json"),
            "seed": params.base.seed,
            "world_size": dist.world_size,
            "batch_size": parts.memory.batch_size,  # auto's pick may change with the device's free memory
            "tracking": [runs.store_uri(params.tracking), params.tracking.experiment],  # run to continue
        },
        [path for name in ("train", "val") for path in split_files(paths.prepared, name)],
    )
    saved = resume.load(paths.state, fingerprint)
    if saved is None:
        return fingerprint, _Progress(), BestEpoch(params.train.early_stopping_patience)
    parts.load_state_dict(saved)
    progress = _Progress(**{f.name: saved[f.name] for f in fields(_Progress)})
    log.info(
        "resuming %s after epoch %d of %d from %s",
        params.train.model,
        progress.epoch,
        params.train.epochs,
        paths.state,
    )
    return fingerprint, progress, BestEpoch(**saved["best"])


def _train(
    params: Params, paths: TrainPaths, dist: distributed.Dist, retraining: Retraining | None
) -> TrainResult:
    t = params.train
    parts = _build(params, *_load_train_val(paths.prepared), dist, retraining)
    fingerprint, progress, best = _resume(params, paths, parts, dist, retraining)
    model = parts.model
    net = DistributedDataParallel(model, device_ids=_device_ids(dist)) if dist.enabled else model
    with ExitStack() as stack:
        if dist.is_main:
            mlflow_run = stack.enter_context(
                runs.training_run(params.tracking, progress.run_id, f"{t.model}-{t.mode}")
            )
            if progress.run_id is None:
                runs.log_run_inputs(
                    params, model.spec.class_names, paths.params_file, runs.lineage_tags(stage="train")
                )
                runs.log_splits(paths.prepared, ("train", "val"))
            progress.run_id = mlflow_run.info.run_id
            _log_missed_epochs(progress)
            _log_summary(parts, paths.summary_file)
        for epoch in range(progress.epoch, 0 if best.should_stop else t.epochs):
            started = time.perf_counter()
            train_stats = _train_epoch(params, parts, net, epoch, dist)
            if dist.is_main:
                _end_epoch(parts, train_stats, epoch, progress, best, t.select_by)
                progress.seconds += time.perf_counter() - started
                state = {
                    **progress.state(),
                    **parts.state_dict(),
                    "best": asdict(best),
                    "fingerprint": fingerprint,
                }
                resume.save(paths.state, state)  # before logging: a kill in between re-logs on resume
                row = progress.history[-1]
                runs.log_epoch({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
                summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
                log.info("epoch %d/%d: %s", epoch + 1, t.epochs, summary)
            if distributed.broadcast_flag(best.should_stop, dist):
                break
        if not dist.is_main:
            return TrainResult(None, {}, [])
        bn_images = len(parts.bn_loader.dataset) if parts.bn_loader is not None else 0
        report = _finish(params, model, progress, best, paths, bn_images)
        _log_features(model, parts.val_loader.dataset.split)
    resume.clear(paths.state)
    return TrainResult(progress.run_id, report, progress.history)


def _train_epoch(
    params: Params, parts: _Parts, net: nn.Module, epoch: int, dist: distributed.Dist
) -> EpochStats:
    """One pass over the training split, seeded per (seed, epoch, rank) for augmentation and dropout."""
    parts.loader.sampler.set_epoch(epoch)
    torch.manual_seed(_epoch_seed(params.base.seed, epoch, dist.rank))
    label = f"epoch {epoch + 1}/{params.train.epochs}"
    with progress_bar(label, len(parts.loader), enabled=dist.is_main) as advance:
        return train_one_epoch(
            net,
            parts.criterion,
            parts.optimizer,
            parts.scheduler,
            parts.loader,
            parts.settings,
            scaler=parts.scaler,
            batch_transform=parts.mix,
            on_step=advance,
            reduce=lambda totals: distributed.all_reduce_sum(totals, dist),
        )


def _end_epoch(
    parts: _Parts, train_stats: EpochStats, epoch: int, progress: _Progress, best: BestEpoch, select_by: str
) -> None:
    """Validate, append the epoch's row to the history, keep the weights when it is the best so far
    by `train.select_by` (BestEpoch's val_accuracy holds that score; lower val loss breaks ties)."""
    if parts.bn_loader is not None:
        recalibrate_batchnorm(parts.model, parts.bn_loader, parts.settings)
    output = evaluate_epoch(parts.model, parts.val_loader, parts.settings)
    val = output.stats
    progress.history.append(
        {
            "epoch": epoch + 1,
            "train_loss": train_stats.loss,
            "train_accuracy": train_stats.accuracy,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "lr": parts.optimizer.param_groups[-1]["lr"],
        }
    )
    if best.update(epoch + 1, selection_score(select_by, output.logits, output.labels), val.loss):
        progress.best_state = {k: v.detach().cpu().clone() for k, v in parts.model.state_dict().items()}
    progress.epoch = epoch + 1


def _loop_settings(t: TrainParams, device: torch.device) -> LoopSettings:
    """AMP and channels_last only on CUDA; an explicit AMP request on CPU is refused with a warning."""
    if device.type != "cuda":
        if t.amp in ("bf16", "fp16"):
            log.warning("train.amp=%s needs CUDA: training in float32 on %s", t.amp, device)
        return LoopSettings(device, None, False, t.grad_clip)
    amp = table.AMP_DTYPES[table.configured_precision(t.amp, device)]
    return LoopSettings(device, amp, t.channels_last, t.grad_clip)


def _device_ids(dist: distributed.Dist) -> list[int] | None:
    return [dist.device.index] if dist.device.type == "cuda" else None


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed per (seed, epoch, rank): a resumed run draws exactly what the uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _log_summary(parts: _Parts, path: Path) -> None:
    """The pre-flight's table into reports/ and the run, its totals as the run's metrics."""
    atomic.write_text(path, table.render(parts.summary, parts.memory))
    runs.log_files([path], "train")
    runs.log_metrics(table.totals(parts.summary, parts.memory))


def _log_features(model: Classifier, val: PreparedSplit) -> None:
    """The best model's first-layer filters and a few validation images' feature maps, into the run."""
    found = features.split_pictures(model, val)
    if found is not None:
        with tempfile.TemporaryDirectory() as tmp:
            runs.log_files(features.save(found, Path(tmp)), "features")


def _log_missed_epochs(progress: _Progress) -> None:
    """A run killed between saving its state and logging an epoch logs that epoch on resume."""
    if not progress.history:
        return
    logged = runs.logged_steps(progress.run_id, "val_loss")
    for row in progress.history:
        if row["epoch"] not in logged:
            runs.log_epoch({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])


def _finish(
    params: Params,
    model: Classifier,
    progress: _Progress,
    best: BestEpoch,
    paths: TrainPaths,
    precise_bn_images: int,
) -> dict[str, Any]:
    """Write the best checkpoint, history, curves and report; log them to the run."""
    model.load_state_dict(progress.best_state)
    model.to("cpu", memory_format=torch.contiguous_format)
    history = progress.history
    extra = {"run_id": progress.run_id, "best_epoch": best.epoch, "mode": params.train.mode}
    save_checkpoint(paths.model, model, {**extra, "weights": params.train.weights})
    with atomic.atomic_path(paths.history) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    plots.training_curves(history, paths.curves)
    figures = {
        "best_val_accuracy": history[best.epoch - 1]["val_accuracy"] if best.epoch else best.val_accuracy,
        f"best_{params.train.select_by}": best.val_accuracy,  # the score the best epoch was chosen by
        "best_val_loss": best.val_loss,
        "best_epoch": best.epoch,
        "epochs_run": len(history),
    }
    report = {
        "run_id": progress.run_id,
        "model": params.train.model,
        "mode": params.train.mode,
        **figures,
        "stopped_early": len(history) < params.train.epochs,
        # BatchNorm statistics recomputed on this many train images before each validation (0: not)
        "precise_bn_images": precise_bn_images,
        "train_seconds": round(progress.seconds, 2),
    }
    atomic.write_json(paths.report, report)
    runs.log_metrics(figures)
    runs.log_files([paths.model], "checkpoint")
    runs.log_files([paths.history, paths.curves, paths.report], "train")
    log.info(
        "best epoch %d: val accuracy %.4f; model %s; MLflow run %s",
        best.epoch,
        best.val_accuracy,
        paths.model,
        progress.run_id,
    )
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the classifier (scratch, linear probe or fine-tune)")
    add_path_arguments(parser, TrainPaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(TrainPaths, args, params_file=Path(args.params)))
    return 0
