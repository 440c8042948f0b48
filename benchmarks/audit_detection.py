"""How often the audit catches a planted shortcut, how often it cries wolf, and what batching buys.

For each cue kind (and clean data) and each seed, this writes a planted copy of the digits or the
lfw faces with `cnnops.data.planted`, runs the real prepare, train and audit stages on it, and counts:

- detection: the verdict is `fail` and the worst failure names the cued class ("named first"), or
  the cued class is among the failed classes ("among failed"; with two classes, removing a cue
  from the cued class's images is also a cue for the other class, which may then come first);
- false alarm: the verdict is `fail` on clean data.

A planted cue is not always a learned one: when the digit alone is easy, the model may ignore it.
So each run also measures the ground truth the audit does not see: the planted cue itself drawn
into other classes' test images, and the share then predicted as the cued class ("cue flips").
A run counts as "learned" when that share reaches the audit's transplant threshold.

On clean data it also reports the largest transplant flip rate minus control of any class: the
margin left under the threshold. It then times saliency on the same model in batches against two
one-image-at-a-time loops: our own function on one image, and the grad-cam package's CAMs. Seeds
move the cue's position, size, intensity and class. Not a test: slow; its numbers go to docs/audit.md.

    .venv/bin/python benchmarks/audit_detection.py --seeds 5 --sources digits faces
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import torch
from figures import add_json_argument, row, write_json
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cnnops.audit.contract import AuditReport
from cnnops.audit.saliency import find_target_layer, saliency_fn
from cnnops.config import parse_params
from cnnops.data.planted import CUES, CueSpec, make_planted, plant
from cnnops.data.splits import PreparedSplit
from cnnops.models import load_classifier
from cnnops.stages import audit, prepare, train

CLASSES = {"digits": [str(d) for d in range(10)], "faces": ["face", "nonface"]}


def one_run(root: Path, source: str, cue: str, seed: int, per_class: int, epochs: int) -> dict:
    """Plant, prepare, train and audit; returns the verdict and whether it names the cued class."""
    cls = CLASSES[source][seed % len(CLASSES[source])] if cue != "none" else None
    spec = make_planted(root / "data", cue, cls, source=source, seed=seed, per_class=per_class or None)
    params = parse_params(
        {
            "base": {"seed": seed},
            "data": {"color_mode": "L", "near_duplicate_distance": 0},
            "prepare": {"image_size": [32, 32]},
            "train": {
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
        model=tp.model, prepared=root / "prepared", train_report=tp.report, validation=None, data=None,
        report=root / "audit.json", gallery=root / "audit",
    )  # fmt: skip
    report = audit.run(params, paths).report
    decision = report.decision
    worst = decision.failures[0] if decision.failures else None
    return {
        "cue_flips": cue_flip_rate(tp.model, root / "prepared", spec) if cls else 0.0,
        "spec": spec,
        "verdict": decision.verdict,
        "named": worst is not None and worst.class_name == cls,
        "among": cls in decision.failed_classes,
        "worst": worst.sentence if worst else "",
        "largest_excess": largest_excess(report),
        "model": tp.model,
        "prepared": root / "prepared",
    }


def largest_excess(report: AuditReport) -> float:
    """The largest transplant flip rate minus its control over every class: the margin to the threshold."""
    return max(t.excess for figures in report.classes.values() for _, _, t in figures.transplants())


def cue_flip_rate(model_path: Path, prepared: Path, spec: CueSpec) -> float:
    """Share of other classes' test images (correctly classified) that the planted cue flips to its class."""
    model, _ = load_classifier(model_path)
    test = PreparedSplit.load(prepared, "test")
    cls = test.class_names.index(str(spec.cued_class))
    others = test.images[test.labels != cls][:, 0].numpy()
    rng = np.random.default_rng(0)
    cued = np.stack([plant(im, spec.cue, spec.position, spec.size, spec.intensity, rng) for im in others])
    with torch.no_grad():
        before = model(torch.from_numpy(others)[:, None].float() / 255).argmax(1)
        after = model(torch.from_numpy(cued)[:, None].float() / 255).argmax(1)
    keep = before != cls
    return float((after[keep] == cls).float().mean()) if keep.any() else 0.0


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


def _detection_runs(args: argparse.Namespace, base: Path) -> list[tuple[str, str, list[dict]]]:
    """Every (source, cue) with its runs, one per seed, each printed as it ends (they take minutes)."""
    threshold = parse_params({}).audit.transplant_flip_threshold
    rows = []
    for source in args.sources:
        for cue in args.cues:
            runs = []
            for seed in range(args.seeds):
                per_class = args.per_class if source == "digits" else 0
                epochs = 4 if source == "digits" else 25
                r = one_run(base / f"{source}-{cue}-{seed}", source, cue, seed, per_class, epochs)
                r["learned"] = r["cue_flips"] >= threshold
                runs.append(r)
                s = r["spec"]
                print(
                    f"  {source} {cue} seed {seed} class {s.cued_class} {s.position} size {s.size} "
                    f"intensity {s.intensity}: cue flips {r['cue_flips']:.2f}, {r['verdict']} "
                    f"{r['worst'][:100]}",
                    flush=True,
                )
            rows.append((source, cue, runs))
    return rows


def _detection_table(rows: list[tuple[str, str, list[dict]]]) -> list[dict]:
    """Print the detection table; its figures as JSON rows."""
    print(
        "\n| data | cue | runs | model learned the cue | caught, named first | caught, among failed "
        "| `fail` on a cue the model ignores / on clean data |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    figures = []
    for source, cue, runs in rows:
        fails = [r["verdict"] == "fail" for r in runs]
        if cue == "none":
            margin = f"largest flip − control {max(r['largest_excess'] for r in runs):.2f}"
            print(f"| {source} | none (clean) | {len(runs)} | | | | {sum(fails)}/{len(runs)} ({margin}) |")
            figures.append(
                row("audit_detection", f"false alarms, clean {source}", f"{sum(fails)}/{len(runs)}", margin)
            )
            continue
        learned = [r for r in runs if r["learned"]]
        first = sum(r["verdict"] == "fail" and r["named"] for r in learned)
        among = sum(r["verdict"] == "fail" and r["among"] for r in learned)
        ignored = sum(r["verdict"] == "fail" for r in runs if not r["learned"])
        print(
            f"| {source} | {cue} | {len(runs)} | {len(learned)} | {first}/{len(learned)} "
            f"| {among}/{len(learned)} | {ignored}/{len(runs) - len(learned)} |"
        )
        figures.append(
            row(
                "audit_detection", f"{cue} cue caught and named first, {source}", f"{first}/{len(learned)}",
                f"{len(learned)} of {len(runs)} models learned the cue",
            )
        )  # fmt: skip
    return figures


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
    """Detection and false alarms over every source, cue and seed, then saliency throughput."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sources", nargs="+", default=["digits", "faces"], choices=sorted(CLASSES))
    parser.add_argument("--per-class", type=int, default=60, help="digits per class (faces: all 200)")
    parser.add_argument("--cues", nargs="+", default=list(CUES), choices=CUES)
    parser.add_argument("--throughput-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    base = Path(tempfile.mkdtemp(prefix="audit-bench-"))  # one folder per run: MLflow caches each store
    rows = _detection_runs(args, base)
    first = rows[0][2][0]
    figures = _detection_table(rows)
    figures += _throughput_table(first["model"], first["prepared"], args.throughput_images, args.threads)
    write_json(args.json, figures)
    shutil.rmtree(base)


if __name__ == "__main__":
    main()
