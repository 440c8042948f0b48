"""reports/audit/index.html: one self-contained page a person reads offline.

Per class: its verdict, its figures, a chart of the interventions against their controls, and its
images with saliency overlays, worst offenders first (most saliency off the object). Images and
charts are embedded as base64 PNG so the page opens from a mail attachment or an MLflow artifact
view. Class and file names are user-controlled folder and file names: every one goes through
html.escape.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from cnnops.audit.contract import AuditReport, ClassFigures, Finding, Transplant, TransplantKind
from cnnops.audit.discovery import Discovered
from cnnops.audit.regions import OUTER_BAND
from cnnops.training.features import MAP_CHANNELS, FeaturePictures
from cnnops.training.plots import figure_image

OVERLAY_SIDE = 128  # overlays are enlarged to about this many pixels a side so a person sees a small cue

Shown = dict[str, list[tuple[str, str, Image.Image]]]  # per class: (file name, caption, overlay)
PATCH = "recurring patch"  # the name of a recurring patch's exemplars among a class's pictures


def overlay(image: np.ndarray, saliency: np.ndarray) -> Image.Image:
    """The image (C x H x W float [0, 1]) with its saliency blended in as a jet heatmap, enlarged.

    By a whole factor up to about `OVERLAY_SIDE`: a 32-px digit 4x, a 224-px photo not at all (4x,
    each overlay would hold 5 MB in memory, and the page a PNG of that size per image).
    """
    rgb = np.repeat(image, 3, 0) if image.shape[0] == 1 else image
    heat = plt.get_cmap("jet")(saliency)[..., :3].transpose(2, 0, 1)
    blend = (0.55 * rgb + 0.45 * heat).clip(0, 1)
    pair = np.concatenate([rgb, blend], axis=2)  # original beside overlay
    pil = Image.fromarray((pair.transpose(1, 2, 0) * 255).astype(np.uint8))
    scale = max(1, OVERLAY_SIDE // max(image.shape[1:]))
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def exemplars(crops: tuple[np.ndarray, ...]) -> Image.Image:
    """A recurring patch's exemplar crops (C x h x w float [0, 1], sizes vary) side by side on grey,
    enlarged by a whole factor to about `OVERLAY_SIDE` high, so a small tag is seen."""
    side = max(c.shape[1] for c in crops)
    scale = max(1, OVERLAY_SIDE // 2 // side)
    tiles = []
    for c in crops:
        rgb = np.repeat(c, 3, 0) if c.shape[0] == 1 else c
        tile = np.full((3, side, side), 0.5)
        tile[:, : rgb.shape[1], : rgb.shape[2]] = rgb[:, :side, :side]
        tiles += [tile, np.full((3, side, 1), 1.0)]
    strip = np.concatenate(tiles[:-1], axis=2).transpose(1, 2, 0)
    pil = Image.fromarray((strip.clip(0, 1) * 255).astype(np.uint8))
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def patch_pictures(found: Discovered) -> list[tuple[str, str, Image.Image]]:
    """Each recurring patch's exemplars as a class's picture, captioned with its support and flips
    (at random places and at its own place, each beside its controls)."""
    return [
        (
            f"{PATCH} {i}",
            f"in {p.images} images ({100 * p.support:.0f}%); pasted at random places it flips "
            f"{_patch_flips(p.at_random_places)}, at its own place {_patch_flips(p.at_own_place)}",
            exemplars(crops),
        )
        for i, (p, crops) in enumerate(zip(found.patches, found.exemplars, strict=True), 1)
    ]


def _patch_flips(t: Transplant) -> str:
    """A patch paste's flips beside its controls: the same cut from other classes' images, and from the
    class's other images."""
    own = "not run: too few"
    if t.same_class_flip_rate is not None:
        own = f"{100 * t.same_class_flip_rate:.0f}%"
    others = t.control_flip_rate if t.other_classes_flip_rate is None else t.other_classes_flip_rate
    return (
        f"{100 * t.flip_rate:.0f}% of other classes' images (cut from other classes {100 * others:.0f}%, "
        f"from its other images {own})"
    )


def _png(image: Image.Image) -> str:
    """The image as base64 PNG, to embed: the page must open offline, as one file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(kind: TransplantKind, place: str | None) -> str:
    """A transplant's short name on the chart."""
    return {
        "top": "most-attended", "region": place, "mean": f"{place} (mean)", "tone": "tone", "property": place,
        "patch": place,
    }[kind]  # fmt: skip


def _row_label(kind: TransplantKind, place: str | None) -> str:
    """A transplant's name in the figures table."""
    return {
        "top": "most-attended transplant",
        "region": f"{place} transplant, each image",
        "mean": f"{place} transplant, class mean",
        "tone": "tone transplant",
        "property": f"{place} changed to the class's level",
        "patch": f"{place} transplant",
    }[kind]


def chart(figures: ClassFigures) -> Image.Image:
    """Bars of each intervention's flip rate beside its control, for one class."""
    transplants = figures.transplants()
    names = [_label(kind, place) for kind, place, _ in transplants]
    flips = [t.flip_rate for _, _, t in transplants]
    ctrls = [t.control_flip_rate for _, _, t in transplants]
    fig, ax = plt.subplots(figsize=(9, 2.6), dpi=80)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, flips, 0.4, label="pasted from this class", color="#c0392b")
    ax.bar(pos + 0.2, ctrls, 0.4, label="control (the larger of its controls)", color="#7f8c8d")
    ax.set_xticks(pos, [n.replace(" corner", "") for n in names], fontsize=6, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("flip rate", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    return figure_image(fig)


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}
.pass{color:#1e8449}.fail{color:#c0392b}
section{border-top:1px solid #ccc;margin-top:1.5em}.bad{color:#c0392b}.warn{color:#b9770e}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
figure{display:inline-block;margin:4px;font-size:.75em;max-width:280px;word-break:break-all}"""


def _figure_rows(f: ClassFigures) -> str:
    """The class's figures as table rows: each transplant against its control, then the rest."""
    rows = [("correct / errors", f"{f.n_correct} / {f.n_errors}")]
    for kind, place, t in f.transplants():
        rows.append((_row_label(kind, place), f"{t.flip_rate:.2f} vs {t.control_flip_rate:.2f}"))
    d, att = f.deletion, f.attention
    rows += [
        ("deletion drop top / random", f"{d.drop_top:.2f} / {d.drop_random:.2f}"),
        (
            "outer-band saliency (others)",
            f"{f.energy[OUTER_BAND]:.2f} ({f.energy_others[OUTER_BAND]:.2f})",
        ),
        ("peak off object", f"{att.peak_off_object:.2f}"),
        ("peak / object spread", f"{att.peak_spread:.3f} / {att.object_spread:.3f}"),
    ]
    if f.masks is not None:
        m = f.masks
        rows.append(
            (
                "inside masks: energy / top / peak",
                f"{m.energy_inside:.2f} / {m.top_inside:.2f} / {m.pointing_hit_rate:.2f}",
            )
        )
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)


def _findings(title: str, css: str, findings: tuple[Finding, ...]) -> list[str]:
    """A list of finding sentences under its heading; nothing when there are none."""
    if not findings:
        return []
    items = "".join(f"<li class='{css}'>{html.escape(r.sentence)}</li>" for r in findings)
    return [f"<h2>{title}</h2><ul>{items}</ul>"]


def _section(
    name: str, f: ClassFigures, status: str, images: list[tuple[str, str, Image.Image]]
) -> list[str]:
    """One class: its status, figures table, chart and overlays."""
    e = html.escape
    parts = [
        f"<section><h2>class {e(name)} <span class='{status}'>({status})</span></h2>",
        f"<table>{_figure_rows(f)}</table>",
        f"<p><img alt='figures of class {e(name)}' src='data:image/png;base64,{_png(chart(f))}'></p>",
    ]
    for file_name, caption, picture in images:
        parts.append(
            f"<figure><img class='overlay' alt='{e(file_name)}' "
            f"src='data:image/png;base64,{_png(picture)}'>"
            f"<figcaption>{e(file_name)}<br>{e(caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return parts


def _features_section(found: FeaturePictures | None) -> list[str]:
    """What the layers see: the first convolution's filters and a few test images' feature maps."""
    if found is None:
        return []
    layers = ", ".join(f"<code>{html.escape(name)}</code>" for name in found.layers)
    return [
        "<section><h2>What the layers see</h2>",
        f"<p>The first convolution's filters, then for a few test images the {MAP_CHANNELS} most active "
        f"channels of {layers}: early layers answer edges and textures, later ones parts and objects.</p>",
        f"<p><img alt='first convolution filters' src='data:image/png;base64,{_png(found.filters)}'></p>",
        f"<p><img alt='feature maps' src='data:image/png;base64,{_png(found.maps)}'></p></section>",
    ]


def render(
    path: str | Path,
    report: AuditReport,
    images: Shown,
    features: FeaturePictures | None = None,
) -> None:
    """Write the gallery. `images[class]` = (file name, caption, overlay) in display order;
    `features`: the filters and feature maps section (none without)."""
    d = report.decision
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnnops audit: {e(d.verdict)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Shortcut audit: <span class='{e(d.verdict)}' id='verdict'>{e(d.verdict.upper())}</span></h1>",
        f"<p>Model {e(report.model)}, saliency {e(', '.join(report.methods))} "
        f"at layer <code>{e(report.target_layer)}</code>, {report.n_images} test images.</p>",
        *_findings("Failures", "bad", d.failures),
        *_findings("Warnings", "warn", d.warnings),
    ]
    failed = set(d.failed_classes)
    for name in sorted(report.classes, key=lambda c: (c not in failed, c)):
        status = "fail" if name in failed else "pass"
        parts += _section(name, report.classes[name], status, images.get(name, []))
    parts += _features_section(features)
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
