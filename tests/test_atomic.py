"""Reports and splits are written whole or not at all: a crash mid-write keeps the previous file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnops import atomic


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    report = tmp_path / "reports" / "metrics.json"
    atomic.write_json(report, {"accuracy": 0.9})
    with pytest.raises(TypeError), atomic.atomic_path(report) as tmp:
        tmp.write_text('{"accuracy": 0.')  # torn: the process dies before it finishes
        raise TypeError("killed mid-write")
    assert json.loads(report.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in report.parent.iterdir()] == ["metrics.json"]
    with pytest.raises(TypeError):
        atomic.write_json(report, {"accuracy": object()})  # not serialisable: fails before any byte lands
    assert json.loads(report.read_text()) == {"accuracy": 0.9}
    atomic.write_json(report, {"accuracy": 0.95})
    assert json.loads(report.read_text()) == {"accuracy": 0.95}


def test_an_atomic_file_gets_the_permissions_a_plain_write_would(tmp_path: Path) -> None:
    (tmp_path / "plain.json").write_text("{}")
    atomic.write_json(tmp_path / "atomic.json", {})
    assert (tmp_path / "atomic.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
