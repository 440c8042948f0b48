"""The model card of a registered version: one Markdown file and one self-contained HTML page.

What a reviewer asks before trusting a model, gathered from the reports the pipeline already wrote
(validate, prepare, train, evaluate, audit, release): the data, how it was trained, the test figures
with their intervals, the calibration, the audit's verdict in its own sentences with a few of its
overlays, what the audit could not check, and why release decided as it did.

Both files come from one list of sections (`build`), so they cannot disagree. Class names, paths,
group names and finding sentences are user-controlled (folder and file names): every string goes
through `html.escape` in both files (Markdown renderers such as MLflow's pass raw HTML through), and
`|` is escaped in Markdown tables. Images are re-encoded from decoded pixels, so nothing but PNG
pixels reaches the page. No MLflow here: the release stage logs the files.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cnnops import atomic

log = logging.getLogger(__name__)

INTERVAL_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "macro_auroc": "macro AUROC",
}
TRAIN_KEYS = (
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "label_smoothing", "class_weighting",
    "select_by", "input_size",
)  # fmt: skip
IMAGES_PER_CLASS = 2  # gallery overlays shown per class ...
MAX_IMAGES = 12  # ... and in all: the page stays small (each overlay is about 10-60 kB)
MAX_IMAGE_PIXELS = 1024 * 1024  # an overlay larger than this is not embedded
MAX_TEXT = 500  # characters of any one user-controlled string shown (a sentence, a class name)
MAX_CLASSES_SHOWN = 50  # rows of the per-class tables; more are summarised


@dataclass(frozen=True)
class Picture:
    caption: str
    png: bytes


@dataclass(frozen=True)
class Section:
    """One heading: sentences, then tables (header, rows), then pictures."""

    title: str
    lines: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)


@dataclass(frozen=True)
class CardInputs:
    """Everything a card shows, read by the stage from the reports (None: the report was not given)."""

    model_name: str
    version: str
    run_id: str
    release: dict[str, Any]  # reports/release.json
    train: dict[str, Any]  # reports/train.json
    train_params: dict[str, Any]  # params.yaml train: as used
    weights: str | None  # the checkpoint's pretrained weights
    git_commit: str
    data_version: str
    class_names: list[str]
    split_counts: dict[str, list[int]]  # split -> images per class
    audit: dict[str, Any]  # reports/audit.json
    metrics: dict[str, Any] | None  # reports/metrics.json
    validation: dict[str, Any] | None  # reports/validation.json
    pictures: list[Picture] = field(default_factory=list)


def text(value: object) -> str:
    """Any value as bounded, HTML-escaped text (safe in both the Markdown and the HTML file)."""
    s = "n/a" if value is None else str(value)
    return html.escape(s if len(s) <= MAX_TEXT else s[:MAX_TEXT] + "…")


def _num(value: object, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.{digits}f}"
    return text(value)


def build(c: CardInputs) -> list[Section]:
    """The card's sections in reading order."""
    return [
        _decision(c),
        _data(c),
        _training(c),
        _metrics(c.metrics, c.class_names),
        _groups(c.metrics),
        _calibration(c.metrics),
        _audit(c.audit, c.pictures),
        _limits(c),
    ]


def _decision(c: CardInputs) -> Section:
    r = c.release
    outcome = "champion" if r["promoted"] else "challenger (not promoted)"
    lines = [
        f"Version {text(c.version)} of {text(c.model_name)}, MLflow run {text(c.run_id)}: {outcome}.",
        f"Reason: {text(r['reason'])}.",
    ]
    rows = [
        [f"test {text(r['metric'])}", _num(r["score"])],
        ["release.min_score", _num(r["min_score"])],
        ["release.margin", _num(r["margin"])],
        ["release.significance", _num(r["significance"])],
        ["audit verdict", text(r["audit_verdict"])],
    ]
    b = r["baseline"]
    rows.append(
        [
            f"majority-class baseline (always {text(b['majority_class'])})",
            f"{_num(b['accuracy'])} vs {_num(b['model_accuracy'])}, binomial p = {b['p_value']:.3g}",
        ]
    )
    paired = r.get("paired_test")
    if paired:
        rows.append(
            [
                f"McNemar against champion v{text(r['champion_version'])}",
                f"{r['metric']} {_num(r['champion_score'])} for the champion; "
                f"{paired['challenger_only_correct']} image(s) only this model gets right, "
                f"{paired['champion_only_correct']} only the champion; p = {paired['p_value']:.3g}",
            ]
        )
    else:
        rows.append(["paired test", "none: there was no champion to compare with"])
    return Section("Release decision", lines, [(["figure", "value"], rows)])


def _data(c: CardInputs) -> Section:
    names = c.class_names
    splits = list(c.split_counts)
    header = ["class", *splits]
    rows = [[text(n), *(str(c.split_counts[s][i]) for s in splits)] for i, n in enumerate(names)]
    rows.append(["all", *(str(sum(c.split_counts[s])) for s in splits)])
    lines = [f"{len(names)} classes; data version (data.dvc) {text(c.data_version)}."]
    v = c.validation
    if v is None:
        lines.append("Validation: no reports/validation.json was given.")
    else:
        outcome = "passed" if v.get("success") else "failed"
        warned = ", ".join(text(w) for w in v.get("failed_warnings", [])) or "none"
        errors = ", ".join(text(w) for w in v.get("failed_errors", [])) or "none"
        lines.append(
            f"Validation {outcome} on {text(v.get('n_files'))} files: failed error checks {errors}; "
            f"checks that warned {warned}."
        )
    return Section("Data", lines, [(header, _bounded(rows, len(header)))])


def _training(c: CardInputs) -> Section:
    t = c.train
    rows = [
        ["model", text(t.get("model"))],
        ["mode", text(t.get("mode"))],
        ["pretrained weights", text(c.weights or "none (trained from scratch)")],
        *([f"train.{k}", text(c.train_params[k])] for k in TRAIN_KEYS if k in c.train_params),
        ["best epoch / epochs run", f"{text(t.get('best_epoch'))} / {text(t.get('epochs_run'))}"],
        ["best val accuracy", _num(t.get("best_val_accuracy"))],
        ["git commit", text(c.git_commit)],
    ]
    return Section("Training", [], [(["", ""], rows)])


def _metrics(m: dict[str, Any] | None, names: list[str]) -> Section:
    if m is None:
        return Section("Test metrics", ["No reports/metrics.json was given: no test figures."])
    iv = m["intervals"]
    lines = [
        f"On {m['n_test']} test images. Each interval is a {100 * iv['confidence']:.0f}% percentile "
        f"bootstrap interval over {iv['resamples']} resamples of the test images: another test set "
        "drawn like this one would give a figure in it that often. Two models whose intervals overlap "
        "may not differ; release judges that with the paired test above."
    ]
    rows = [
        [label, _num(iv[key]["value"]), f"{_num(iv[key]['low'])} - {_num(iv[key]['high'])}"]
        for key, label in INTERVAL_NAMES.items()
        if isinstance(iv.get(key), dict)
    ]
    per_class = [
        [text(n), *(_num(f.get(k)) for k in ("precision", "recall", "f1", "auroc")), str(f["support"])]
        for n, f in ((n, m["per_class"][n]) for n in names if n in m["per_class"])
    ]
    tables = [
        (["metric", "value", "interval"], rows),
        (["class", "precision", "recall", "F1", "AUROC", "test images"], _bounded(per_class, 6)),
    ]
    return Section("Test metrics", lines, tables)


def _groups(m: dict[str, Any] | None) -> Section:
    if m is None:
        return Section("Per-group metrics", ["No reports/metrics.json was given."])
    g = m.get("groups")
    if not g:
        return Section("Per-group metrics", ["The test split has no groups (no data/groups.csv)."])
    lines = [
        f"{g['n_groups']} groups in the test split; accuracy per group from {_num(g['accuracy_min'])} "
        f"to {_num(g['accuracy_max'])} (median {_num(g['accuracy_median'])}). The "
        f"{len(g['worst'])} worst by accuracy:"
    ]
    rows = [
        [text(w["group"]), str(w["images"]), _num(w["accuracy"]), _num(w["macro_f1"])] for w in g["worst"]
    ]
    return Section("Per-group metrics", lines, [(["group", "test images", "accuracy", "macro-F1"], rows)])


def _calibration(m: dict[str, Any] | None) -> Section:
    cal = (m or {}).get("calibration")
    if not cal:
        return Section("Calibration", ["No calibration figures (no reports/metrics.json)."])
    lines = [
        f"Temperature {cal['temperature']:.3g}, fitted on the {text(cal['fitted_on'])} split "
        f"({cal['val_images']} images) and divided into the exported graph's logits, so the served "
        "probabilities are the calibrated ones."
    ]
    rows = [
        ["expected calibration error (test)", _num(cal["test_ece_before"]), _num(cal["test_ece_after"])],
        ["negative log-likelihood (test)", _num(cal["test_nll_before"]), _num(cal["test_nll_after"])],
    ]
    return Section("Calibration", lines, [(["", "before", "after"], rows)])


def _audit(a: dict[str, Any], pictures: list[Picture]) -> Section:
    lines = [f"Verdict: {text(a['verdict'])}."]
    for kind in ("failures", "warnings"):
        for finding in a.get(kind, []):
            lines.append(f"{kind[:-1]}: {text(finding['sentence'])}")
    if len(lines) == 1:
        lines.append("No finding: no test reached its threshold.")
    return Section("Shortcut audit", lines, pictures=pictures)


def _limits(c: CardInputs) -> Section:
    """What this audit and these figures could not show, from the reports themselves."""
    a, lines = c.audit, []
    if a["verdict"] == "inconclusive":
        lines.append("A class had too few correctly classified test images to audit: it was not looked at.")
    if a.get("at_warning"):
        families = ", ".join(text(f) for f in a["at_warning"])
        lines.append(f"Test families run at warning (they could not fail the audit): {families}.")
    if not a.get("annotated_images"):
        lines.append(
            "No object masks (data/annotations.csv): whether attention lies on the object is estimated."
        )
    cap = a.get("thresholds", {}).get("max_images_per_class")
    if cap is not None:
        lines.append(f"At most {text(cap)} test images a class were audited; metrics use every test image.")
    if len(c.class_names) == 2:
        lines.append("Two classes: a cue of one class is also a cue for the other; read the sentences first.")
    lines.append(
        "A cue the model does not use is not found by the interventions; the data-property probe "
        "only warns. The full list: docs/audit.md, Limits."
    )
    return Section("Limits", lines)


def _bounded(rows: list[list[str]], width: int) -> list[list[str]]:
    if len(rows) <= MAX_CLASSES_SHOWN:
        return rows
    more = len(rows) - MAX_CLASSES_SHOWN
    return [*rows[:MAX_CLASSES_SHOWN], [f"... {more} more rows in the reports", *[""] * (width - 1)]]


def gallery_pictures(gallery: Path, class_names: Sequence[str]) -> list[Picture]:
    """A few of the audit gallery's overlays (reports/audit/overlays/c<class>_<k>.png), re-encoded.

    A file that does not decode, or is too large, is left out with a warning.
    """
    found: list[Picture] = []
    for cls, name in enumerate(class_names):
        for k in range(IMAGES_PER_CLASS):
            path = gallery / "overlays" / f"c{cls:03d}_{k:02d}.png"
            if len(found) == MAX_IMAGES or not path.is_file():
                break
            png = _reencoded(path)
            if png is not None:
                found.append(Picture(f"class {name}, overlay {k + 1}", png))
    return found


def _reencoded(path: Path) -> bytes | None:
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                log.warning("%s: %dx%d is too large for the model card; left out", path, *image.size)
                return None
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, ValueError) as exc:
        log.warning("%s: not a readable image (%s); left out of the model card", path, exc)
        return None


def markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", "", *(f"{line}\n" for line in s.lines)]
        for header, rows in s.tables:
            parts += [_md_row(header), "|" + "---|" * len(header)]
            parts += [_md_row(row) for row in rows]
            parts.append("")
        if s.pictures:
            captions = "; ".join(p.caption for p in s.pictures)
            parts += [f"Overlays (in model_card.html): {text(captions)}.", ""]
    return "\n".join(parts)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1000px;line-height:1.4}
h2{border-top:1px solid #ccc;padding-top:.6em}table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
figure{display:inline-block;margin:4px;font-size:.75em;max-width:280px;word-break:break-all}"""


def page(title: str, sections: list[Section]) -> str:
    """The HTML page: inline CSS, images as data: URIs, nothing fetched."""
    body = [f"<h1>{title}</h1>"]
    for s in sections:
        body.append(f"<section><h2>{s.title}</h2>")
        body += [f"<p>{line}</p>" for line in s.lines]
        for header, rows in s.tables:
            head = "".join(f"<th>{h}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in rows)
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
        for p in s.pictures:
            data = base64.b64encode(p.png).decode("ascii")
            caption = text(p.caption)
            body.append(
                f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{caption}</figcaption></figure>"
            )
        body.append("</section>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write(c: CardInputs, markdown_path: Path, html_path: Path) -> list[Path]:
    """Both files of the card, each written atomically; returns their paths."""
    sections = build(c)
    title = f"Model card: {text(c.model_name)} version {text(c.version)}"
    atomic.write_text(markdown_path, markdown(title, sections))
    atomic.write_text(html_path, page(title, sections))
    return [markdown_path, html_path]
