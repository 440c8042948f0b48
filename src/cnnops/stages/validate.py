"""`cnnops validate`: a manifest of every file under data/, checked by a Great Expectations suite.

The manifest (one row per file: path, class, format, mode, size, bit depth, bytes, sha256,
perceptual hash, decoding error) is built through the data contract (`cnnops.data.manifest.describe`).
Class-level and duplicate facts are added as columns, so every check is one GX expectation on
one dataframe and the data docs show them all. Each check has a severity from params
(`validate.severity.<check>`): error-level failures raise `ValidationFailed` after the report and
the docs are written; warnings are logged and reported; "off" leaves the expectation out.
"""

from __future__ import annotations

import argparse
import copy
import html
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnnops import atomic
from cnnops.audit import properties
from cnnops.config import DataParams, Params, ValidateParams
from cnnops.data.folder import GROUPS_FILE, scan_image_folder
from cnnops.data.groups import load_groups
from cnnops.data.manifest import ManifestEntry, describe_all, duplicate_groups
from cnnops.errors import CnnopsError, ValidationFailed
from cnnops.models import CHANNELS
from cnnops.progress import progress_bar
from cnnops.stages.paths import POSITIONAL, add_path_arguments, path_arg, paths_from_args
from cnnops.tracking import runs

log = logging.getLogger(__name__)

SUITE = "cnnops_data"
DOCS_SITE = "cnnops_validation"  # the ephemeral context already owns "local_site"
MAX_NAMED = 20  # files named per check in the error message; the report lists all
PER_FILE_CHECKS = ("decodes", "format", "mode", "size")  # what a check says of one file alone


def build_manifest(
    data_dir: str | Path, data: DataParams
) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]], np.ndarray]:
    """The manifest dataframe (with the derived check columns), class names, skipped files, and
    each file decoded once more at `properties.VALIDATE_SIDE` px (row i: manifest row i), in an
    unlinked temporary file mapped into memory, for the image-property warning."""
    scan = scan_image_folder(data_dir, hidden_files=data.hidden_files, min_classes=1)
    side = properties.VALIDATE_SIDE
    shape = (len(scan.records), CHANNELS[data.color_mode], side, side)
    with tempfile.TemporaryFile() as handle:  # the mapping outlives the closed, unlinked file
        thumbnails = np.memmap(handle, dtype=np.uint8, mode="w+", shape=shape)
    found = describe_all(
        scan.records, color_mode=data.color_mode, max_pixels=data.max_image_pixels, into=thumbnails
    )
    rows = []
    with progress_bar("validate: reading", len(scan.records), unit="img") as advance:
        for entry in found:
            rows.append(entry.as_dict())
            advance()
    df = pd.DataFrame(rows)
    counts = df.groupby("label")["path"].transform("count")
    df["class_count"] = counts
    df["class_ratio"] = counts / counts.min()
    decoded = df["sha256"].notna()
    df["labels_sharing_bytes"] = df[decoded].groupby("sha256")["label"].transform("nunique")
    df["duplicate_group"] = float("nan")
    df["near_duplicates"] = float("nan")
    if decoded.any():
        ok = df[decoded]
        groups = duplicate_groups(list(ok["sha256"]), list(ok["phash"]), data.near_duplicate_distance)
        distinct = ok.assign(group=groups).groupby("group")["sha256"].transform("nunique")
        df.loc[decoded, "duplicate_group"] = groups
        df.loc[decoded, "near_duplicates"] = (distinct - 1).to_numpy()
    named = load_groups(data_dir, list(df["path"]))  # a row naming a missing image is refused here
    df["group"] = None if named is None else df["path"].map(named)
    return df, scan.class_names, scan.skipped, thumbnails


def gx_expectations() -> Any:
    """`great_expectations.expectations`, imported with GX's INFO lines (its internals) silenced."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx.expectations


def expectations(validate: ValidateParams) -> dict[str, list[Any]]:
    """GX expectations per check name (the keys of `validate.severity`)."""
    E = gx_expectations()
    v = validate
    return {
        "decodes": [E.ExpectColumnValuesToBeNull(column="error", description="every file decodes")],
        "format": [E.ExpectColumnValuesToBeInSet(column="format", value_set=list(v.allowed_formats))],
        "mode": [E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(v.allowed_modes))],
        "size": [
            E.ExpectColumnValuesToBeBetween(column="width", min_value=v.min_width, max_value=v.max_width),
            E.ExpectColumnValuesToBeBetween(column="height", min_value=v.min_height, max_value=v.max_height),
        ],
        "min_classes": [E.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=v.min_classes)],
        "min_images_per_class": [
            E.ExpectColumnValuesToBeBetween(column="class_count", min_value=v.min_images_per_class)
        ],
        "imbalance": [E.ExpectColumnValuesToBeBetween(column="class_ratio", max_value=v.max_imbalance_ratio)],
        "label_conflict": [
            E.ExpectColumnValuesToBeBetween(
                column="labels_sharing_bytes", max_value=1, description="no identical file under two classes"
            )
        ],
        "exact_duplicates": [
            E.ExpectColumnValuesToBeUnique(column="sha256", description="no two identical files")
        ],
        "near_duplicates": [
            E.ExpectColumnValuesToBeBetween(
                column="near_duplicates", max_value=0, description="no perceptual near duplicates"
            )
        ],
    }


def run_suite(df: pd.DataFrame, validate: ValidateParams, docs_dir: Path) -> list[dict[str, Any]]:
    """Run the suite through an ephemeral GX context; returns one record per check, and writes the docs."""
    return run_expectations(df, expectations(validate), validate.severity.model_dump(), docs_dir)


def run_expectations(
    df: pd.DataFrame,
    checks: dict[str, list[Any]],
    severity: dict[str, str],
    docs_dir: Path | None,
    suite_name: str = SUITE,
) -> list[dict[str, Any]]:
    """Run the expectations of each check (at its `severity`) on `df` in one GX suite; returns one
    record per expectation (one per check left "off"), and writes the data docs to `docs_dir` if given."""
    import great_expectations as gx

    context = _context(docs_dir)
    batch = context.data_sources.add_pandas("cnnops").add_dataframe_asset("manifest")
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    records: list[dict[str, Any]] = []
    for check, found in checks.items():
        if severity[check] == "off":
            records.append({"check": check, "severity": "off", "success": None})
            continue
        for expectation in found:
            expectation.meta = {"check": check, "severity": severity[check]}
            suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(
            name=suite_name, data=batch.add_batch_definition_whole_dataframe("all"), suite=suite
        )
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite_name,
            validation_definitions=[definition],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    for validation in result.run_results.values():
        records.extend(_record(r.to_json_dict(), df) for r in validation.results)
    if docs_dir is not None:
        _write_docs(context, result.run_results)
    return records


def _context(docs_dir: Path | None) -> Any:
    """An ephemeral GX context (nothing on disk but the docs, nothing on the network) whose one docs
    site is `docs_dir` (none without it)."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are internals
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())}
        index = {"class_name": "DefaultSiteIndexBuilder"}
        sites[DOCS_SITE] = {"class_name": "SiteBuilder", "site_index_builder": index, "store_backend": store}
    return gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            analytics_enabled=False,
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites=sites,
        ),
    )


def _write_docs(context: Any, run_results: dict[Any, Any]) -> None:
    """Build the data docs from an HTML-escaped copy of the validation results.

    GX 1.24 escapes the values it substitutes into its string templates, but writes table cells raw:
    the unexpected values, the `path` of each offending row and observed values, which hold file and
    class names. A class folder named `<img src=x onerror=...>` would run script in the browser of
    whoever opens the docs (here or as the MLflow artifact). The records keep the real values.
    """
    for key, validation in run_results.items():
        safe = copy.deepcopy(validation)
        for outcome in safe.results:
            outcome.result = _escaped(outcome.result)
            outcome.exception_info = _escaped(outcome.exception_info)
        context.validation_results_store.set(key, safe)
    context.build_data_docs(site_names=[DOCS_SITE])


def _escaped(value: Any) -> Any:
    """`value` with every string in it (keys too) HTML-escaped."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def _record(result: dict[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    config, outcome = result["expectation_config"], result["result"]
    meta = config["meta"]
    column = config["kwargs"].get("column")
    offending = [
        {"path": row["path"], "value": plain(row.get(column))}
        for row in outcome.get("unexpected_index_list") or []
    ]
    files = sorted({o["path"] for o in offending})
    record = {
        "check": meta["check"],
        "severity": meta["severity"],
        "expectation": config["type"],
        "kwargs": {k: v for k, v in config["kwargs"].items() if k not in ("batch_id",)},
        "success": bool(result["success"]),
        "unexpected_count": outcome.get("unexpected_count", 0),
        "files": files,
        "offending": offending,
    }
    if "observed_value" in outcome:
        record["observed_value"] = plain(outcome["observed_value"])
    if files:
        record["classes"] = sorted(df.loc[df["path"].isin(files), "label"].unique().tolist())
    return record


def plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy and NaN out)."""
    if value is None or isinstance(value, str | bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:
        return None
    return int(number) if number.is_integer() else number


@dataclass(frozen=True)
class ValidatePaths:
    """The stage's input and outputs (the paths dvc.yaml gives the CLI)."""

    data: Path = path_arg("data", "ImageFolder root", POSITIONAL)
    report: Path = path_arg("reports/validation.json", "JSON report")
    docs: Path = path_arg("reports/validation_docs", "GX data docs folder")


@dataclass(frozen=True)
class ValidateResult:
    report: dict[str, Any]  # what `paths.report` holds
    run_id: str  # the MLflow run that records it (experiment `<experiment>-data`)


def run(params: Params, paths: ValidatePaths = ValidatePaths()) -> ValidateResult:
    """Validate `paths.data`; write the JSON report and the GX data docs, log both to an MLflow run,
    then raise on error-level failures (the report and the record are kept)."""
    df, class_names, skipped, thumbnails = build_manifest(paths.data, params.data)
    _reset_docs(paths.docs)
    checks = run_suite(df, params.validate, paths.docs)
    report = _report(df, class_names, skipped, checks)
    report["image_properties"] = _image_properties(df, thumbnails, params)
    atomic.write_json(paths.report, report, indent=1)
    with runs.data_run(params, "validate", ("data", "validate")) as mlflow_run:
        runs.log_metrics(
            {k: report[k] for k in ("n_files", "n_classes", "n_failed_errors", "n_failed_warnings")}
        )
        runs.set_tags({"cnnops.validation": "pass" if report["success"] else "fail"})
        runs.log_files([paths.report, paths.docs], "validate")
    failed = [c for c in checks if c["success"] is False]
    for check in failed:
        if check["severity"] == "warning":
            log.warning("validate warning: %s", _describe(check, paths.data))
    if report["failed_errors"]:
        failures = [_describe(c, paths.data) for c in failed if c["severity"] == "error"]
        raise ValidationFailed(
            f"{len(report['failed_errors'])} error-level check(s) failed on {paths.data}:\n- "
            + "\n- ".join(failures)
            + f"\nsee {paths.report} and {paths.docs / 'index.html'}; fix or remove the files, or set "
            "validate.severity.<check> in params.yaml to warning or off"
        )
    log.info(
        "validated %d files in %d classes: %d warning(s)",
        len(df),
        len(class_names),
        len(report["failed_warnings"]),
    )
    return ValidateResult(report, mlflow_run.info.run_id)


def _image_properties(df: pd.DataFrame, thumbnails: np.ndarray, params: Params) -> list[dict[str, Any]]:
    """Image properties (sharpness, noise, hue, ...) that alone tell a class from the rest, with the
    audit's thresholds (`audit.property_auroc`, `significance`): a data warning before anything is
    trained. Never an error: a cue in the data may be the class itself, and the audit's property
    transplants are what test whether a model uses it."""
    a = params.audit
    ok = df[df["sha256"].notna()]
    scores = properties.thumbnail_property_scores(
        thumbnails, list(ok.index), list(ok["label"]), permutations=a.property_permutations,
        seed=params.base.seed,
    )  # fmt: skip
    found = []
    for cls, by_property in scores.items():
        for name, s in by_property.items():
            if max(s.auroc, 1 - s.auroc) < a.property_auroc or s.p_value > a.significance:
                continue
            found.append({"class": cls, "property": name, **asdict(s)})
            log.warning(
                "validate warning: class %r: %s alone tells its images from the others' (AUROC %.2f, median "
                "%.3g against %.3g): a cue in the data a model may take", cls, name, s.auroc,
                s.class_median, s.others_median,
            )  # fmt: skip
    return found


def _report(
    df: pd.DataFrame, class_names: list[str], skipped: list[tuple[str, str]], checks: list[dict[str, Any]]
) -> dict[str, Any]:
    """What reports/validation.json holds: the outcome, every check and the manifest."""
    failed = {
        sev: sorted({c["check"] for c in checks if c["success"] is False and c["severity"] == sev})
        for sev in ("error", "warning")
    }
    return {
        "success": not failed["error"],
        "n_files": len(df),
        "n_classes": len(class_names),
        "n_failed_errors": len(failed["error"]),
        "n_failed_warnings": len(failed["warning"]),
        "failed_errors": failed["error"],
        "failed_warnings": failed["warning"],
        "class_counts": {name: int((df["label"] == name).sum()) for name in class_names},
        "checks": checks,
        "duplicate_groups": [  # exact and near duplicates together, as prepare keeps each in one split
            sorted(group["path"]) for _, group in df.groupby("duplicate_group") if len(group) > 1
        ],
        "skipped": [{"path": p, "reason": why} for p, why in skipped],
        "groups": _groups(df),
        "manifest": [
            {k: plain(v) for k, v in row.items()}
            for row in df[[f.name for f in fields(ManifestEntry)]].to_dict("records")
        ],
    }


def _groups(df: pd.DataFrame) -> dict[str, Any] | None:
    """data/groups.csv at a glance: how many groups, the largest, and the images it does not list."""
    if df["group"].isna().all():
        return None
    sizes = df["group"].value_counts()
    return {
        "file": GROUPS_FILE,
        "groups": len(sizes),
        "largest_group": {"group": str(sizes.index[0]), "images": int(sizes.iloc[0])},
        "ungrouped_images": int(df["group"].isna().sum()),
    }


_HINTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "min_classes": lambda c: (
        f"{c['observed_value']} class folder(s), need at least {c['kwargs']['min_value']:g}"
    ),
    "min_images_per_class": lambda c: (
        f"classes {c['classes']} have fewer than {c['kwargs']['min_value']:g} images"
    ),
    "imbalance": lambda c: f"classes {c['classes']} exceed {c['kwargs']['max_value']:g}x the smallest class",
}


def _describe(check: dict[str, Any], root: Path) -> str:
    """One line per failed check: what failed and which files (with their offending value)."""
    head = f"{check['check']} ({check['expectation']})"
    if check["check"] in _HINTS:
        return f"{head}: {_HINTS[check['check']](check)}"
    column = check["kwargs"].get("column")
    named = [
        o["value"]
        if column == "error"
        else f"{root / o['path']} ({column} {o['value']})"  # errors name the file
        for o in check["offending"][:MAX_NAMED]
    ]
    more = len(check["offending"]) - len(named)
    listed = ("\n    " if column == "error" else "") + (";\n    " if column == "error" else ", ").join(named)
    return f"{head}: {len(check['files'])} file(s): {listed}" + (f" and {more} more" if more > 0 else "")


def _reset_docs(docs_dir: Path) -> None:
    """The docs folder is this stage's output: cleared before a run, never someone else's folder."""
    if docs_dir.exists() and any(docs_dir.iterdir()):
        if not (docs_dir / "index.html").exists():
            raise CnnopsError(
                f"{docs_dir}: exists and is not a data docs folder; choose another --docs folder"
            )
        shutil.rmtree(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="check data/ with a Great Expectations suite")
    add_path_arguments(parser, ValidatePaths)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace, params: Params) -> int:
    run(params, paths_from_args(ValidatePaths, args))
    return 0
