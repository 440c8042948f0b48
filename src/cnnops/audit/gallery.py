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
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

OVERLAY_SCALE = 4  # small training images are enlarged so a person can see the cue


def overlay(image: np.ndarray, saliency: np.ndarray) -> Image.Image:
    """The image (C x H x W float [0, 1]) with its saliency blended in as a jet heatmap, enlarged."""
    rgb = np.repeat(image, 3, 0) if image.shape[0] == 1 else image
    heat = plt.get_cmap("jet")(saliency)[..., :3].transpose(2, 0, 1)
    blend = (0.55 * rgb + 0.45 * heat).clip(0, 1)
    pair = np.concatenate([rgb, blend], axis=2)  # original beside overlay
    pil = Image.fromarray((pair.transpose(1, 2, 0) * 255).astype(np.uint8))
    return pil.resize((pil.width * OVERLAY_SCALE, pil.height * OVERLAY_SCALE), Image.NEAREST)


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def chart(figures: dict[str, Any]) -> Image.Image:
    """Bars of each intervention's flip rate beside its control, for one class."""
    tests = {
        "most-attended": figures["transplant_top"],
        **figures["transplant_regions"],
        **{f"{name} (mean)": r for name, r in figures["transplant_regions_mean"].items()},
        "tone": figures["transplant_tone"],
    }
    names = list(tests)
    flips = [tests[n]["flip_rate"] for n in names]
    ctrls = [tests[n]["control_flip_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 2.6), dpi=80)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, flips, 0.4, label="pasted from this class", color="#c0392b")
    ax.bar(pos + 0.2, ctrls, 0.4, label="control (the larger of its controls)", color="#7f8c8d")
    ax.set_xticks(pos, [n.replace(" corner", "") for n in names], fontsize=6, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("flip rate", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}
.pass{color:#1e8449}.fail{color:#c0392b}
section{border-top:1px solid #ccc;margin-top:1.5em}.bad{color:#c0392b}.warn{color:#b9770e}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
figure{display:inline-block;margin:4px;font-size:.75em;max-width:280px;word-break:break-all}"""


def _figure_rows(f: dict[str, Any]) -> str:
    rows = [("correct / errors", f"{f['n_correct']} / {f['n_errors']}")]
    rows.append(
        (
            "most-attended transplant",
            f"{f['transplant_top']['flip_rate']:.2f} vs {f['transplant_top']['control_flip_rate']:.2f}",
        )
    )
    for kind, key in (("each image", "transplant_regions"), ("class mean", "transplant_regions_mean")):
        for region, r in f[key].items():
            rows.append(
                (f"{region} transplant, {kind}", f"{r['flip_rate']:.2f} vs {r['control_flip_rate']:.2f}")
            )
    rows.append(
        (
            "tone transplant",
            f"{f['transplant_tone']['flip_rate']:.2f} vs {f['transplant_tone']['control_flip_rate']:.2f}",
        )
    )
    rows.append(
        (
            "deletion drop top / random",
            f"{f['deletion']['drop_top']:.2f} / {f['deletion']['drop_random']:.2f}",
        )
    )
    rows.append(
        (
            "outer-band saliency (others)",
            f"{f['energy']['outer band']:.2f} ({f['energy_others']['outer band']:.2f})",
        )
    )
    rows.append(("peak off object", f"{f['attention']['peak_off_object']:.2f}"))
    rows.append(
        (
            "peak / object spread",
            f"{f['attention']['peak_spread']:.3f} / {f['attention']['object_spread']:.3f}",
        )
    )
    if f.get("masks"):
        m = f["masks"]
        rows.append(
            (
                "inside masks: energy / top / peak",
                f"{m['energy_inside']:.2f} / {m['top_inside']:.2f} / {m['pointing_hit_rate']:.2f}",
            )
        )
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)


def render(
    path: str | Path,
    report: dict[str, Any],
    images: dict[str, list[tuple[str, str, Image.Image]]],
) -> None:
    """Write the gallery. `images[class]` = (file name, caption, overlay) in display order."""
    verdict = report["verdict"]
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnnops audit: {e(verdict)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Shortcut audit: <span class='{e(verdict)}' id='verdict'>{e(verdict.upper())}</span></h1>",
        f"<p>Model {e(str(report.get('model', '')))}, saliency {e(', '.join(report.get('methods', [])))} "
        f"at layer <code>{e(str(report.get('target_layer', '')))}</code>, "
        f"{report.get('n_images', 0)} test images.</p>",
    ]
    if report["failures"]:
        parts.append(
            "<h2>Failures</h2><ul>"
            + "".join(f"<li class='bad'>{e(r['sentence'])}</li>" for r in report["failures"])
            + "</ul>"
        )
    if report["warnings"]:
        parts.append(
            "<h2>Warnings</h2><ul>"
            + "".join(f"<li class='warn'>{e(r['sentence'])}</li>" for r in report["warnings"])
            + "</ul>"
        )
    failed = set(report["failed_classes"])
    order = sorted(report["classes"], key=lambda c: (c not in failed, c))
    for name in order:
        f = report["classes"][name]
        status = "fail" if name in failed else "pass"
        parts.append(f"<section><h2>class {e(name)} <span class='{status}'>({status})</span></h2>")
        parts.append(f"<table>{_figure_rows(f)}</table>")
        parts.append(
            f"<p><img alt='figures of class {e(name)}' src='data:image/png;base64,{_png(chart(f))}'></p>"
        )
        for file_name, caption, picture in images.get(name, []):
            parts.append(
                f"<figure><img class='overlay' alt='{e(file_name)}' "
                f"src='data:image/png;base64,{_png(picture)}'>"
                f"<figcaption>{e(file_name)}<br>{e(caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
