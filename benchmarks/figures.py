"""The machine-readable side of every benchmark: `--json FILE` writes its figures as rows.

Each benchmark keeps printing its own human table; with `--json FILE` it also writes a JSON list
of rows that `benchmarks/run_all` puts into one table (docs/benchmarks.md) without scraping text.
A row is one figure against its baseline, measured in the same run:

    {"benchmark": "onnx_latency", "figure": "...", "value": "0.21 ms", "baseline": "eager 0.45 ms",
     "ratio": 2.14, "target": ">= 1.5x", "met": true}

`ratio` is a float or null (a count such as "4/5 caught" has none); `met` is null without a target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON rows here")


def row(
    benchmark: str,
    figure: str,
    value: str,
    baseline: str = "",
    ratio: float | None = None,
    target: str = "",
    met: bool | None = None,
) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "figure": figure,
        "value": value,
        "baseline": baseline,
        "ratio": None if ratio is None else round(float(ratio), 3),
        "target": target,
        "met": met,
    }


def write_json(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Write the rows when `--json` was given (a no-op otherwise)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
