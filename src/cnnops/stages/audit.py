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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnops.audit import evidence, gallery, properties, saliency, verdict
from cnnops.audit.annotations import load_object_masks
from cnnops.config import AuditParams, Params
from cnnops.data.splits import PreparedSplit, load_split_for
from cnnops.models import Classifier
from cnnops.tracking import runs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditPaths:
    """Where the stage reads and writes (paths come from dvc.yaml through the CLI)."""

    report: Path = Path("reports/audit.json")
    gallery: Path = Path("reports/audit")  # index.html and overlays/
    validation: Path | None = Path("reports/validation.json")  # file properties for the data probe
    data: Path | None = Path("data")  # where data/annotations.csv may give masks or boxes


def run(
    params: Params,
    model_path: str | Path,
    prepared: str | Path,
    train_report: str | Path,
    paths: AuditPaths = AuditPaths(),
) -> dict[str, Any]:
    """Audit `model_path` on `<prepared>/test.pt`; returns the report written to `paths.report`."""
    a = params.audit
    model, run_id = runs.load_run_model(model_path, train_report)
    test = load_split_for(model.spec, prepared, model_path)
    train = PreparedSplit.load(Path(prepared) / "train.pt")
    model = model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    batch, maps_by_method, layer = _look(model, test, a, paths.data)
    rng = np.random.default_rng(a.seed)
    h, w = test.image_size
    regions = evidence.candidate_regions(h, w, a.border_fraction, a.corner_fraction)
    figures = {}
    for cls, name in enumerate(test.class_names):
        figures[name] = evidence.class_figures(
            model,
            batch,
            cls,
            top_fraction=a.top_fraction,
            regions=regions,
            max_images=a.max_images_per_class,
            batch_size=a.batch_size,
            rng=rng,
        )
        figures[name]["method_agreement"] = _agreement(batch, maps_by_method, cls, a.top_fraction)
    probe = properties.probe(
        train,
        test,
        _manifest(paths.validation),
        border_fraction=a.border_fraction,
        corner_fraction=a.corner_fraction,
        seed=a.seed,
    )
    report = {
        **verdict.decide(figures, probe, a),
        "model": model.spec.model,
        "methods": list(a.methods),
        "target_layer": layer,
        "n_images": len(test),
        "annotated_images": int(batch.annotated.sum()),
        "thresholds": a.model_dump(mode="json"),
        "data_properties": probe,
        "classes": figures,
    }
    _write(paths, report, batch, test)
    _track(params, run_id, report, paths)
    for finding in report["failures"]:
        log.warning("audit: %s", finding["sentence"])
    log.info("audit verdict: %s (%s)", report["verdict"].upper(), paths.gallery / "index.html")
    return report


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
    report: dict[str, Any], batch: evidence.Batch, test: PreparedSplit, n: int, out: Path
) -> dict:
    """Per class, the images to show, worst offenders first: most of the top pixels off the object."""
    tops = evidence.top_mask(batch.maps, report["thresholds"]["top_fraction"])
    off = (tops & ~batch.objects).sum((1, 2)) / tops.sum((1, 2)).clip(1)
    names = test.class_names
    shown = {}
    for cls, name in enumerate(names):
        idx = np.flatnonzero(batch.labels == cls)
        idx = idx[np.lexsort((-off[idx], batch.preds[idx] != cls))][:n]  # correct first, then errors
        shown[name] = []
        for k, i in enumerate(idx):
            picture = gallery.overlay(batch.x[i].numpy(), batch.maps[i])
            picture.save(out / f"c{cls:03d}_{k:02d}.png")
            caption = f"predicted '{names[batch.preds[i]]}', {100 * off[i]:.0f}% of top pixels off the object"
            shown[name].append((test.paths[i], caption, picture))
    return shown


def _write(paths: AuditPaths, report: dict[str, Any], batch: evidence.Batch, test: PreparedSplit) -> None:
    overlays = paths.gallery / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for old in overlays.glob("*.png"):
        old.unlink()
    shown = _gallery_images(report, batch, test, report["thresholds"]["gallery_images_per_class"], overlays)
    gallery.render(paths.gallery / "index.html", report, shown)
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.report.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(paths.report)


def _track(params: Params, run_id: str, report: dict[str, Any], paths: AuditPaths) -> None:
    with runs.continue_run(params.tracking, run_id):
        runs.log_metrics(
            {"audit_fail": float(report["verdict"] == "fail"), "audit_failures": len(report["failures"])}
        )
        runs.log_dict(report, "audit/audit.json")
        runs.log_files([paths.gallery], "audit")
        runs.set_tags({"cnnops.audit_verdict": report["verdict"]})


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="Grad-CAM shortcut audit: verdict, evidence and HTML gallery")
    p.add_argument("model", metavar="MODEL", help="checkpoint, e.g. models/model.pt")
    p.add_argument("--prepared", default="prepared", help="prepare's output folder (default: %(default)s)")
    p.add_argument(
        "--train-report", default="reports/train.json", help="holds the run id (default: %(default)s)"
    )
    d = AuditPaths()
    p.add_argument("--report", default=str(d.report), help="verdict and figures (default: %(default)s)")
    p.add_argument("--gallery", default=str(d.gallery), help="HTML gallery folder (default: %(default)s)")
    p.add_argument("--validation", default=str(d.validation), help="validate report, for file properties")
    p.add_argument(
        "--data", default=str(d.data), help="data folder holding annotations.csv (default: %(default)s)"
    )
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    paths = AuditPaths(Path(args.report), Path(args.gallery), Path(args.validation), Path(args.data))
    run(params, args.model, args.prepared, args.train_report, paths)
    return 0  # a `fail` verdict is recorded, not an error: release reads it
