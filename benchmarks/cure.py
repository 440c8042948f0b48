"""What the cure buys and what it costs: per planted cue kind and seed, through the real stages.

For each cue kind and seed this plants the cue in digits (seed s plants in class s; the seed also
draws the cue's place, size and intensity), runs the real validate, prepare, train, evaluate and
audit stages, and, when the audit fails, `cnnops cure` (which trains, evaluates, re-audits, exports
and releases the cured model). Beside it, in the same run, a model trained on the clean copy of the
same digits with the same seed and epochs: the baseline the accuracies are read against. Per run:

- learned: the planted cue drawn into other classes' test images flips at least 20% of them to the
  cued class (`planted.cue_flip_rate`, the ground truth the audit never sees), before and after;
- the audit's verdict before, the re-audit's after, and the cure's status;
- test accuracy before and after, and on the clean originals of the test images
  (`planted.clean_accuracy`) for the failed, the cured and the clean model;
- the cure's rounds (`cure.rounds`, params.yaml's) and its training time, all rounds together,
  over the original model's (both from their train reports).

`--mode retrain finetune` cures each failed model once per `cure.mode`, all from the same failed
pipeline (its model, audit and clean baseline), each into its own checkpoint and reports; the
table has a row per cue kind and mode.

`--cure-epochs-factor 2` trains the cure twice the original's epochs and measures a clean model
trained as long beside the one trained as long as the original (does a longer cure close the
clean-accuracy gap, or does the clean model gain as much?).

The cue settings are those the proof tests (tests/test_cure.py, tests/test_audit_v2.py) use to make
the 32-px ConvNet learn the cue: a random-place tag, a text line and a blur carry a 40% label
confound and train 8 epochs. Not a test: slow (minutes a run on 2 CPU cores); its table goes to
docs/audit.md ("Cure benchmark"). `--budget-minutes` starts no new run past that time, seeds
outermost, so a cut run still covers every kind.

    .venv/bin/python benchmarks/cure.py --seeds 5
    .venv/bin/python benchmarks/cure.py --seeds 1 --kinds corner tint
    .venv/bin/python benchmarks/cure.py --seeds 2 --mode retrain finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from figures import add_json_argument, row, write_json

from cnnops.config import CureParams, Params, parse_params
from cnnops.data.planted import CueSpec, clean_accuracy, cue_flip_rate, make_planted
from cnnops.data.splits import PreparedSplit
from cnnops.models import load_classifier
from cnnops.stages import audit, cure, evaluate, prepare, train, validate

LEARNED = 0.2  # the detection benchmark's "learned": the cue alone flips this share of other classes
MODES = get_args(CureParams.model_fields["mode"].annotation)  # cure.mode's choices, as params.yaml's


@dataclass(frozen=True)
class Kind:
    """A cue kind as the proofs plant it: its make_planted arguments and the epochs it trains."""

    cue: str
    epochs: int = 4
    args: dict[str, Any] = field(default_factory=dict)


KINDS = {
    "corner": Kind("corner"),
    "frame": Kind("frame"),
    "tint": Kind("tint", args={"intensity": 90}),
    "tag": Kind("tag", 8, {"intensity": 255, "size": 5, "confound": 0.4}),
    "textline": Kind("textline", 8, {"intensity": 255, "confound": 0.4}),
    "noise": Kind("noise"),
    "blur": Kind("blur", 8, {"confound": 0.4}),
}


def params_for(
    root: Path, seed: int, epochs: int, cure_epochs: int | None = None, mode: str = "retrain"
) -> Params:
    """The proofs' params (tests/fixtures_audit.case_params) at `seed`, the cure enabled in `mode`;
    both train `epochs` unless `cure_epochs` says the cure's."""
    return parse_params(
        {
            "base": {"seed": seed},
            "data": {"color_mode": "L", "near_duplicate_distance": 0},
            "prepare": {"image_size": [32, 32]},
            "train": {
                "model": "convnet", "epochs": epochs, "batch_size": 32, "label_smoothing": 0.0,
                "early_stopping_patience": None, "augment": {"random_resized_crop": False},
            },
            "audit": {"methods": ["gradcam"]},
            "cure": {"enabled": True, "epochs": cure_epochs or epochs, "rate": 0.5, "mode": mode},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "art")},
        },
        "cure benchmark",
    )  # fmt: skip


def pipeline(root: Path, params: Params, with_audit: bool) -> dict[str, Any]:
    """validate, prepare, train, evaluate (and audit) on `root / 'data'`; their outputs' figures."""
    r = root / "reports"
    validate.run(params, validate.ValidatePaths(root / "data", r / "validation.json", r / "docs"))
    prepare.run(params, prepare.PreparePaths(root / "data", root / "prepared", r / "prepare.json"))
    trained = train.run(params, train.TrainPaths(
        prepared=root / "prepared", model=root / "models" / "model.pt", report=r / "train.json",
        history=r / "history.csv", curves=r / "history.png", state=root / ".cnnops" / "state.pt",
    ))  # fmt: skip
    metrics = evaluate.run(params, evaluate.EvaluatePaths(
        model=root / "models" / "model.pt", prepared=root / "prepared", train_report=r / "train.json",
        metrics=r / "metrics.json", confusion=r / "plots" / "confusion.csv",
        confusion_png=r / "plots" / "confusion.png",
    )).metrics  # fmt: skip
    verdict = None
    if with_audit:
        verdict = audit.run(params, audit.AuditPaths(
            model=root / "models" / "model.pt", prepared=root / "prepared", train_report=r / "train.json",
            validation=r / "validation.json", data=root / "data", report=r / "audit.json",
            gallery=r / "audit",
        )).report.decision.verdict  # fmt: skip
    return {"train_s": trained.report["train_seconds"], "accuracy": metrics["accuracy"], "verdict": verdict}


def cure_paths(root: Path, mode: str) -> cure.CurePaths:
    """The stage's paths for a cure in `mode`: the failed pipeline's inputs, outputs of the mode's own
    (so each mode's cure starts from the same failed model and resumes none of another's)."""
    r = root / "reports"
    return cure.CurePaths(
        audit_report=r / "audit.json", model=root / "models" / "model.pt", train_report=r / "train.json",
        metrics=r / "metrics.json", prepared=root / "prepared", validation=r / "validation.json",
        data=root / "data", out=root / "models" / f"cured-{mode}" / "model.pt",
        report=r / f"cure-{mode}.json", folder=r / f"cure-{mode}", state=root / ".cnnops" / f"cure-{mode}.pt",
        project=root,
    )  # fmt: skip


def ground_truth(model_path: Path, root: Path, spec: CueSpec, clean: PreparedSplit) -> tuple[float, float]:
    """(cue flips, accuracy on the clean originals of the test images) of the model at `model_path`."""
    model, _ = load_classifier(model_path)
    test = PreparedSplit.load(root / "prepared", "test")
    return cue_flip_rate(model, test, spec), clean_accuracy(model, test, clean)[0]


Baselines = dict[tuple[int, int], dict[str, Any]]  # (seed, epochs) -> the clean model's figures


def clean_model(base: Path, seed: int, epochs: int, cache: Baselines) -> dict[str, Any]:
    """The baseline at (`seed`, `epochs`): a model trained on clean digits, once a run."""
    if (seed, epochs) not in cache:
        root = base / f"clean-{seed}-{epochs}"
        make_planted(root / "data", "none", None, source="digits", seed=seed, image_size=32, per_class=60)
        figures = pipeline(root, params_for(root, seed, epochs), with_audit=False)
        figures["model"], figures["test"] = load_classifier(root / "models" / "model.pt")[0], root
        cache[(seed, epochs)] = figures
    return cache[(seed, epochs)]


def one_run(
    root: Path, name: str, seed: int, baseline: dict[str, Any], long: dict[str, Any] | None,
    factor: int, modes: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Plant `name` at `seed`, run the pipeline and, when the audit fails, cure that one failed model
    in each of `modes` (`factor` x the epochs); a row of figures per mode. `long`: the clean model
    trained as long as the cure (None: factor 1)."""
    kind = KINDS[name]
    spec = make_planted(
        root / "data", kind.cue, str(seed % 10), source="digits", seed=seed, image_size=32, per_class=60,
        **kind.args,
    )  # fmt: skip
    before = pipeline(root, params_for(root, seed, kind.epochs), with_audit=True)
    clean = PreparedSplit.load(baseline["test"] / "prepared", "test")
    flips, clean_acc = ground_truth(root / "models" / "model.pt", root, spec, clean)
    test = PreparedSplit.load(root / "prepared", "test")
    out = {
        "kind": name, "seed": seed, "cls": spec.cued_class, "learned": flips >= LEARNED, "flips": flips,
        "verdict": before["verdict"], "accuracy": before["accuracy"], "clean_accuracy": clean_acc,
        "baseline_clean_accuracy": clean_accuracy(baseline["model"], test, clean)[0],
        "train_s": before["train_s"], "status": "not run (audit did not fail)",
        **({"long_clean_accuracy": clean_accuracy(long["model"], test, clean)[0]} if long else {}),
    }  # fmt: skip
    if before["verdict"] != "fail":
        return [{**out, "mode": mode} for mode in modes]
    cure_params = [params_for(root, seed, kind.epochs, factor * kind.epochs, mode) for mode in modes]
    return [{**out, "mode": p.cure.mode, **cured(root, p, spec, clean)} for p in cure_params]


def cured(root: Path, params: Params, spec: CueSpec, clean: PreparedSplit) -> dict[str, Any]:
    """`cnnops cure` in `params`' cure.mode on the failed model at `root`; the cured model's figures."""
    paths = cure_paths(root, params.cure.mode)
    started = time.perf_counter()
    report = cure.run(params, paths).report
    cured_flips, cured_clean = ground_truth(paths.out, root, spec, clean)
    return {
        "status": report["status"], "cure_s": time.perf_counter() - started,
        "cure_train_s": sum(r["train_seconds"] for r in report["rounds"]), "rounds": len(report["rounds"]),
        "reaudit": report["after"]["audit_verdict"],
        "cured_flips": cured_flips, "cured_accuracy": report["after"]["accuracy"],
        "cured_clean_accuracy": cured_clean,
    }  # fmt: skip


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def _long(runs: list[dict[str, Any]]) -> str:
    """The clean model trained as long as the cure (`--cure-epochs-factor` above 1), else nothing."""
    return (
        f" (as long as the cure: {_median(runs, 'long_clean_accuracy'):.3f})"
        if "long_clean_accuracy" in runs[0]
        else ""
    )


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print the per-kind table; its figures as JSON rows."""
    print(
        "\n| cue | `cure.mode` | runs | learned | audit `fail` | cured (re-audit `pass`) "
        "| cue flips before → after (medians over the runs whose audit failed) "
        "| test accuracy before → after | clean-image accuracy failed → cured / clean model "
        "| rounds per cure "
        "| cure training time / original |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    figures = []
    for name, mode in dict.fromkeys((r["kind"], r["mode"]) for r in runs):
        mine = [r for r in runs if (r["kind"], r["mode"]) == (name, mode)]
        failed = [r for r in mine if "reaudit" in r]
        cured = [r for r in failed if r["status"] == "cured"]
        head = (
            f"| {name} | {mode} | {len(mine)} | {sum(r['learned'] for r in mine)} | {len(failed)} "
            f"| {len(cured)}/{len(failed)}"
        )
        if not failed:
            print(f"{head} | | | | | |")
            continue
        ratio = _median(failed, "cure_train_s") / _median(failed, "train_s")
        rounds = ",".join(str(r["rounds"]) for r in failed)
        gap = _median(failed, "cured_clean_accuracy") - _median(failed, "baseline_clean_accuracy")
        print(
            f"{head} | {_median(failed, 'flips'):.2f} → {_median(failed, 'cured_flips'):.2f} "
            f"| {_median(failed, 'accuracy'):.3f} → {_median(failed, 'cured_accuracy'):.3f} "
            f"| {_median(failed, 'clean_accuracy'):.3f} → {_median(failed, 'cured_clean_accuracy'):.3f} / "
            f"{_median(failed, 'baseline_clean_accuracy'):.3f}{_long(failed)} | {rounds} | {ratio:.2f}x |",
            flush=True,
        )
        label = f"{name} cue, cure.mode {mode}"
        figures += [
            row("cure", f"{label}: cured (re-audit pass, cue flips < 0.05)",
                f"{sum(r['cured_flips'] < 0.05 for r in cured)}/{len(failed)}",
                f"{len(failed)} of {len(mine)} audits failed"),
            row("cure", f"{label}: clean-image accuracy of the cured model (median)",
                f"{_median(failed, 'cured_clean_accuracy'):.3f}",
                f"clean model {_median(failed, 'baseline_clean_accuracy'):.3f} (gap {gap:+.3f})"),
            row("cure", f"{label}: cure training time", f"{_median(failed, 'cure_train_s'):.1f} s",
                f"original training {_median(failed, 'train_s'):.1f} s", ratio),
        ]  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--budget-minutes", type=float, default=0.0, help="0: no limit")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--cure-epochs-factor", type=int, default=1,
        help="the cure trains this many times the original's epochs; above 1 a clean model trained as "
        "long is measured too (long_clean_accuracy)",
    )  # fmt: skip
    parser.add_argument(
        "--mode", nargs="+", default=["retrain"], choices=MODES,
        help="cure.mode(s): each failed model is cured once per mode, from the same failed pipeline",
    )  # fmt: skip
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    base = Path(tempfile.mkdtemp(prefix="cure-bench-"))
    started, runs = time.monotonic(), []
    baselines: Baselines = {}
    for seed in range(args.seeds):
        for name in args.kinds:
            if args.budget_minutes and time.monotonic() - started > args.budget_minutes * 60:
                print(
                    f"  budget of {args.budget_minutes:g} min spent: seed {seed} {name} not run", flush=True
                )
                continue
            epochs, factor = KINDS[name].epochs, args.cure_epochs_factor
            baseline = clean_model(base, seed, epochs, baselines)
            long = clean_model(base, seed, factor * epochs, baselines) if factor > 1 else None
            for r in one_run(base / f"{name}-{seed}", name, seed, baseline, long, factor, args.mode):
                runs.append(r)
                rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                print("  " + json.dumps(rounded), flush=True)
    write_json(args.json, table(runs))
    shutil.rmtree(base)


if __name__ == "__main__":
    main()
