"""`cnnops audit`: the Grad-CAM shortcut audit that decides whether a model may be released.

Saliency on the test split points at places; interventions there (and at the places shortcuts
usually sit) decide; the verdict goes to reports/audit.json (top-level "verdict"), the evidence to
an offline HTML gallery, and both to the model's MLflow run. A `fail` verdict is a result, not an
error: the stage exits 0 so `dvc repro` records it, and `release` reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from cnnops import allocator
from cnnops.audit import (
    discovery,
    evidence,
    gallery,
    properties,
    property_interventions,
    regions,
    saliency,
    verdict,
)
from cnnops.audit.annotations import load_object_masks
from cnnops.audit.contract import AuditReport, ClassFigures, to_json
from cnnops.config import AuditParams, Params
from cnnops.data.decode import DEFAULT_MAX_PIXELS
from cnnops.data.digest import file_sha256
from cnnops.data.splits import PreparedSplit, load_split_for
from cnnops.models import Classifier
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs
from cnnops.training import features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditPaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    model: Path = path_arg("models/model.pt", "checkpoint", POSITIONAL)
    prepared: Path = path_arg("prepared", "prepare's output folder (its train and test splits)")
    train_report: Path = path_arg("reports/train.json", "train report: the model's MLflow run id")
    validation: Path | None = path_arg("reports/validation.json", "validate report, for file properties")
    data: Path | None = path_arg("data", "data folder holding annotations.csv (masks or boxes)")
    report: Path = path_arg("reports/audit.json", "verdict and figures")
    gallery: Path = path_arg("reports/audit", "HTML gallery folder (index.html, overlays/)")


@dataclass(frozen=True)
class AuditResult:
    """What the stage wrote, and the verdict and figures it logged to the model's run."""

    report: AuditReport  # what `paths.report` holds
    run_id: str  # the model's MLflow run
    written: tuple[Path, ...]  # the report, the gallery page and its overlays
    metrics: dict[str, float]  # logged to the run


def run(params: Params, paths: AuditPaths = AuditPaths()) -> AuditResult:
    """Audit `paths.model` on the prepared test split: write the report and the gallery, and log
    both to the model's run."""
    allocator.fix_mmap_threshold()  # freed pastes and activations go back: memory flat in the images
    a = params.audit
    model, run_id = runs.load_run_model(paths.model, paths.train_report)
    test = load_split_for(model.spec, paths.prepared, paths.model)
    train = PreparedSplit.load(paths.prepared, "train")
    model = model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    manifest = _manifest(paths.validation)
    report, shown = examine(
        model, test, train, manifest, a, paths.data, max_pixels=params.data.max_image_pixels
    )
    report = replace(report, run_id=run_id, checkpoint_sha256=file_sha256(paths.model))
    document = to_json(report)
    written = _write(paths, report, document, shown, features.split_pictures(model, test))
    metrics = _track(params, run_id, report, document, paths)
    for finding in report.decision.failures:
        log.warning("audit: %s", finding.sentence)
    log.info("audit verdict: %s (%s)", report.decision.verdict.upper(), paths.gallery / "index.html")
    return AuditResult(report=report, run_id=run_id, written=written, metrics=metrics)


def recurring(params: Params, paths: AuditPaths) -> dict[str, discovery.Discovered]:
    """The recurring patches the audit of `paths.model` finds, with their exemplars, per class: the
    same images and seeds as `run`, so the same patches as its report's (the cure pastes them)."""
    a = params.audit
    model, _ = runs.load_run_model(paths.model, paths.train_report)
    test = load_split_for(model.spec, paths.prepared, paths.model)
    looked = _look(model, test, _audited(test, a), a, paths.data, params.data.max_image_pixels)
    return _discovered(saliency.prepare_for_saliency(model), looked, test.class_names, a)


def examine(
    model: Classifier,
    test: PreparedSplit,
    train: PreparedSplit,
    manifest: dict[str, dict] | None,
    a: AuditParams,
    data_dir: Path | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[AuditReport, gallery.Shown]:
    """The audit in memory, no file written: the report, and per class the overlays the gallery shows.

    At most `audit.max_images_per_class` test images of each class are audited, read from the split
    once and held as uint8; the data probe streams both splits. So memory grows with the classes,
    never with the number of images in a split.
    """
    looked = _look(model, test, _audited(test, a), a, data_dir, max_pixels)
    fast = saliency.prepare_for_saliency(model)  # channels-last: the interventions' passes 1.5x faster
    found = _discovered(fast, looked, test.class_names, a)
    figures = {
        name: replace(f, recurring=found[name].patches)
        for name, f in _figures(fast, looked, test.class_names, a).items()
    }
    probe = properties.probe(
        train,
        test,
        manifest,
        border_fraction=a.border_fraction,
        corner_fraction=a.corner_fraction,
        seed=a.seed,
        batch_size=a.batch_size,
        permutations=a.property_permutations,
        data_dir=data_dir,
    )
    figures = property_interventions.with_property_transplants(model, looked.batch, figures, probe, a)
    report = AuditReport(
        decision=verdict.decide(figures, probe, a, rgb=test.images.shape[1] == 3),
        model=model.spec.model,
        methods=tuple(a.methods),
        target_layer=looked.layer,
        n_images=len(looked.paths),
        annotated_images=int(looked.batch.annotated.sum()),
        thresholds=a.model_dump(mode="json"),
        data_properties=probe,
        classes=figures,
        places_chosen_by=looked.chosen_by,
    )
    return report, _gallery_images(looked, test.class_names, a, found)


@dataclass(frozen=True)
class _Looked:
    """The audited images with the model's view of them, where they come from, and how far the
    other saliency methods agree with the first."""

    batch: evidence.Batch
    paths: list[str]  # each audited image's path, as the split gives it
    agreement: dict[str, np.ndarray]  # per method after the first: each image's top-pixel IoU with it
    layer: str  # the target layer of the saliency methods
    chosen_by: str | None  # what chose the places instead of the first method's map, and why


def _audited(test: PreparedSplit, a: AuditParams) -> np.ndarray:
    """Positions in the split of the audited images, in split order: all of a class's images, or
    `audit.max_images_per_class` of them drawn at random when it has more.

    The draw has a generator of its own (from `audit.seed`), so the transplants' generator draws
    what it drew before there was a subset to take.
    """
    labels = test.labels.numpy()
    rng = np.random.default_rng([a.seed, 1])
    chosen = [
        evidence.subsample(np.flatnonzero(labels == cls), a.max_images_per_class, rng)
        for cls in range(len(test.class_names))
    ]
    return np.sort(np.concatenate(chosen))


def _figures(
    model: Classifier, looked: _Looked, class_names: list[str], a: AuditParams
) -> dict[str, ClassFigures]:
    """Every class's figures, with how far the other saliency methods agree with the first.

    One generator for all classes, seeded by `audit.seed`: the same model gives the same report.
    """
    rng = np.random.default_rng(a.seed)
    h, w = looked.batch.x.shape[-2:]  # the model's input: places are where the model looks
    candidates = regions.intervention_regions(
        h, w, border_fraction=a.border_fraction, corner_fraction=a.corner_fraction,
        edge_fractions=a.edge_fractions, centre_fraction=a.centre_fraction, grids=a.grids,
    )  # fmt: skip
    removed = evidence.removal_predictions(model, looked.batch.x, candidates, a.batch_size)
    return {
        name: replace(
            evidence.class_figures(
                model,
                looked.batch,
                cls,
                top_fraction=a.top_fraction,
                regions=candidates,
                max_images=a.max_images_per_class,
                batch_size=a.batch_size,
                rng=rng,
                removed=removed,
            ),
            method_agreement=_agreement(looked, cls),
        )
        for cls, name in enumerate(class_names)
    }


def _discovered(
    model: Classifier, looked: _Looked, class_names: list[str], a: AuditParams
) -> dict[str, discovery.Discovered]:
    """Every class's recurring salient patches, pasted at random places and their own. A generator
    a class of its own (from `audit.seed`), so the other tests draw what they drew without them."""
    layer = saliency.find_target_layer(model, a.target_layer)[1]
    return {
        name: discovery.discover(
            model,
            layer,
            looked.batch,
            cls,
            np.random.default_rng([a.seed, 2, cls]),
            top_fraction=a.top_fraction,
            max_images=a.max_images_per_class,
            max_patches=a.discovery_max_patches,
            min_support=a.discovery_min_support,
            distance=a.discovery_distance,
            batch_size=a.batch_size,
        )
        for cls, name in enumerate(class_names)
    }


def _look(
    model: Classifier,
    test: PreparedSplit,
    chosen: np.ndarray,
    a: AuditParams,
    data_dir: Path | None,
    max_pixels: int,
) -> _Looked:
    """The images at `chosen`, read from the split once and kept as uint8 at the model's input size
    (centre-cropped, as evaluate feeds them), with the model's view of them, and object extents
    from masks where annotated."""
    size = list(model.spec.image_size)
    images = F.center_crop(test.images[torch.as_tensor(chosen)], size)
    paths = [test.paths[i] for i in chosen]
    layer, _ = saliency.find_target_layer(model, a.target_layer)
    preds, maps, objects, agreement, chosen_by = _see(model, images, a)
    masks = {}
    if data_dir is not None:
        loaded = load_object_masks(data_dir, paths, test.image_size, max_pixels=max_pixels)
        masks = {p: F.center_crop(torch.from_numpy(m), size).numpy() for p, m in loaded.items()}
    annotated = np.array([p in masks for p in paths], dtype=bool)
    for i in np.flatnonzero(annotated):
        objects[i] = masks[paths[i]]
    mean = evidence.mean_image(images, a.batch_size)
    batch = evidence.Batch(images, mean, test.labels.numpy()[chosen], preds, maps, objects, annotated)
    return _Looked(batch, paths, agreement, layer, chosen_by)


def _see(
    model: Classifier, images: torch.Tensor, a: AuditParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], str | None]:
    """Predictions, the first method's maps, estimated object extents, each other method's
    agreement with the first, `audit.batch_size` images at a time, and what chose the places
    instead of the first method where its map is too coarse (`saliency.pointing_fn`).

    One method at a time, so one saliency copy of the model is held; the other methods' maps are
    reduced to their agreement batch by batch: an extra method costs a number an image, not a map.
    """
    first, *others = dict.fromkeys(a.methods)
    cam, chosen_by = saliency.pointing_fn(
        model, method=first, target_layer=a.target_layer, batch_size=a.batch_size,
        occlusion_patch=a.occlusion_patch,
    )  # fmt: skip
    n, h, w = len(images), *images.shape[2:]
    preds = np.zeros(n, dtype=np.int64)
    maps = np.zeros((n, h, w), dtype=np.float32)
    objects = np.zeros((n, h, w), dtype=bool)
    for i in range(0, n, a.batch_size):
        part = slice(i, i + a.batch_size)
        x = evidence.as_unit(images[part])
        p = evidence.predict_proba(model, x, a.batch_size).argmax(1)
        preds[part], maps[part], objects[part] = p.numpy(), cam(x, p), evidence.estimate_objects(x)
    agreement = {m: _agreement_with(model, m, images, preds, maps, a) for m in others}
    return preds, maps, objects, agreement, chosen_by


def _agreement_with(
    model: Classifier, method: str, images: torch.Tensor, preds: np.ndarray, maps: np.ndarray, a: AuditParams
) -> np.ndarray:
    """Each image's IoU of `method`'s most-attended pixels with those of `maps` (the first method's)."""
    cam = saliency.saliency_fn(
        model, method=method, target_layer=a.target_layer, batch_size=a.batch_size,
        occlusion_patch=a.occlusion_patch,
    )  # fmt: skip
    iou = np.zeros(len(images))
    for i in range(0, len(images), a.batch_size):
        part = slice(i, i + a.batch_size)
        other = cam(evidence.as_unit(images[part]), torch.as_tensor(preds[part]))
        iou[part] = _overlap(maps[part], other, a.top_fraction)
    return iou


def _overlap(first: np.ndarray, other: np.ndarray, fraction: float) -> np.ndarray:
    """Each image's IoU of two methods' most-attended pixels."""
    a, b = evidence.top_mask(first, fraction), evidence.top_mask(other, fraction)
    return (a & b).sum((1, 2)) / (a | b).sum((1, 2)).clip(1)


def _agreement(looked: _Looked, cls: int) -> dict[str, float]:
    """Mean IoU of each other method's most-attended pixels with the first method's, on this class."""
    idx = np.flatnonzero(looked.batch.preds == cls)
    return {m: round(float(iou[idx].mean()) if len(idx) else 0.0, 4) for m, iou in looked.agreement.items()}


def _manifest(validation: Path | None) -> dict[str, dict] | None:
    """validate's manifest by path, for the probe's file properties; None (pixels only) without it."""
    if validation is None:
        return None
    if not validation.exists():
        log.warning(
            "%s not found: the data-property probe uses pixel properties only (run `cnnops validate`)",
            validation,
        )
        return None
    return {row["path"]: row for row in json.loads(validation.read_text()).get("manifest", [])}


def _gallery_images(
    looked: _Looked, names: list[str], a: AuditParams, found: dict[str, discovery.Discovered]
) -> gallery.Shown:
    """Per class, the images to show, worst offenders first (most of the top pixels off the object),
    then each recurring patch's exemplars."""
    batch = looked.batch
    tops = evidence.top_mask(batch.maps, a.top_fraction)
    off = (tops & ~batch.objects).sum((1, 2)) / tops.sum((1, 2)).clip(1)
    shown: gallery.Shown = {}
    for cls, name in enumerate(names):
        idx = np.flatnonzero(batch.labels == cls)
        idx = idx[np.lexsort((-off[idx], batch.preds[idx] != cls))]  # correct first, then errors
        shown[name] = [
            (
                looked.paths[i],
                f"predicted '{names[batch.preds[i]]}', {100 * off[i]:.0f}% of top pixels off the object",
                gallery.overlay(evidence.as_unit(batch.x[i]).numpy(), batch.maps[i]),
            )
            for i in idx[: a.gallery_images_per_class]
        ] + gallery.patch_pictures(found[name])
    return shown


def _write(
    paths: AuditPaths,
    report: AuditReport,
    document: dict[str, Any],
    shown: gallery.Shown,
    found: features.FeaturePictures | None,
) -> tuple[Path, ...]:
    """The gallery and its overlays, each saved as a file too so the run's artifacts hold them (stale
    ones removed first), then the report, replaced in one step so a reader never sees half of it.
    Returns every file written."""
    overlays = paths.gallery / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for old in overlays.glob("*.png"):
        old.unlink()
    for cls, pictures in enumerate(shown.values()):
        for k, (_, _, picture) in enumerate(pictures):
            picture.save(overlays / f"c{cls:03d}_{k:02d}.png")
    page = paths.gallery / "index.html"
    gallery.render(page, report, shown, found)
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.report.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(paths.report)
    return (paths.report, page, *sorted(overlays.glob("*.png")))


def _track(
    params: Params, run_id: str, report: AuditReport, document: dict[str, Any], paths: AuditPaths
) -> dict[str, float]:
    """Add the verdict, the report and the gallery to the model's run; returns the metrics logged."""
    d = report.decision
    metrics = {"audit_fail": float(d.verdict == "fail"), "audit_failures": len(d.failures)}
    with runs.continue_run(params.tracking, run_id):
        runs.log_metrics(metrics)
        runs.log_dict(document, "audit/audit.json")
        runs.log_files([paths.gallery], "audit")
        runs.set_tags({"cnnops.audit_verdict": d.verdict})
    return metrics


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """`cnnops audit`: one flag per AuditPaths field, as dvc.yaml passes them."""
    p = subparsers.add_parser("audit", help="Grad-CAM shortcut audit: verdict, evidence and HTML gallery")
    add_path_arguments(p, AuditPaths)
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(AuditPaths, args))
    return 0  # a `fail` verdict is recorded, not an error: release reads it
