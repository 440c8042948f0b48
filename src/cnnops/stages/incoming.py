"""`cnnops check-incoming`: a batch of new images, checked before retrain lets it near data/.

Every file gets validate's per-file checks (the data contract's decode, format, mode, size, at
`validate.severity`) and three of its own, always errors: its class is a class of data/, its bytes
are new (not in data/ under another name, not twice in the batch), and its name is not taken in data/
by other bytes. A file already in data/ with the same bytes (merged by a run stopped before it cleared
the folder) is good and not new. Then the good new files' image properties are compared with the
training data's by a GX suite built from the reference (`cnnops.data.drift`): one KL divergence per
property. The report lists what the flow may merge (`good`); this stage never moves a file.

`orchestrate.on_bad_incoming` says whether a bad file fails the check (fail: nothing is merged) or is
left behind (skip); drift above `orchestrate.max_drift` in any property always fails it. Not a DVC
stage: the incoming folder is not versioned data. The retrain flow runs it before merging.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cnnops import atomic
from cnnops.config import Params
from cnnops.data import drift
from cnnops.data.digest import file_sha256
from cnnops.data.folder import FolderScan, ImageRecord, scan_image_folder
from cnnops.data.manifest import describe
from cnnops.errors import ValidationFailed
from cnnops.stages import validate
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args

log = logging.getLogger(__name__)

OWN_CHECKS = ("class", "duplicate", "name_taken")  # always errors: such a file is never merged
REASONS = {  # a failed check's value in words (decodes: the contract's own message)
    "format": "format {value} is not in validate.allowed_formats",
    "mode": "mode {value} is not in validate.allowed_modes",
    "size": "{column} {value} px is outside validate's min/max_{column}",
    "class": "new class {value!r}: data/ has no such class folder (create it by hand to add a class)",
    "duplicate": "the same bytes as {value}",
    "name_taken": "{value} already exists with other bytes; rename the incoming file",
}


@dataclass(frozen=True)
class IncomingPaths:
    """The stage's inputs and its report (the paths the retrain flow gives the CLI)."""

    incoming: Path = path_arg("incoming", "folder of new <class>/<image> files", POSITIONAL)
    data: Path = path_arg("data", "the data folder the batch would join")
    prepared: Path = path_arg("prepared", "prepared splits: the train split is the drift reference")
    validation: Path = path_arg(
        "reports/validation.json", "validate's report: sizes and modes of the train files"
    )
    report: Path = path_arg("reports/incoming.json", "JSON report")


@dataclass(frozen=True)
class IncomingResult:
    report: dict[str, Any]  # what `paths.report` holds
    good: list[str]  # paths under the incoming folder the flow may merge
    bad: list[str]  # paths that stay where they are


def run(params: Params, paths: IncomingPaths = IncomingPaths()) -> IncomingResult:
    """Check `paths.incoming` against `paths.data` and the training data; write the report, then raise
    on bad files (in fail mode) or drift past max_drift, naming them."""
    records, bad = _incoming_records(paths.incoming)
    data = scan_image_folder(paths.data, hidden_files=params.data.hidden_files, min_classes=1)
    reference, no_reference = drift.load_reference(paths.prepared, paths.validation, params.data.color_mode)
    df = _batch(records, data, params, reference)
    checks = _file_checks(df, params, data.class_names)
    for record in (r for r in checks if r["success"] is False and r["severity"] == "error"):
        for offending in record["offending"]:
            bad.setdefault(offending["path"], []).append(_reason(record, offending, paths.incoming))
    warnings = [r for r in checks if r["success"] is False and r["severity"] == "warning"]
    good = df[~df["path"].isin(bad)] if len(df) else df
    new = good[~good["already_in_data"]] if len(good) else good
    drift_report = _drift(new, reference, no_reference, params.orchestrate.max_drift)
    report = _report(paths, params, df, good, bad, warnings, drift_report)
    atomic.write_json(paths.report, report, indent=1)
    _refuse(report, paths)
    return IncomingResult(report, report["good"], sorted(bad))


def _incoming_records(incoming: Path) -> tuple[list[ImageRecord], dict[str, list[str]]]:
    """The files of `incoming/<class>/`, and the bad ones of the layout: anything else than a regular
    file in a class folder (links are never followed). Hidden files are skipped with a warning."""
    if not incoming.is_dir():
        raise ValidationFailed(
            f"{incoming}: the incoming folder does not exist; create it or set orchestrate.incoming"
        )
    records, bad = [], {}
    for folder, dirs, names in os.walk(incoming):
        dirs.sort()
        for name in sorted([*names, *(d for d in dirs if (Path(folder) / d).is_symlink())]):
            path = Path(folder) / name
            relpath = path.relative_to(incoming).as_posix()
            if any(part.startswith(".") for part in Path(relpath).parts):
                log.warning("not checking %s: hidden files are not images", path)
            elif not stat.S_ISREG(path.lstat().st_mode):
                bad[relpath] = [
                    f"{path}: not a regular file (a link, pipe or device); replace it with a copy"
                ]
            elif len(Path(relpath).parts) != 2:
                bad[relpath] = [f"{path}: not in a class folder <incoming>/<class>/<image>; move it into one"]
            else:
                records.append(ImageRecord(path=path, relpath=relpath, label=Path(relpath).parts[0]))
    return records, bad


def _batch(
    records: list[ImageRecord], data: FolderScan, params: Params, reference: drift.Reference | None
) -> pd.DataFrame:
    """One row per file, decoded one at a time: validate's manifest entry, what the file is to data/
    (duplicate_of, name_taken, already_in_data) and, with a reference, its brightness and contrast."""
    known = _known_bytes(data, {r.path.stat().st_size for r in records})
    seen: dict[str, str] = {}
    rows = []
    for record in records:
        entry, image = describe(
            record, color_mode=params.data.color_mode, max_pixels=params.data.max_image_pixels
        )
        row: dict[str, Any] = entry.as_dict()
        same = known.get(entry.sha256 or "", [])
        row["already_in_data"] = record.relpath in same
        twin = seen.setdefault(entry.sha256, record.relpath) if entry.sha256 else record.relpath
        row["duplicate_of"] = None
        if same and not row["already_in_data"]:
            row["duplicate_of"] = str(data.root / same[0])
        elif twin != record.relpath:
            row["duplicate_of"] = str(record.path.parent.parent / twin)
        target = data.root / record.relpath
        row["name_taken"] = str(target) if target.exists() and not row["already_in_data"] else None
        if image is not None and reference is not None:
            row |= drift.file_properties(
                record.path, image, entry.mode, reference, params.data.max_image_pixels
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=[*rows[0]] if rows else ["path", "label", "already_in_data"])


def _known_bytes(data: FolderScan, sizes: set[int]) -> dict[str, list[str]]:
    """sha256 -> data/ paths, for the data files of a size some incoming file has: only those can hold
    its bytes, so the rest of data/ is never read."""
    known: dict[str, list[str]] = {}
    for record in data.records:
        if record.path.stat().st_size in sizes:
            known.setdefault(file_sha256(record.path), []).append(record.relpath)
    return known


def _file_checks(df: pd.DataFrame, params: Params, class_names: list[str]) -> list[dict[str, Any]]:
    """validate's per-file expectations and the batch's own, in one GX suite."""
    if df.empty:
        return []
    E = validate.gx_expectations()
    checks = {
        k: v for k, v in validate.expectations(params.validate).items() if k in validate.PER_FILE_CHECKS
    }
    checks["class"] = [E.ExpectColumnValuesToBeInSet(column="label", value_set=class_names)]
    checks["duplicate"] = [E.ExpectColumnValuesToBeNull(column="duplicate_of")]
    checks["name_taken"] = [E.ExpectColumnValuesToBeNull(column="name_taken")]
    severity = params.validate.severity.model_dump() | dict.fromkeys(OWN_CHECKS, "error")
    return validate.run_expectations(df, checks, severity, None, "cnnops_incoming")


def _reason(record: dict[str, Any], offending: dict[str, Any], incoming: Path) -> str:
    column, value = record["kwargs"].get("column"), offending["value"]
    if record["check"] == "decodes":
        return str(value)  # the contract's message names the file and what to do
    text = REASONS[record["check"]].format(column=column, value=value)
    return f"{incoming / offending['path']}: {text}"


def _drift(
    batch: pd.DataFrame, reference: drift.Reference | None, no_reference: str, max_drift: float
) -> dict[str, Any]:
    """KL(batch || training data) per property through GX, against max_drift."""
    if reference is None or batch.empty:
        why = no_reference if reference is None else "no good new file to compare"
        if reference is None:
            log.warning("drift not checked: %s (it is from the next retrain on)", why)
        return {"measured": False, "reason": why, "summary": f"not measured ({why})"}
    E = validate.gx_expectations()
    checks = {
        name: [
            E.ExpectColumnKLDivergenceToBeLessThan(
                column=name, threshold=max_drift, **drift.partition(reference.frame[name], len(batch))
            )
        ]
        for name in drift.PROPERTIES
    }
    records = validate.run_expectations(
        batch[list(drift.PROPERTIES)], checks, dict.fromkeys(checks, "error"), None, "cnnops_drift"
    )
    properties = {}
    for record in records:
        name, score = record["check"], record.get("observed_value")
        numeric = name in drift.NUMERIC
        properties[name] = {
            "kl_divergence": None if score is None else round(float(score), 4),  # None: infinite
            "exceeded": not record["success"],
            "batch": drift.summary(batch[name], numeric),
            "reference": drift.summary(reference.frame[name], numeric),
        }
    report = {
        "measured": True,
        "metric": "KL divergence (nats) of the batch's distribution from the train split's",
        "max_drift": max_drift,
        "batch_files": len(batch),
        "reference_files": len(reference.frame),
        "properties": properties,
        "exceeded": [name for name, p in properties.items() if p["exceeded"]],
    }
    report["summary"] = describe_drift(report)
    return report


def _report(
    paths: IncomingPaths,
    params: Params,
    df: pd.DataFrame,
    good: pd.DataFrame,
    bad: dict[str, list[str]],
    warnings: list[dict[str, Any]],
    drift_report: dict[str, Any],
) -> dict[str, Any]:
    mode = params.orchestrate.on_bad_incoming
    refused = bool(drift_report.get("exceeded")) or (bool(bad) and mode == "fail")
    return {
        "success": not refused,
        "incoming": str(paths.incoming),
        "on_bad_incoming": mode,
        "n_files": len(df) + len(set(bad) - set(df["path"])),
        "good": [] if refused else sorted(good["path"]),
        "new": 0 if refused else int((~good["already_in_data"]).sum()),
        "bad": [{"path": p, "reasons": bad[p]} for p in sorted(bad)],
        "warnings": [
            {"check": w["check"], "files": w["files"], "expectation": w["expectation"]} for w in warnings
        ],
        "drift": drift_report,
    }


def _refuse(report: dict[str, Any], paths: IncomingPaths) -> None:
    """Log what a skip leaves behind, and raise when the batch is refused, naming why."""
    bad, drift_report = report["bad"], report["drift"]
    lines = [reason for entry in bad[: validate.MAX_NAMED] for reason in entry["reasons"]]
    lines += (
        [f"and {len(bad) - validate.MAX_NAMED} more (see {paths.report})"]
        if len(bad) > validate.MAX_NAMED
        else []
    )
    for warning in report["warnings"]:
        log.warning("check-incoming warning: %s failed for %s", warning["check"], ", ".join(warning["files"]))
    problems = []
    if bad and report["on_bad_incoming"] == "fail":
        problems.append(
            f"{len(bad)} bad incoming file(s) (orchestrate.on_bad_incoming: fail):\n- " + "\n- ".join(lines)
        )
    elif bad:
        log.warning(
            "leaving %d bad file(s) in %s (orchestrate.on_bad_incoming: skip):\n- %s",
            len(bad),
            paths.incoming,
            "\n- ".join(lines),
        )
    if drift_report.get("exceeded"):
        problems.append(f"the batch drifted from the training data: {drift_report['summary']}")
    if problems:
        raise ValidationFailed(
            "\n".join(problems) + f"\nnothing merged; see {paths.report}. Fix or remove the files named, "
            "or set orchestrate.on_bad_incoming: skip; for drift, check where the batch comes from, or raise "
            "orchestrate.max_drift if the data has truly moved on"
        )


def describe_drift(drift_report: dict[str, Any]) -> str:
    """One line: each property's KL divergence, those past max_drift first and marked."""
    properties = drift_report["properties"]
    order = sorted(properties, key=lambda n: not properties[n]["exceeded"])
    parts = []
    for name in order:
        p = properties[name]
        score = "inf" if p["kl_divergence"] is None else f"{p['kl_divergence']:.3f}"
        where = ""
        if "median" in p["batch"]:
            where = f" (median {p['batch']['median']:.4g}, training data {p['reference']['median']:.4g})"
        parts.append(f"{name} {score}{' > max_drift' if p['exceeded'] else ''}{where}")
    return f"KL divergence per property, max_drift {drift_report['max_drift']:g}: " + "; ".join(parts)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-incoming",
        help="check new images (per file, and drift from the training data) before a retrain",
    )
    add_path_arguments(parser, IncomingPaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(IncomingPaths, args))
    return 0
