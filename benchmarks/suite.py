"""Run every benchmark in benchmarks/ and write their figures as one table to docs/benchmarks.md.

Every `benchmarks/*.py` except the `figures` helper is run in its own process with `--json FILE`
(see benchmarks/figures.py); its rows (figure, value, baseline, ratio, target) are put together
with a description of this machine. A benchmark that fails is named in the table and makes the
exit status 1: its figures are missing, never guessed. `--quick` runs each with small settings
(minutes on 2 CPU cores); the default runs the commands given in docs/audit.md, docs/export.md,
docs/training.md and docs/data.md. The figures of every run are kept in docs/benchmarks.json, so
`--only NAME` replaces that benchmark's figures and keeps the others' with the run that made them.

    benchmarks/run_all --quick            # then read docs/benchmarks.md
    benchmarks/run_all --only onnx_latency --out /tmp/bench.md

`benchmarks/run_all` runs this file with the project's venv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent

# Arguments per benchmark: (full, quick). A benchmark missing here runs with no arguments. One
# intra-op thread for the timings: on a shared 2-core machine two threads measure the contention.
ARGS: dict[str, tuple[str, str]] = {
    "onnx_latency": (
        "--models convnet resnet18 --sizes 32 224 --runs 100 --threads 1",
        "--models convnet resnet18 --sizes 32 224 --runs 30 --batch 8 --threads 1",
    ),
    "train_throughput": ("--epochs 4 --threads 1", "--epochs 2 --threads 1"),
    "gpu_precision": ("--model resnet18 --size 224 --batch 64 --steps 20", "--steps 10 --rounds 2"),
    "scale": (
        "--sizes 2000 10000 20000 --hashes 100000 --audit-per-class 100",
        "--sizes 500 1000 2000 --hashes 20000 --audit-per-class 5",
    ),
    "audit_detection": (
        "--seeds 5 --sources digits faces",
        "--seeds 1 --sources digits --cues corner none --per-class 40 --throughput-images 128",
    ),
    "cure": ("--seeds 5 --budget-minutes 55", "--seeds 1 --kinds corner tint"),  # 2 CPU cores: what fits
}
NO_GPU_NOTE = [
    "",
    "This machine has no GPU: the CUDA figures (gpu_precision: AMP and channels_last against float32;",
    "onnx_latency: ONNX Runtime's CUDA provider) were not measured. Run `benchmarks/run_all` on a",
    "machine with a GPU to get them.",
]
QUICK_NOTE = [
    "`--quick` runs few seeds, epochs and timed runs: the detection counts come from one seed per cue",
    "and are a smoke check of the suite, not detection rates (docs/audit.md has the 5-seed table).",
]
HELPERS = {"figures", "suite"}  # modules of the suite, not benchmarks


def machine() -> tuple[str, str]:
    """(short, long): CPU model and cores, GPU if torch sees one; long adds the versions that matter."""
    import onnxruntime
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    short = f"{cpu}, {os.cpu_count()} cores, {gpu}"
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return short, f"{short}; {versions}; load average at the start {load} (1, 5, 15 min)"


def run_one(name: str, args: list[str], out: Path) -> tuple[list[dict[str, Any]], str]:
    """Run benchmarks/<name>.py with --json, its output passed through to this terminal; returns its
    rows and the outcome for the runs table (with its last line when it gave no figure)."""
    command = [sys.executable, "-u", str(HERE / f"{name}.py"), *args, "--json", str(out)]
    print(f"\n### {name}: {shlex.join(command[2:])}", flush=True)
    started = time.monotonic()
    last = ""
    with subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout or ():
            print(line, end="", flush=True)
            last = line.strip() or last
    took = f"{time.monotonic() - started:.0f} s"
    if proc.returncode != 0 or not out.exists():
        return [], f"failed (exit {proc.returncode}) after {took}"
    rows = json.loads(out.read_text())
    return rows, f"{len(rows)} figures in {took}" + ("" if rows else f": {last}")


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| benchmark | figure | value | baseline | ratio | target | met | machine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3g}x"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        cells = [
            r["benchmark"],
            r["figure"],
            r["value"],
            r["baseline"],
            ratio,
            r["target"],
            met,
            r["machine"],
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return lines


def merged(store: Path, fresh: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The runs kept in `store` (docs/benchmarks.json) with this invocation's runs replacing theirs:
    rerunning one benchmark keeps the others' figures, each with the run that measured it."""
    kept = json.loads(store.read_text())["runs"] if store.exists() else {}
    return {**kept, **fresh}


def render(runs: dict[str, dict[str, Any]]) -> list[str]:
    rows = [r for name in sorted(runs) for r in runs[name]["rows"]]
    no_gpu = any("no GPU" in run["machine"] for run in runs.values())
    quick = [name for name, run in sorted(runs.items()) if run["quick"]]
    return [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all` (do not edit by hand; the figures are also in",
        "docs/benchmarks.json): every figure was measured against a baseline measured in the same run,",
        "the run named for its benchmark in the runs table below; a ratio from another machine or",
        "another run is not comparable. `benchmarks/run_all --only NAME` reruns one benchmark and keeps",
        "the others' figures with their own runs.",
        *NO_GPU_NOTE * no_gpu,
        "",
        *table(rows),
        "",
        "Each benchmark's docstring says what it measures; the detailed tables are in docs/audit.md",
        "(audit_detection, cure), docs/export.md (onnx_latency), docs/training.md (train_throughput) and",
        "docs/data.md (scale).",
        *[*QUICK_NOTE, f"Run with `--quick`: {', '.join(quick)}."] * bool(quick),
        "",
        "## Runs",
        "",
        "| benchmark | arguments | outcome | date | code | machine |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {name} | `{shlex.join(r['args']) or '(none)'}` | {r['outcome']} | {r['date']} "
            f"| git {r['code']} | {r['machine']} |"
            for name, r in sorted(runs.items())
        ),
        "",
    ]


def main() -> int:
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in HELPERS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings: minutes on 2 CPU cores")
    parser.add_argument("--only", nargs="+", choices=found, default=found, help="benchmarks to run")
    parser.add_argument("--out", type=Path, default=PROJECT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    revision = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()
    fresh: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cnnops-bench-") as tmp:
        for name in args.only:
            full, quick = ARGS.get(name, ("", ""))
            chosen = shlex.split(quick if args.quick else full)
            short, label = machine()  # the load average at this benchmark's start
            started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            rows, outcome = run_one(name, chosen, Path(tmp) / f"{name}.json")
            fresh[name] = {
                "args": chosen,
                "outcome": outcome,
                "date": started,
                "code": revision,
                "machine": label,
                "quick": args.quick,
                "rows": [{**r, "machine": short} for r in rows],
            }
    store = args.out.with_suffix(".json")
    runs = merged(store, fresh)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    args.out.write_text("\n".join(render(runs)))
    print(f"\nwrote {args.out} and {store}")
    return 1 if any(outcome.startswith("failed") for outcome in (r["outcome"] for r in fresh.values())) else 0


if __name__ == "__main__":
    sys.exit(main())
