"""params.yaml: every problem is an error naming the key path, the value and what is allowed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from cnnops.config import AugmentParams, Params, load_params, parse_params
from cnnops.errors import ConfigError

PROJECT = Path(__file__).resolve().parents[1]


def test_the_project_params_load_with_the_documented_example_values() -> None:
    params = load_params(PROJECT / "params.yaml")
    assert params.data.color_mode == "L" and params.data.near_duplicate_distance == 4
    assert (
        params.validate.severity.decodes == "error" and params.validate.severity.near_duplicates == "warning"
    )
    assert params.prepare.image_size == (32, 32)


def schema_tree(model: type[BaseModel]) -> dict[str, Any]:
    """The keys of a schema section as params.yaml spells them; a nested section maps to its keys."""
    tree: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        inner = field.annotation if isinstance(field.annotation, type) else None
        tree[field.alias or name] = schema_tree(inner) if inner and issubclass(inner, BaseModel) else None
    return tree


def yaml_tree(raw: dict[str, Any]) -> dict[str, Any]:
    return {key: yaml_tree(value) if isinstance(value, dict) else None for key, value in raw.items()}


def sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    inner = [f.annotation for f in model.model_fields.values() if isinstance(f.annotation, type)]
    return [model, *(s for m in inner if issubclass(m, BaseModel) for s in sections(m))]


def test_params_yaml_is_the_one_place_defaults_are_written() -> None:
    shipped = resources.files("cnnops").joinpath("params.yaml")
    assert shipped.read_text() == (PROJECT / "params.yaml").read_text()  # the package ships this file
    assert (PROJECT / "src/cnnops/params.yaml").resolve() == (PROJECT / "params.yaml").resolve()
    assert yaml_tree(yaml.safe_load(shipped.read_text())) == schema_tree(Params)  # every key, no other
    own_default = [
        f"{model.__name__}.{name}"
        for model in sections(Params)
        for name, field in model.model_fields.items()
        if not field.is_required()
    ]
    assert own_default == [], "these schema fields carry a default of their own: write it in params.yaml"


def test_a_partial_mapping_is_merged_over_the_defaults() -> None:
    defaults = load_params(PROJECT / "params.yaml")
    params = parse_params(
        {"prepare": {"image_size": [16, 24]}, "validate": {"severity": {"imbalance": "off"}}}
    )
    assert (
        params.prepare.image_size == (16, 24) and params.prepare.val_fraction == defaults.prepare.val_fraction
    )
    assert params.validate.severity.imbalance == "off"
    assert params.validate.severity.decodes == defaults.validate.severity.decodes
    assert parse_params(None) == parse_params({}) == defaults
    assert AugmentParams.from_defaults(color_jitter=0.4) == defaults.train.augment.model_copy(
        update={"color_jitter": 0.4}
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"colour_mode": "L"}}, "unknown key 'data.colour_mode' (did you mean 'color_mode'?)"),
        (
            {"validate": {"severity": {"decode": "off"}}},
            "unknown key 'validate.severity.decode' (did you mean",
        ),
        ({"prepare": {"image_size": [32, 32], "val_frac": 0.2}}, "unknown key 'prepare.val_frac'"),
        ({"datta": {}}, "unknown key 'datta' (did you mean 'data'?)"),
        (
            {"validate": {"min_width": "wide"}},
            "'validate.min_width' = 'wide' is not allowed: Input should be a valid integer",
        ),
        (
            {"data": {"color_mode": "CMYK"}},
            "'data.color_mode' = 'CMYK' is not allowed: Input should be 'RGB' or 'L'",
        ),
        ({"validate": {"severity": {"size": "fatal"}}}, "'validate.severity.size' = 'fatal' is not allowed"),
        (
            {"prepare": {"val_fraction": 0.7}},
            "'prepare.val_fraction' = 0.7 is not allowed: Input should be less than 0.5",
        ),
        ({"data": {"near_duplicate_distance": 65}}, "'data.near_duplicate_distance' = 65 is not allowed"),
        (
            {"data": {"max_image_pixels": 0}},
            "'data.max_image_pixels' = 0 is not allowed: Input should be greater than 0",
        ),
        (
            {"prepare": {"image_size": [4, 32]}},
            "'prepare.image_size' = [4, 32] is not allowed: Value error, each side must be 8 to 4096 pixels",
        ),
        ({"validate": {"allowed_formats": ["JPG"]}}, "'JPG' is not a Pillow name (did you mean 'JPEG'?)"),
        ({"validate": {"allowed_modes": ["I16"]}}, "'I16' is not a Pillow name (did you mean 'I;16'?)"),
        ({"validate": {"min_width": 64, "max_width": 32}}, "min_width 64 is larger than max_width 32"),
        ({"validate": {"max_imbalance_ratio": 0.5}}, "'validate.max_imbalance_ratio' = 0.5 is not allowed"),
    ],
)
def test_bad_values_name_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw, "params.yaml")
    assert expected in str(info.value)


INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    ("raw", "key", "allowed"),
    [
        ({"prepare": {"image_size": [100000, 100000]}}, "prepare.image_size", "each side must be 8 to 4096"),
        ({"train": {"input_size": [8, 5000]}}, "train.input_size", "each side must be 8 to 4096"),
        ({"train": {"input_size": ["16", 16]}}, "train.input_size.0", "valid integer"),
        ({"train": {"batch_size": 10**9}}, "train.batch_size", "(allowed: >= 1 and <= 65536)"),
        ({"train": {"batch_size": 1e9}}, "train.batch_size", "valid integer (allowed: >= 1 and <= 65536)"),
        ({"audit": {"batch_size": 10**9}}, "audit.batch_size", "(allowed: >= 1 and <= 65536)"),
        ({"evaluate": {"ece_bins": 10**9}}, "evaluate.ece_bins", "(allowed: >= 2 and <= 1000)"),
        ({"train": {"num_workers": 10000}}, "train.num_workers", "use auto or a whole number from 0 to 64"),
        ({"data": {"max_image_pixels": 10**15}}, "data.max_image_pixels", "(allowed: > 0 and <= 178956970)"),
        ({"train": {"lr": INF}}, "train.lr", "finite number (allowed: > 0.0 and <= 10.0)"),
        ({"train": {"grad_clip": INF}}, "train.grad_clip", "finite number (allowed: > 0.0)"),
        ({"release": {"margin": INF}}, "release.margin", "finite number (allowed: >= 0.0 and < 1.0)"),
        ({"orchestrate": {"lock_timeout": INF}}, "orchestrate.lock_timeout", "and <= 86400.0)"),
        ({"orchestrate": {"retry_delay": NAN}}, "orchestrate.retry_delay", "(allowed: >= 0.0 and <= 3600.0)"),
        ({"train": {"augment": {"crop_scale": [0.5, NAN]}}}, "train.augment.crop_scale.1", "finite number"),
        ({"train": {"epochs": True}}, "train.epochs", "valid integer (allowed: >= 1 and <= 10000)"),
        ({"train": {"epochs": "12"}}, "train.epochs", "valid integer (allowed: >= 1 and <= 10000)"),
        ({"prepare": {"image_size": [True, 32]}}, "prepare.image_size.0", "valid integer"),
        ({"train": {"channels_last": 1}}, "train.channels_last", "valid boolean"),
        ({"base": {"seed": 2**70}}, "base.seed", "(allowed: >= 0 and < 4294967296)"),
        ({"audit": {"seed": 2**32}}, "audit.seed", "(allowed: >= 0 and < 4294967296)"),
    ],
)
def test_values_that_would_exhaust_resources_are_refused_with_the_range(
    raw: dict, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw, "params.yaml")
    assert f"params.yaml: '{key}' = " in str(info.value) and allowed in str(info.value)


def _leaves(raw: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every scalar in a params mapping."""
    found = []
    for key, value in raw.items():
        path = (*prefix, key)
        found += _leaves(value, path) if isinstance(value, dict) else [(path, value)]
    return found


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    return {path[0]: _nested(path[1:], value) if len(path) > 1 else value}


def _probes(default: Any) -> list[Any]:
    """Values no number or switch may take: the other kind, text, the unbounded, the non-finite."""
    if isinstance(default, bool):
        return [1, "true"]
    if isinstance(default, int):
        return [True, str(default), float(default), 10**18]
    if isinstance(default, float):
        return [True, str(default), 1e18, INF, NAN]
    return []


def test_every_number_and_switch_is_strict_bounded_and_finite() -> None:
    """Not one key at a time: every int, float and bool of params.yaml, so a new one is covered too."""
    defaults = yaml.safe_load((PROJECT / "params.yaml").read_text())
    accepted = [
        (".".join(path), probe)
        for path, default in _leaves(defaults)
        for probe in _probes(default)
        if not _refused_naming(path, probe)
    ]
    assert accepted == []
    assert parse_params({"orchestrate": {"lock_timeout": 60}}).orchestrate.lock_timeout == 60.0  # int ok


def _refused_naming(path: tuple[str, ...], probe: Any) -> bool:
    try:
        parse_params(_nested(path, probe), "p.yaml")
    except ConfigError as exc:
        return f"p.yaml: '{'.'.join(path)}' = {probe!r} is not allowed" in str(exc)
    return False


def test_exponents_read_as_yaml_1_2_and_dvc_write_them(tmp_path: Path) -> None:
    """`dvc exp run -S train.lr=1e-5` writes `lr: 1e-05`, text to PyYAML's YAML 1.1 but a float here;
    a quoted number stays text and is refused with why, and a float is never an int."""
    (tmp_path / "p.yaml").write_text("train:\n  lr: 1e-05\n  weight_decay: 2E-4\n")
    train = load_params(tmp_path / "p.yaml").train
    assert (train.lr, train.weight_decay) == (1e-05, 2e-4)
    (tmp_path / "p.yaml").write_text("train:\n  batch_size: 1e9\n  lr: '0.001'\n")
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "p.yaml")
    batch, lr = str(info.value).splitlines()  # in schema order
    assert "'train.batch_size' = 1000000000.0 is not allowed: Input should be a valid integer" in batch
    assert "'train.lr' = '0.001' is not allowed: Input should be a valid number" in lr
    assert lr.endswith("; it is quoted, so YAML reads it as text: write the number without quotes")


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- data\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_params(tmp_path / "list.yaml")


def test_cli_reports_every_params_error_without_a_traceback(tmp_path: Path) -> None:
    bad = {
        "data": {"colour_mode": "L"},
        "validate": {"min_height": "tall"},
        "prepare": {"test_fraction": 0.9},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    cnnops = Path(sys.executable).with_name("cnnops")
    result = subprocess.run(
        [str(cnnops), "--params", "bad.yaml", "prepare", "data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{cnnops.parent}{os.pathsep}{os.environ['PATH']}"},
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("cnnops prepare: error: bad.yaml: ")
    assert "unknown key 'data.colour_mode' (did you mean 'color_mode'?)" in result.stderr
    assert "'validate.min_height' = 'tall' is not allowed" in result.stderr
    assert "'prepare.test_fraction' = 0.9 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
