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

from cnnops.audit import evidence, gallery, properties, regions, saliency, verdict
from cnnops.audit.annotations import load_object_masks
from cnnops.audit.contract import AuditReport, ClassFigures, to_json
from cnnops.config import AuditParams, Params
from cnnops.data.splits import PreparedSplit, load_split_for
from cnnops.models import Classifier
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditPaths:
    """The stage's inputs and outputs (the paths dvc.yaml gives the CLI)."""

    model: Path = path_arg("models/model.pt", "checkpoint", POSITIONAL)
    prepared: Path = path_arg("prepared", "prepare's output folder ({train,test}.pt)")
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
    """Audit `paths.model` on `<paths.prepared>/test.pt`: write the report and the gallery, and log
    both to the model's run."""
    a = params.audit
    model, run_id = runs.load_run_model(paths.model, paths.train_report)
    test = load_split_for(model.spec, paths.prepared, paths.model)
    train = PreparedSplit.load(paths.prepared, "train")
    model = model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    batch, maps_by_method, layer = _look(model, test, a, paths.data)
    figures = _figures(model, batch, maps_by_method, test, a)
    probe = properties.probe(
        train,
        test,
        _manifest(paths.validation),
        border_fraction=a.border_fraction,
        corner_fraction=a.corner_fraction,
        seed=a.seed,
    )
    report = AuditReport(
        decision=verdict.decide(figures, probe, a),
        model=model.spec.model,
        methods=tuple(a.methods),
        target_layer=layer,
        n_images=len(test),
        annotated_images=int(batch.annotated.sum()),
        thresholds=a.model_dump(mode="json"),
        data_properties=probe,
        classes=figures,
    )
    document = to_json(report)
    written = _write(paths, report, document, batch, test, a)
    metrics = _track(params, run_id, report, document, paths)
    for finding in report.decision.failures:
        log.warning("audit: %s", finding.sentence)
    log.info("audit verdict: %s (%s)", report.decision.verdict.upper(), paths.gallery / "index.html")
    return AuditResult(report=report, run_id=run_id, written=written, metrics=metrics)


def _figures(
    model: Classifier, batch: evidence.Batch, maps: dict[str, np.ndarray], test: PreparedSplit, a: AuditParams
) -> dict[str, ClassFigures]:
    """Every class's figures, with how far the other saliency methods agree with the first.

    One generator for all classes, seeded by `audit.seed`: the same model gives the same report.
    """
    rng = np.random.default_rng(a.seed)
    h, w = test.image_size
    candidates = regions.candidate_regions(h, w, a.border_fraction, a.corner_fraction)
    return {
        name: replace(
            evidence.class_figures(
                model,
                batch,
                cls,
                top_fraction=a.top_fraction,
                regions=candidates,
                max_images=a.max_images_per_class,
                batch_size=a.batch_size,
                rng=rng,
            ),
            method_agreement=_agreement(batch, maps, cls, a.top_fraction),
        )
        for cls, name in enumerate(test.class_names)
    }


def _look(
    model: Classifier, test: PreparedSplit, a: AuditParams, data_dir: Path | None
) -> tuple[evidence.Batch, dict[str, np.ndarray], str]:
    """Predictions, saliency by every method, and object extents (masks where annotated)."""
    x = test.floats()
    preds = evidence.predict_proba(model, x, a.batch_size).argmax(1)
    layer, _ = saliency.find_target_layer(model, a.target_layer)
    maps = {
        m: saliency.saliency(model, x, preds, method=m, target_layer=a.target_layer, batch_size=a.batch_size)
        for m in a.methods
    }
    objects = evidence.estimate_objects(x)
    masks = load_object_masks(data_dir, test.paths, test.image_size) if data_dir is not None else {}
    annotated = np.array([p in masks for p in test.paths], dtype=bool)
    for i in np.flatnonzero(annotated):
        objects[i] = masks[test.paths[i]]
    batch = evidence.Batch(x, test.labels.numpy(), preds.numpy(), maps[a.methods[0]], objects, annotated)
    return batch, maps, layer


def _agreement(
    batch: evidence.Batch, maps: dict[str, np.ndarray], cls: int, fraction: float
) -> dict[str, float]:
    """Mean IoU of each other method's most-attended pixels with the first method's, on this class."""
    idx = np.flatnonzero(batch.preds == cls)
    first = evidence.top_mask(batch.maps[idx], fraction)
    out = {}
    for method, m in list(maps.items())[1:]:
        other = evidence.top_mask(m[idx], fraction)
        union = (first | other).sum((1, 2)).clip(1)
        out[method] = round(float(((first & other).sum((1, 2)) / union).mean()) if len(idx) else 0.0, 4)
    return out


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


def _gallery_images(batch: evidence.Batch, test: PreparedSplit, a: AuditParams, out: Path) -> gallery.Shown:
    """Per class, the images to show, worst offenders first: most of the top pixels off the object.

    Each overlay is also saved under `out`, so the run's artifacts hold them as files.
    """
    tops = evidence.top_mask(batch.maps, a.top_fraction)
    off = (tops & ~batch.objects).sum((1, 2)) / tops.sum((1, 2)).clip(1)
    names = test.class_names
    shown: gallery.Shown = {}
    for cls, name in enumerate(names):
        idx = np.flatnonzero(batch.labels == cls)
        idx = idx[np.lexsort((-off[idx], batch.preds[idx] != cls))]  # correct first, then errors
        shown[name] = []
        for k, i in enumerate(idx[: a.gallery_images_per_class]):
            picture = gallery.overlay(batch.x[i].numpy(), batch.maps[i])
            picture.save(out / f"c{cls:03d}_{k:02d}.png")
            caption = f"predicted '{names[batch.preds[i]]}', {100 * off[i]:.0f}% of top pixels off the object"
            shown[name].append((test.paths[i], caption, picture))
    return shown


def _write(
    paths: AuditPaths,
    report: AuditReport,
    document: dict[str, Any],
    batch: evidence.Batch,
    test: PreparedSplit,
    a: AuditParams,
) -> tuple[Path, ...]:
    """The gallery (stale overlays removed first), then the report, replaced in one step so a
    reader never sees half of it. Returns every file written."""
    overlays = paths.gallery / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for old in overlays.glob("*.png"):
        old.unlink()
    page = paths.gallery / "index.html"
    gallery.render(page, report, _gallery_images(batch, test, a, overlays))
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
