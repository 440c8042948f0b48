"""How often the audit catches a planted shortcut, how often it cries wolf, and what batching buys.

For each cell of a grid the flags select (source, cue, image size, model, prevalence, with leakage
into other classes and a label confound) and each seed, this writes a planted copy with
`cnnops.data.planted`, runs the real prepare, train and audit stages on it, and counts:

- detection: the verdict is `fail` and the worst failure names the cued class ("named first"), or
  the cued class is among the failed classes ("among failed"; with two classes, removing a cue
  from the cued class's images is also a cue for the other class, which may then come first);
- false alarm: the verdict is `fail` on clean data;
- could not judge: the verdict is `inconclusive` (a class had too few correct test images, its
  `coverage` warning, named with the seed), and the runs with `underpowered:<test>` warnings (a test
  over the threshold on too few pairs for its adjusted p-value: not failed), each named with its
  seed, class and test. Two columns of the table; in the JSON one row a cell ("could not judge,
  ..."), after the rows it gave before, which are unchanged.

A planted cue is not always a learned one: when the digit alone is easy, the model may ignore it.
So each run also measures the ground truth the audit does not see (`planted.cue_flip_rate`, through
the PyTorch model): the planted cue itself drawn into other classes' test images, and the share
then predicted as the cued class ("cue flips").
A run counts as "learned" when that share reaches the audit's transplant threshold.

On clean data it also reports the largest transplant flip rate minus control of any class, and
that of a test that can fail (its family at `error`, with its class and test): the margin left
under the threshold. It then times saliency on the same model in batches against two
one-image-at-a-time loops: our own function on one image, and the grad-cam package's CAMs. Seeds
move the cue's position, size, intensity and class. Not a test: slow; its numbers go to docs/audit.md.

    .venv/bin/python benchmarks/audit_detection.py --seeds 5 --sources digits faces
    .venv/bin/python benchmarks/audit_detection.py --seeds 3 --cues textline noise blur none \
        --sizes 32 64 --fractions 0.6 0.9 --leakage 0.03 --throughput-images 0

The audit's own time is printed per run ("audit s").
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from figures import add_json_argument, row, write_json
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cnnops.audit.contract import AuditReport
from cnnops.audit.saliency import find_target_layer, saliency_fn
from cnnops.audit.verdict import COVERAGE, UNDERPOWERED
from cnnops.config import parse_params
from cnnops.data.example import PHOTOS
from cnnops.data.planted import CUES, PLANTED_PHOTO_CROPS, SOURCES, cue_flip_rate, make_planted
from cnnops.data.splits import PreparedSplit
from cnnops.models import load_classifier
from cnnops.stages import audit, prepare, train

CLASSES = {
    "digits": [str(d) for d in range(10)],
    "faces": ["face", "nonface"],
    "scenes": [str(d) for d in range(10)],
    "photos": list(PHOTOS[:4]),
    "tones": ["blue", "green", "red"],
}
RGB = ("scenes", "photos", "tones")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: data, cue, its prevalence and leakage, image size and model."""

    source: str
    cue: str
    size: int
    model: str
    fraction: float
    leakage: float
    confound: float


def one_run(root: Path, cell: Cell, seed: int, per_class: int, epochs: int) -> dict:
    """Plant, prepare, train and audit; returns the verdict and whether it names the cued class."""
    cls = CLASSES[cell.source][seed % len(CLASSES[cell.source])] if cell.cue != "none" else None
    spec = make_planted(
        root / "data", cell.cue, cls, source=cell.source, seed=seed, image_size=cell.size,
        per_class=per_class or None, fraction=cell.fraction, leakage=cell.leakage, confound=cell.confound,
    )  # fmt: skip
    params = parse_params(
        {
            "base": {"seed": seed},
            "data": {"color_mode": "RGB" if cell.source in RGB else "L", "near_duplicate_distance": 0},
            "prepare": {"image_size": [cell.size, cell.size]},
            "train": {
                "model": cell.model,
                "epochs": epochs,
                "batch_size": 32,
                "label_smoothing": 0.0,
                "early_stopping_patience": None,
                "augment": {"random_resized_crop": False},
            },
            "audit": {"methods": ["gradcam"]},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "art")},
        },
        "benchmark",
    )
    prepare.run(params, prepare.PreparePaths(root / "data", root / "prepared", root / "prepare.json"))
    tp = train.TrainPaths(
        prepared=root / "prepared", model=root / "model.pt", report=root / "train.json",
        history=root / "h.csv", curves=root / "h.png", state=root / "state.pt",
    )  # fmt: skip
    train.run(params, tp)
    paths = audit.AuditPaths(
        model=tp.model, prepared=root / "prepared", train_report=tp.report, validation=None,
        data=root / "data", report=root / "audit.json", gallery=root / "audit",
    )  # fmt: skip
    start = time.perf_counter()
    report = audit.run(params, paths).report
    seconds = time.perf_counter() - start
    decision = report.decision
    worst = decision.failures[0] if decision.failures else None
    model, _ = load_classifier(tp.model)
    test = PreparedSplit.load(root / "prepared", "test")
    return {
        "cue_flips": cue_flip_rate(model, test, spec) if cls else 0.0,
        "spec": spec,
        "verdict": decision.verdict,
        "named": worst is not None and worst.class_name == cls,
        "among": cls in decision.failed_classes,
        "worst": worst.sentence if worst else "",
        "seed": seed,
        "uncovered": [w.class_name for w in decision.warnings if w.test == COVERAGE],
        "underpowered": [
            f"'{w.class_name}' {w.test.removeprefix(UNDERPOWERED + ':')}"
            for w in decision.warnings
            if w.test.startswith(f"{UNDERPOWERED}:")
        ],
        "largest_excess": largest_excess(report),
        "largest_at_error": largest_at_error(report),
        "audit_seconds": seconds,
        "model": tp.model,
        "prepared": root / "prepared",
    }


def could_not_judge(runs: list[dict]) -> tuple[str, str]:
    """The table's two "could not judge" cells: the `inconclusive` runs (with the classes too few to
    audit) and the runs with `underpowered:` warnings (with their tests), each as count/runs (seeds)."""
    inconclusive = [r for r in runs if r["verdict"] == "inconclusive"]
    weak = [r for r in runs if r["underpowered"]]
    return (
        _named(inconclusive, len(runs), lambda r: ", ".join(f"'{c}'" for c in r["uncovered"])),
        _named(weak, len(runs), lambda r: "; ".join(r["underpowered"])),
    )


def _named(picked: list[dict], n: int, what: Callable[[dict], str]) -> str:
    """`k/n`, then each picked run's seed and `what` of it: "2/5 (seed 1: ...; seed 3: ...)"."""
    seeds = "; ".join(f"seed {r['seed']}: {what(r)}" for r in picked)
    return f"{len(picked)}/{n}" + (f" ({seeds})" if picked else "")


def largest_excess(report: AuditReport) -> float:
    """The largest transplant flip rate minus its control over every class: the margin to the threshold."""
    return max(t.excess for figures in report.classes.values() for _, _, t in figures.transplants())


def largest_at_error(report: AuditReport) -> tuple[float, str]:
    """The largest flip rate minus control of a test that can fail (its family at `error`), and which:
    on RGB the tone and property families default to warnings, whose excess may reach 1.00."""
    tests = [t for t in report.decision.tests if t.severity == "error"]
    if not tests:
        return 0.0, "none"
    worst = max(tests, key=lambda t: t.effect)
    return worst.effect, f"'{worst.class_name}' {worst.test}"


PACKAGE_CAMS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}


def _rate(n: int, work: Callable[[], object], repeat: int = 3) -> float:
    """Images per second of `work` on `n` images, from its fastest of `repeat` runs (as timeit does)."""
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return n / min(seconds)


def throughput(
    model_path: Path, prepared: Path, method: str, n: int, batch: int, n_package: int
) -> tuple[float, float, float]:
    """Images per second of `method`: ours in batches of `batch`, ours one image at a time, and the
    `grad-cam` package's one image at a time on the first `n_package` of the same images.

    Ours share one set-up (model copy, layer, hooks), so their ratio is what batching alone buys. The
    package is set up once as its README shows, on the model as loaded: what one writes without cnnops.
    """
    model, _ = load_classifier(model_path)
    x = PreparedSplit.load(prepared, "test").floats()  # a few hundred test images: small
    x = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]
    targets = torch.zeros(n, dtype=torch.long)
    maps = saliency_fn(model, method=method, batch_size=batch)
    maps(x[:batch], targets[:batch])  # warm-up
    batched = _rate(n, lambda: maps(x, targets))
    single = _rate(n, lambda: [maps(x[i : i + 1], targets[i : i + 1]) for i in range(n)])
    target = [ClassifierOutputTarget(0)]
    layer = find_target_layer(model)[1]
    with PACKAGE_CAMS[method](model=model, target_layers=[layer]) as cam, redirect_stderr(io.StringIO()):
        cam(input_tensor=x[:1], targets=target)  # warm-up; the redirect hides ScoreCAM's progress bars
        package = _rate(
            n_package, lambda: [cam(input_tensor=x[i : i + 1], targets=target) for i in range(n_package)]
        )
    return batched, single, package


def _cells(args: argparse.Namespace) -> list[Cell]:
    """The grid the flags select: every source x cue x size x model x prevalence (clean once)."""
    cells = []
    for source, cue, size, model in itertools.product(args.sources, args.cues, args.sizes, args.models):
        if cue in ("patch", "hue") and source not in RGB:
            continue  # colour cues need colour
        for fraction in args.fractions if cue != "none" else [1.0]:
            cells.append(Cell(source, cue, size, model, fraction, args.leakage, args.confound))
    return cells


def _detection_runs(args: argparse.Namespace, base: Path) -> list[tuple[Cell, list[dict]]]:
    """Every cell with its runs, one per seed, each printed as it ends (they take minutes)."""
    threshold = parse_params({}).audit.transplant_flip_threshold
    rows = []
    for n, cell in enumerate(_cells(args)):
        runs = []
        for seed in range(args.seeds):
            per_class = args.per_class if cell.source in ("digits", "scenes") else 0
            epochs = args.epochs or (25 if cell.source == "faces" else 4 if cell.source == "digits" else 8)
            r = one_run(base / f"{n}-{seed}", cell, seed, per_class, epochs)
            r["learned"] = r["cue_flips"] >= threshold
            runs.append(r)
            s = r["spec"]
            print(
                f"  {cell} seed {seed} class {s.cued_class} {s.position} size {s.size} intensity "
                f"{s.intensity}: cue flips {r['cue_flips']:.2f}, {r['verdict']} "
                f"in {r['audit_seconds']:.0f} s; underpowered: {'; '.join(r['underpowered']) or 'none'}; "
                f"{r['worst'] or 'no failure'}",  # whole: a cut sentence had to be re-run to be read
                flush=True,
            )
        rows.append((cell, runs))
    return rows


def _detection_table(rows: list[tuple[Cell, list[dict]]]) -> list[dict]:
    """Print the detection table; its figures as JSON rows."""
    print(
        "\n| data | cue | px | model | prevalence | runs | model learned the cue | caught, named first "
        "| caught, among failed | `fail` on a cue the model ignores / on clean data | `inconclusive` "
        "| with `underpowered:` warnings | audit s (median) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    figures = []
    for c, runs in rows:
        fails = [r["verdict"] == "fail" for r in runs]
        seconds = float(np.median([r["audit_seconds"] for r in runs]))
        head = f"| {c.source} | {c.cue if c.cue != 'none' else 'none (clean)'} | {c.size} | {c.model}"
        inconclusive, underpowered = could_not_judge(runs)
        tail = f"| {inconclusive} | {underpowered} | {seconds:.0f} |"
        if c.cue == "none":
            at_error, test = max(r["largest_at_error"] for r in runs)
            margin = (
                f"largest flip − control {max(r['largest_excess'] for r in runs):.2f}; "
                f"of a test at error {at_error:.2f}, {test}"
            )
            print(f"{head} | | {len(runs)} | | | | {sum(fails)}/{len(runs)} ({margin}) {tail}")
            figures.append(
                row("audit_detection", f"false alarms, clean {c.source} {c.size}px {c.model}",
                    f"{sum(fails)}/{len(runs)}", margin)
            )  # fmt: skip
            continue
        learned = [r for r in runs if r["learned"]]
        first = sum(r["verdict"] == "fail" and r["named"] for r in learned)
        among = sum(r["verdict"] == "fail" and r["among"] for r in learned)
        ignored = sum(r["verdict"] == "fail" for r in runs if not r["learned"])
        print(
            f"{head} | {c.fraction:g} | {len(runs)} | {len(learned)} | {first}/{len(learned)} "
            f"| {among}/{len(learned)} | {ignored}/{len(runs) - len(learned)} {tail}"
        )
        figures.append(
            row(
                "audit_detection", f"{c.cue} cue caught and named first, {c.source} {c.size}px {c.model} "
                f"prevalence {c.fraction:g}", f"{first}/{len(learned)}",
                f"{len(learned)} of {len(runs)} models learned the cue",
            )
        )  # fmt: skip
    return figures + [_unjudged_row(c, runs) for c, runs in rows]


def _unjudged_row(c: Cell, runs: list[dict]) -> dict:
    """A cell's "could not judge" JSON row, after every row the table had before: their order kept."""
    inconclusive, underpowered = could_not_judge(runs)
    cue = f"{c.cue} prevalence {c.fraction:g}" if c.cue != "none" else "clean"
    return row(
        "audit_detection", f"could not judge, {cue} {c.source} {c.size}px {c.model}",
        f"{inconclusive} inconclusive", f"{underpowered} with underpowered warnings",
    )  # fmt: skip


def _throughput_table(model: Path, prepared: Path, n: int, threads: int) -> list[dict]:
    """Time saliency on the first run's model, print the throughput table; its figures as JSON rows."""
    package_n = {m: n if m != "scorecam" else min(n, 32) for m in PACKAGE_CAMS}  # its Score-CAM is slow
    print(
        f"\n{n} images, batches of 64, {threads} thread(s); the grad-cam package's Score-CAM on the "
        f"first {package_n['scorecam']} only (slow per image)\n\n"
        "| method | batched (img/s) | ours one at a time (img/s) | speed-up | grad-cam package one at a time "
        "(img/s) | speed-up |\n| --- | --- | --- | --- | --- | --- |"
    )
    figures = []
    for method in PACKAGE_CAMS:
        batched, single, package = throughput(model, prepared, method, n, 64, package_n[method])
        print(
            f"| {method} | {batched:.0f} | {single:.0f} | {batched / single:.1f}x | {package:.1f} "
            f"| {batched / package:.1f}x |",
            flush=True,
        )
        for figure, baseline, rate in (
            (f"batched {method} saliency", f"one image at a time {single:.0f} img/s", single),
            (
                f"batched {method} saliency vs the grad-cam package",
                f"grad-cam package one image at a time {package:.1f} img/s ({package_n[method]} images)",
                package,
            ),
        ):
            ratio = batched / rate
            figures.append(
                row("audit_detection", figure, f"{batched:.0f} img/s", baseline, ratio, ">= 5x", ratio >= 5)
            )
    return figures


def main() -> None:
    """Detection and false alarms over the selected grid and seeds, then saliency throughput."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sources", nargs="+", default=["digits", "faces"], choices=SOURCES)
    parser.add_argument(
        "--per-class",
        type=int,
        default=60,
        help=f"digits and scenes per class (faces: all 200; photos: {PLANTED_PHOTO_CROPS} crops)",
    )
    parser.add_argument("--cues", nargs="+", default=list(CUES), choices=CUES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32], help="image sides, e.g. 32 64 224")
    parser.add_argument("--models", nargs="+", default=["convnet"], help="train.model values, e.g. resnet18")
    parser.add_argument(
        "--fractions", nargs="+", type=float, default=[0.9], help="prevalences, e.g. 0.3 0.6 0.9"
    )
    parser.add_argument(
        "--leakage", type=float, default=0.0, help="share of other classes' images with the cue"
    )
    parser.add_argument(
        "--confound", type=float, default=0.0, help="share of the cued class showing another's object"
    )
    parser.add_argument("--epochs", type=int, default=0, help="0: 4 on digits, 25 on faces, 8 on RGB sets")
    parser.add_argument("--throughput-images", type=int, default=256, help="0 skips the throughput table")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    base = Path(tempfile.mkdtemp(prefix="audit-bench-"))  # one folder per run: MLflow caches each store
    rows = _detection_runs(args, base)
    first = rows[0][1][0]
    figures = _detection_table(rows)
    if args.throughput_images:
        figures += _throughput_table(first["model"], first["prepared"], args.throughput_images, args.threads)
    write_json(args.json, figures)
    shutil.rmtree(base)


if __name__ == "__main__":
    main()
