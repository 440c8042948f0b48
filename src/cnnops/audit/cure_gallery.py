"""reports/cure/compare.html: a cure's before and after on one self-contained page.

The figures come from reports/cure.json as the cure wrote them (test accuracy, macro-F1, audit
verdict; every finding's flip rate against its control on the failed model's audit and on the
re-audit). The audits' galleries show each model's own worst offenders, so their overlays are of
different images: here the same test images of each cued class are explained by both models with
the audit's own maps (`saliency.pointing_fn`, the first `audit.methods`), so a person sees the
attention leave the cue. At most `audit.max_images_per_class` images a class are looked at, a batch
at a time, and `audit.gallery_images_per_class` of them shown: the failed model's worst offenders.

Class names, tests and file names are user-controlled: every one goes through html.escape. Pictures
are embedded as base64 PNG, nothing is fetched, so the page opens offline or as an MLflow artifact.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from cnnops.audit import evidence, gallery, saliency
from cnnops.config import AuditParams
from cnnops.data.splits import PreparedSplit, load_split_for
from cnnops.models import Classifier, load_classifier

PAGE = "compare.html"  # its name in the cure's folder


@dataclass(frozen=True)
class View:
    """One model's view of one image: its prediction and the overlay of its map."""

    caption: str
    picture: Image.Image


@dataclass(frozen=True)
class Pair:
    """One test image as the failed model and the cured model see it."""

    path: str
    before: View
    after: View


def write_comparison(
    path: Path, report: dict[str, Any], failed: Path, cured: Path, prepared: Path, a: AuditParams
) -> Path:
    """Write the page for the cure `report` (reports/cure.json's content) of checkpoint `failed`
    into checkpoint `cured`, with overlays of the `prepared` test split; returns `path`."""
    pairs = side_by_side(failed, cured, prepared, cued_classes(report), a)
    render(path, report, pairs)
    return path


def cued_classes(report: dict[str, Any]) -> list[str]:
    """The classes whose findings the cure addressed, in the report's order, each once."""
    return list(dict.fromkeys(str(f["class"]) for f in report["addressed"]))


def side_by_side(
    failed: Path, cured: Path, prepared: Path, classes: list[str], a: AuditParams
) -> dict[str, list[Pair]]:
    """Per class, its images the failed model reads most off the object, as both models see them."""
    before, _ = load_classifier(failed)
    after, _ = load_classifier(cured)
    test = load_split_for(before.spec, prepared, failed)
    load_split_for(after.spec, prepared, cured)  # refused unless the cured model reads it too
    return {name: _pairs(before, after, test, test.class_names.index(name), a) for name in classes}


@dataclass(frozen=True)
class _Seen:
    """What one model makes of some images: predicted class, its probability, its maps, and the
    share of each map's top pixels off the (estimated) object."""

    preds: np.ndarray
    confidence: np.ndarray
    maps: np.ndarray
    off: np.ndarray


def _pairs(
    before: Classifier, after: Classifier, test: PreparedSplit, cls: int, a: AuditParams
) -> list[Pair]:
    """The class's first `max_images_per_class` test images; of them, the failed model's worst
    offenders (predicted as the class first, then most attention off the object), shown by both."""
    idx = np.flatnonzero(test.labels.numpy() == cls)[: a.max_images_per_class]
    images = F.center_crop(test.images[torch.as_tensor(idx)], list(before.spec.image_size))
    first = _see(before, images, a)
    order = np.lexsort((-first.off, first.preds != cls))[: a.gallery_images_per_class]
    shown = images[torch.as_tensor(order)]
    second = _see(after, shown, a)
    names = test.class_names
    return [
        Pair(
            test.paths[idx[i]],
            _view(shown[k], first, i, names, "failed"),
            _view(shown[k], second, k, names, "cured"),
        )
        for k, i in enumerate(order)
    ]


def _see(model: Classifier, images: torch.Tensor, a: AuditParams) -> _Seen:
    """Predictions and the audit's maps of uint8 `images`, `audit.batch_size` at a time."""
    cam, _ = saliency.pointing_fn(
        model, method=a.methods[0], target_layer=a.target_layer, batch_size=a.batch_size,
        occlusion_patch=a.occlusion_patch,
    )  # fmt: skip
    n, h, w = len(images), *images.shape[2:]
    preds, confidence = np.zeros(n, dtype=np.int64), np.zeros(n)
    maps, off = np.zeros((n, h, w), dtype=np.float32), np.zeros(n)
    for i in range(0, n, a.batch_size):
        part = slice(i, i + a.batch_size)
        x = evidence.as_unit(images[part])
        proba = evidence.predict_proba(model, x, a.batch_size)
        p = proba.argmax(1)
        preds[part], confidence[part], maps[part] = p.numpy(), proba.max(1).values.numpy(), cam(x, p)
        tops = evidence.top_mask(maps[part], a.top_fraction)
        off[part] = (tops & ~evidence.estimate_objects(x)).sum((1, 2)) / tops.sum((1, 2)).clip(1)
    return _Seen(preds, confidence, maps, off)


def _view(image: torch.Tensor, seen: _Seen, i: int, names: list[str], which: str) -> View:
    caption = (
        f"{which} model: predicted '{names[seen.preds[i]]}' ({100 * seen.confidence[i]:.0f}%), "
        f"{100 * seen.off[i]:.0f}% of top pixels off the object"
    )
    return View(caption, gallery.overlay(evidence.as_unit(image).numpy(), seen.maps[i]))


def _figure(view: View, alt: str) -> str:
    e = html.escape
    source = f"data:image/png;base64,{gallery._png(view.picture)}"
    return (
        f"<figure><img class='overlay' alt='{e(alt)}' src='{source}'>"
        f"<figcaption>{e(view.caption)}</figcaption></figure>"
    )


def _text(value: Any) -> str:
    """A report value as escaped text: floats to 3 places, — where it is absent."""
    shown = f"{value:.3f}" if isinstance(value, float) else "—" if value is None else str(value)
    return html.escape(shown)


def _row(cells: list[str], tag: str = "td") -> str:
    """A table row of already escaped cells."""
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _summary(report: dict[str, Any]) -> str:
    """Test accuracy, macro-F1, the audit's verdict and the training time, before and after."""
    rows = [
        ("test accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("audit verdict", "audit_verdict"),
        ("training seconds", "train_seconds"),
    ]  # fmt: skip
    before, after = report["before"], report["after"]
    body = "".join(_row([label, _text(before.get(key)), _text(after.get(key))]) for label, key in rows)
    return f"<table id='summary'>{_row(['', 'failed model', 'cured model'], 'th')}{body}</table>"


def rates_text(rates: dict[str, float] | None) -> str:
    """A finding's figures on one model (cure.json's `before` / `after`): its flip rate and control, or
    deletion's gap; — where that audit has no such test (scripts/cure_story prints them so too)."""
    if rates is None:
        return "—"
    if "gap" in rates:
        return f"gap {rates['gap']:.2f}"
    return f"{rates['flip_rate']:.2f} (control {rates['control_flip_rate']:.2f})"


def _findings(report: dict[str, Any]) -> str:
    """Every failure of the first audit, the counterfactual that answered it, its flip rate against
    its control before and after, and whether the re-audit still fails it."""
    cues = {(a["class"], a["test"]): a["cue"] for a in report["addressed"]}
    head = _row(["class", "test", "counterfactual", "before", "after", "re-audit"], "th")
    body = "".join(_row(_finding_cells(f, cues.get((f["class"], f["test"])))) for f in report["findings"])
    return f"<h2>Findings: flip rate vs control</h2><table id='findings'>{head}{body}</table>"


def _finding_cells(finding: dict[str, Any], cue: str | None) -> list[str]:
    verdict = (
        "<span class='fail'>fails</span>" if finding["fails_after"] else "<span class='pass'>passes</span>"
    )
    return [
        _text(finding["class"]), _text(finding["test"]), _text(cue), _text(rates_text(finding["before"])),
        _text(rates_text(finding["after"])), verdict,
    ]  # fmt: skip


def _left(report: dict[str, Any]) -> list[str]:
    """The findings the cure did not act on, each with its round, and why (none: nothing)."""
    items = "".join(
        f"<li class='warn'>round {_text(n['round'])}: class '{_text(n['class'])}' {_text(n['test'])}: "
        f"{_text(n['why'])}</li>"
        for n in report["not_addressed"]
    )
    return [f"<h2>Not addressed</h2><ul>{items}</ul>"] if items else []


def _rounds(report: dict[str, Any]) -> str:
    """Each round: the findings of the audit before it that it acted on (the counterfactual, the
    flip rate against its control there and on its model), its re-audit's verdict, training time."""
    head = _row(["round", "class", "test", "counterfactual", "before", "after", "re-audit"], "th")
    body = []
    for r in report["rounds"]:
        cues = {(a["class"], a["test"]): a["cue"] for a in r["addressed"]}
        acted = [f for f in r["findings"] if (f["class"], f["test"]) in cues]
        cells = [_finding_cells(f, cues[(f["class"], f["test"])]) for f in acted]
        body += [_row([_text(r["round"]), *c]) for c in cells]
        seconds = _text(r["train_seconds"])
        body.append(_row([_text(r["round"]), "", "", "", "", f"re-audit {_text(r['audit_verdict'])}",
                          f"trained {seconds} s"]))  # fmt: skip
    return (
        f"<h2>Rounds</h2><p id='stopped'>{len(report['rounds'])} round(s): {_text(report['stopped'])}; "
        f"the cured model is round {_text(report['kept_round'])}'s</p>"
        f"<table id='rounds'>{head}{''.join(body)}</table>"
    )


def _class_section(name: str, pairs: list[Pair]) -> str:
    """A cued class: each image as the failed model (left) and the cured model (right) see it."""
    e = html.escape
    rows = "".join(
        f"<div class='pair'><p>{e(p.path)}</p>{_figure(p.before, p.path)}{_figure(p.after, p.path)}</div>"
        for p in pairs
    )
    return (
        f"<section><h2>class {e(name)}: the same images, failed model (left) and cured (right)</h2>"
        f"{rows}</section>"
    )


def _header(report: dict[str, Any]) -> list[str]:
    """The cure's status, which run it cured into which, and how."""
    status = str(report["status"])
    css = "pass" if status == "cured" else "fail"
    return [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnnops cure: {_text(status)}</title>",
        f"<style>{gallery._CSS}\n.pair{{border-top:1px dotted #ccc}}</style></head><body>",
        f"<h1>Cure: <span class='{css}' id='status'>{_text(status)}</span></h1>",
        f"<p>Failed model: MLflow run {_text(report['parent_run_id'])}; cured model "
        f"{_text(report['model'])}, run {_text(report['run_id'])} ({_text(report['mode'])}, "
        f"{_text(report['epochs'])} epochs, counterfactual rate {_text(report['rate'])}).</p>",
        *_release(report.get("release")),
    ]


def _release(decision: dict[str, Any] | None) -> list[str]:
    """The cured model's release, a challenger like any other (none where the cure did not release it)."""
    if decision is None:
        return []
    outcome, css = ("champion", "pass") if decision["promoted"] else ("challenger", "warn")
    return [
        f"<p id='release'>Released as {_text(decision['model_name'])} version {_text(decision['version'])}: "
        f"<b class='{css}'>{outcome}</b> ({_text(decision['reason'])})</p>"
    ]


def render(path: Path, report: dict[str, Any], pairs: dict[str, list[Pair]]) -> None:
    """Write the page: the status, the before/after tables, and each cued class's image pairs."""
    parts = [
        *_header(report),
        _summary(report),
        _findings(report),
        _rounds(report),
        *_left(report),
        *(_class_section(name, shown) for name, shown in pairs.items()),
        "</body></html>",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
