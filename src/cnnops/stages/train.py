"""`cnnops train`: train or fine-tune the classifier on the prepared splits, recorded in MLflow.

The stage wires the parts together: model factory (models), presets (transforms), loops (engine),
optimizer and schedule (optim), per-epoch resume state (resume), ranks (distributed) and the
MLflow run (tracking, rank 0 only). Outputs: the best checkpoint, reports/train.json with the run
id, and the per-epoch history that DVC plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cnnops.config import Params, TrainParams
from cnnops.data.loaders import SplitDataset, eval_loader, train_loader
from cnnops.data.splits import PreparedSplit, load_splits
from cnnops.data.transforms import EvalPreset, TrainPreset, get_mixup_cutmix
from cnnops.errors import StageInputError
from cnnops.models import Classifier, create_classifier, default_spec, save_checkpoint
from cnnops.tracking import runs
from cnnops.training import distributed, plots, resume
from cnnops.training.engine import BatchTransform, BestEpoch, LoopSettings, evaluate_epoch, train_one_epoch
from cnnops.training.optim import build_optimizer, build_scheduler
from cnnops.training.progress import epoch_bar

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@dataclass(frozen=True)
class TrainPaths:
    """Where the stage writes (paths come from dvc.yaml through the CLI)."""

    model: Path = Path("models/model.pt")
    report: Path = Path("reports/train.json")
    history: Path = Path("reports/plots/train_history.csv")
    curves: Path = Path("reports/plots/train_history.png")
    state: Path = Path(".cnnops/train/state.pt")  # resume state: outside DVC outs, which DVC deletes
    params_file: Path | None = None  # logged to the run as params.yaml
    evidence: tuple[Path, ...] = ()  # validate/prepare reports, data docs: logged to the run


@dataclass(frozen=True)
class TrainResult:
    run_id: str | None  # None on ranks other than 0
    report: dict[str, Any]
    history: list[dict[str, float]]


def run(params: Params, prepared: str | Path, paths: TrainPaths = TrainPaths()) -> TrainResult:
    """Train `params.train.model` on `<prepared>/{train,val}.pt`; resumes a killed run of the same inputs."""
    dist = distributed.setup()
    try:
        return _train(params, Path(prepared), paths, dist)
    finally:
        distributed.teardown(dist)


@dataclass
class _Parts:
    """Everything the loop needs, built from params and data (the state dicts are what resume restores)."""

    model: Classifier
    settings: LoopSettings
    loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mix: BatchTransform | None

    def state_dict(self) -> dict[str, Any]:
        return {
            name: getattr(self, name).state_dict() for name in ("model", "optimizer", "scheduler", "scaler")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("model", "optimizer", "scheduler", "scaler"):
            getattr(self, name).load_state_dict(state[name])


def _build(
    params: Params, train_split: PreparedSplit, val_split: PreparedSplit, dist: distributed.Dist
) -> _Parts:
    t = params.train
    torch.manual_seed(params.base.seed)
    spec = default_spec(
        t.model, train_split.class_names, train_split.color_mode, train_split.image_size, t.weights
    )
    model = create_classifier(spec, t.weights, check_input=True)
    if t.mode == "linear_probe":
        model.freeze_backbone()
    settings = _loop_settings(t, dist.device)
    model.to(
        dist.device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format
    )
    loader = train_loader(
        SplitDataset(train_split, TrainPreset(t.augment, spec.image_size, spec.color_mode)),
        batch_size=t.batch_size,
        seed=params.base.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=t.num_workers,
    )
    val_loader = eval_loader(
        SplitDataset(val_split, EvalPreset()), batch_size=t.batch_size, num_workers=t.num_workers
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
        optimizer=optimizer,
        scheduler=build_scheduler(
            optimizer, warmup_steps=t.warmup_epochs * steps, total_steps=t.epochs * steps
        ),
        scaler=torch.amp.GradScaler(dist.device.type, enabled=settings.amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        mix=get_mixup_cutmix(
            mixup_alpha=t.augment.mixup_alpha,
            cutmix_alpha=t.augment.cutmix_alpha,
            num_classes=spec.num_classes,
        ),
    )


def _train(params: Params, prepared: Path, paths: TrainPaths, dist: distributed.Dist) -> TrainResult:
    t = params.train
    splits = load_splits(prepared, ("train", "val"))
    if splits["val"].class_names != splits["train"].class_names:
        raise StageInputError(f"{prepared}: train and val splits have different class names; rerun prepare")
    if len(splits["val"]) == 0:
        raise StageInputError(
            f"{prepared / 'val.pt'} has no images: best-checkpoint selection needs a validation split; "
            "raise prepare.val_fraction or add images, then rerun prepare"
        )
    parts = _build(params, splits["train"], splits["val"], dist)
    fingerprint = resume.fingerprint(
        {
            "train": t.model_dump(mode="json"),
            "seed": params.base.seed,
            "world_size": dist.world_size,
            "tracking": [runs.store_uri(params.tracking), params.tracking.experiment],  # run to continue
        },
        [prepared / "train.pt", prepared / "val.pt"],
    )
    best = BestEpoch(t.early_stopping_patience)
    record: dict[str, Any] = {"epoch": 0, "history": [], "best_state": None, "run_id": None, "seconds": 0.0}
    saved = resume.load(paths.state, fingerprint)
    if saved is not None:
        parts.load_state_dict(saved)
        record.update({k: saved[k] for k in record})
        best = BestEpoch(**saved["best"])
        log.info("resuming %s after epoch %d of %d from %s", t.model, record["epoch"], t.epochs, paths.state)
    model = parts.model
    net = DistributedDataParallel(model, device_ids=_device_ids(dist)) if dist.enabled else model

    with ExitStack() as stack:
        if dist.is_main:
            run_name = f"{t.model}-{t.mode}"
            mlflow_run = stack.enter_context(runs.training_run(params.tracking, record["run_id"], run_name))
            if record["run_id"] is None:
                tags = runs.lineage_tags(stage="train")
                runs.log_run_inputs(params, model.spec.class_names, paths.params_file, tags)
            record["run_id"] = mlflow_run.info.run_id
            _log_missed_epochs(record)
        for epoch in range(record["epoch"], 0 if best.should_stop else t.epochs):
            started = time.perf_counter()
            parts.loader.sampler.set_epoch(epoch)
            # One seed per (seed, epoch, rank) for augmentation, mixing and dropout.
            torch.manual_seed(_epoch_seed(params.base.seed, epoch, dist.rank))
            with epoch_bar(
                f"epoch {epoch + 1}/{t.epochs}", len(parts.loader), enabled=dist.is_main
            ) as advance:
                train_stats = train_one_epoch(
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
            if dist.is_main:
                val = evaluate_epoch(model, parts.val_loader, parts.settings).stats
                row = {
                    "epoch": epoch + 1,
                    "train_loss": train_stats.loss,
                    "train_accuracy": train_stats.accuracy,
                    "val_loss": val.loss,
                    "val_accuracy": val.accuracy,
                    "lr": parts.optimizer.param_groups[-1]["lr"],
                }
                record["history"].append(row)
                if best.update(epoch + 1, val.accuracy, val.loss):
                    record["best_state"] = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
                record["epoch"] = epoch + 1
                record["seconds"] += time.perf_counter() - started
                state = {**record, **parts.state_dict(), "best": asdict(best), "fingerprint": fingerprint}
                resume.save(paths.state, state)  # before logging: a kill in between re-logs on resume
                runs.log_epoch({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
                summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
                log.info("epoch %d/%d: %s", epoch + 1, t.epochs, summary)
            if distributed.broadcast_flag(best.should_stop, dist):
                break
        if not dist.is_main:
            return TrainResult(None, {}, [])
        report = _finish(params, model, record, best, paths)
    resume.clear(paths.state)
    return TrainResult(record["run_id"], report, record["history"])


def _loop_settings(t: TrainParams, device: torch.device) -> LoopSettings:
    """AMP and channels_last only on CUDA; an explicit AMP request on CPU is refused with a warning."""
    if device.type != "cuda":
        if t.amp in ("bf16", "fp16"):
            log.warning("train.amp=%s needs CUDA: training in float32 on %s", t.amp, device)
        return LoopSettings(device, None, False, t.grad_clip)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    if t.amp == "auto":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return LoopSettings(device, amp, t.channels_last, t.grad_clip)


def _device_ids(dist: distributed.Dist) -> list[int] | None:
    return [dist.device.index] if dist.device.type == "cuda" else None


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed per (seed, epoch, rank): a resumed run draws exactly what the uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _log_missed_epochs(record: dict[str, Any]) -> None:
    """A run killed between saving its state and logging an epoch logs that epoch on resume."""
    if not record["history"]:
        return
    logged = runs.logged_steps(record["run_id"], "val_loss")
    for row in record["history"]:
        if row["epoch"] not in logged:
            runs.log_epoch({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])


def _finish(
    params: Params, model: Classifier, record: dict[str, Any], best: BestEpoch, paths: TrainPaths
) -> dict[str, Any]:
    """Write the best checkpoint, history, curves and report; log them to the run."""
    model.load_state_dict(record["best_state"])
    model.to("cpu", memory_format=torch.contiguous_format)
    history = record["history"]
    save_checkpoint(
        paths.model,
        model,
        {
            "run_id": record["run_id"],
            "best_epoch": best.epoch,
            "mode": params.train.mode,
            "weights": params.train.weights,
        },
    )
    paths.history.parent.mkdir(parents=True, exist_ok=True)
    with paths.history.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    plots.training_curves(history, paths.curves)
    report = {
        "run_id": record["run_id"],
        "model": params.train.model,
        "mode": params.train.mode,
        "best_epoch": best.epoch,
        "best_val_accuracy": best.val_accuracy,
        "best_val_loss": best.val_loss,
        "epochs_run": len(history),
        "stopped_early": len(history) < params.train.epochs,
        "train_seconds": round(record["seconds"], 2),
    }
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    paths.report.write_text(json.dumps(report, indent=2) + "\n")
    runs.log_metrics(
        {
            "best_val_accuracy": best.val_accuracy,
            "best_val_loss": best.val_loss,
            "best_epoch": best.epoch,
            "epochs_run": len(history),
        }
    )
    runs.log_files([paths.model], "checkpoint")
    runs.log_files([paths.history, paths.curves, paths.report], "train")
    runs.log_files(list(paths.evidence), "data")
    log.info(
        "best epoch %d: val accuracy %.4f; model %s; MLflow run %s",
        best.epoch,
        best.val_accuracy,
        paths.model,
        record["run_id"],
    )
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the classifier (scratch, linear probe or fine-tune)")
    parser.add_argument("prepared", metavar="PREPARED", help="prepare's output folder, e.g. prepared")
    defaults = TrainPaths()
    parser.add_argument("--out", default=str(defaults.model), help="best checkpoint (default: %(default)s)")
    parser.add_argument(
        "--report", default=str(defaults.report), help="report with the run id (default: %(default)s)"
    )
    parser.add_argument(
        "--history", default=str(defaults.history), help="per-epoch CSV (default: %(default)s)"
    )
    parser.add_argument(
        "--curves", default=str(defaults.curves), help="training curves PNG (default: %(default)s)"
    )
    parser.add_argument("--state", default=str(defaults.state), help="resume state (default: %(default)s)")
    parser.add_argument(
        "--log-artifact",
        action="append",
        default=[],
        dest="evidence",
        metavar="PATH",
        help="file or folder to log to the run (validate/prepare reports, data docs); repeatable",
    )
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    paths = TrainPaths(
        model=Path(args.out),
        report=Path(args.report),
        history=Path(args.history),
        curves=Path(args.curves),
        state=Path(args.state),
        params_file=Path(args.params),
        evidence=tuple(Path(p) for p in args.evidence),
    )
    run(params, args.prepared, paths)
    return 0
