"""params.yaml: every problem is an error naming the key path, the value and what is allowed."""

from __future__ import annotations

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
        ({"prepare": {"image_size": [4, 32]}}, "image_size [4, 32] is too small"),
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
