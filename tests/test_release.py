"""`cnnops release` decisions on a real MLflow registry (SQLite store in tmp_path)."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from fixtures_export import constant_model, model_run, stage_params, synthetic_split
from mlflow import MlflowClient

from cnnops.config import ExportParams, ReleaseParams, TrackingParams
from cnnops.errors import StageInputError
from cnnops.export.onnx_model import OnnxMetadata, export_classifier, read_metadata
from cnnops.models import Classifier
from cnnops.stages import export, release

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PARAMS = ReleaseParams.from_defaults(model_name="clf", metric="accuracy", margin=0.0)
COUNTS = (14, 6, 6)  # 26 test images: always answering "a" scores 14/26


@pytest.fixture(scope="module")
def prepared_26(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test split large enough for the exact tests to tell the models apart at p 0.05."""
    folder = tmp_path_factory.mktemp("prepared_26")
    synthetic_split(COUNTS).save(folder, "test")
    return folder


def never_c(model: Classifier) -> Classifier:
    """`model` with class c's output pushed far below b's: every c image is answered a or b."""
    blind = copy.deepcopy(model)
    with torch.no_grad():
        blind.head.weight[2] = blind.head.weight[1]
        blind.head.bias[2] = blind.head.bias[1] - 100.0
    return blind.eval()


def exported(
    root: Path, name: str, model: Classifier, tracking: TrackingParams, verdict: str
) -> dict[str, Path]:
    """What train, audit and export leave for one model: checkpoint, reports and the ONNX file."""
    checkpoint, train_report = model_run(root, name, model, tracking)
    run_id = json.loads(train_report.read_text())["run_id"]
    spec = model.spec
    meta = OnnxMetadata(
        spec.class_names, spec.image_size, spec.color_mode, "logits", spec.model, run_id, "c", "d"
    )
    onnx_path = root / name / "model.onnx"
    export_classifier(model, onnx_path, opset=18, metadata=meta)
    audit = root / name / "audit.json"
    audit.write_text(json.dumps({"verdict": verdict, "checks": []}))
    return dict(onnx_path=onnx_path, checkpoint=checkpoint, train_report=train_report, audit_report=audit)


def do_release(
    paths: dict[str, Path], tracking: TrackingParams, prepared: Path, project: Path, **params: object
) -> dict:
    stage = release.ReleasePaths(
        paths["onnx_path"], paths["checkpoint"], prepared, paths["train_report"], paths["audit_report"],
        paths["onnx_path"].with_name("release.json"), project,
    )  # fmt: skip
    section = PARAMS.model_copy(update=params) if params else PARAMS
    return release.run(stage_params(tracking, release=section), stage).report


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model("clf").aliases.items()}


def test_champion_challenger_decisions_and_idempotence(
    tmp_path: Path,
    mlflow_store: TrackingParams,
    prepared_26: Path,
    good_model: Classifier,
    committed_repo: Path,
) -> None:
    tracking, prepared = mlflow_store, prepared_26
    client = MlflowClient(tracking.uri)
    chance = do_release(exported(tmp_path, "chance", constant_model(0), tracking, "pass"), tracking, prepared,
                        committed_repo)  # fmt: skip
    assert (chance["promoted"], chance["score"], chance["champion"]) == (False, 14 / 26, None)
    assert chance["baseline"]["accuracy"] == 14 / 26 and chance["baseline"]["majority_class"] == "a"
    assert chance["baseline"]["p_value"] > 0.5
    assert "not significantly above the majority-class baseline 0.5385" in chance["reason"]
    assert aliases(client) == {"challenger": "1"}

    first = exported(tmp_path, "first", never_c(good_model), tracking, "pass")  # accuracy 20/26
    low = do_release(first, tracking, prepared, committed_repo, min_score=0.9)
    assert not low["promoted"] and "accuracy 0.7692 is below release.min_score 0.9" in low["reason"]
    result = do_release(first, tracking, prepared, committed_repo)
    assert (result["promoted"], result["version"], result["score"]) == (True, "2", 20 / 26)
    assert result["baseline"]["p_value"] == pytest.approx(0.013478, abs=1e-6)  # binomial: 20+ of 26 at 14/26
    assert "no champion yet" in result["reason"] and result["paired_test"] is None
    assert aliases(client) == {"champion": "2", "challenger": "2"}

    again = do_release(first, tracking, prepared, committed_repo)  # idempotent: no new version, same record
    assert again == result
    assert len(client.search_model_versions("name = 'clf'")) == 2
    assert first["onnx_path"].with_name("release.json").read_text() == json.dumps(result, indent=2) + "\n"

    worse = do_release(exported(tmp_path, "worse", constant_model(1), tracking, "pass"), tracking, prepared,
                       committed_repo)  # fmt: skip
    assert (worse["promoted"], worse["score"], worse["champion_score"]) == (False, 6 / 26, 20 / 26)
    assert "accuracy 0.2308 is below release.min_score 0.5" in worse["reason"]
    assert worse["paired_test"]["champion_only_correct"] == 14  # the champion's a and b, which it misses
    assert aliases(client) == {"champion": "2", "challenger": "3"}

    for verdict in ("fail", "inconclusive"):
        audited = exported(tmp_path, verdict, good_model, tracking, verdict)
        refused = do_release(audited, tracking, prepared, committed_repo)
        assert (refused["promoted"], refused["score"], refused["champion"]) == (False, 1.0, "2")
        assert f"audit verdict is '{verdict}'" in refused["reason"]
    assert aliases(client)["champion"] == "2"

    # 26/26 against 20/26: the 6 c images are the only disagreements, McNemar p = 0.5**6 = 0.0156
    better = exported(tmp_path, "better", good_model, tracking, "pass")
    noisy = do_release(better, tracking, prepared, committed_repo, significance=0.01)
    assert not noisy["promoted"] and "the difference is not significant" in noisy["reason"]
    promoted = do_release(better, tracking, prepared, committed_repo)
    assert (promoted["promoted"], promoted["version"], promoted["champion_version"]) == (True, "6", "2")
    assert promoted["champion_score"] == 20 / 26 and "beats the champion" in promoted["reason"]
    paired = promoted["paired_test"]
    assert (paired["images"], paired["challenger_correct"], paired["champion_correct"]) == (26, 26, 20)
    assert (paired["challenger_only_correct"], paired["champion_only_correct"]) == (6, 0)
    assert paired["p_value"] == 0.5**6 and "McNemar p = 0.0156" in promoted["reason"]
    assert aliases(client) == {"champion": "6", "challenger": "6"}
    assert do_release(better, tracking, prepared, committed_repo) == promoted
    assert len(client.search_model_versions("name = 'clf'")) == 6

    version = client.get_model_version("clf", "6")
    assert (
        version.tags["release.decision"] == "champion"
        and version.tags["release.reason"] == promoted["reason"]
    )
    assert client.get_run(version.run_id).data.tags["release.decision"] == "champion"
    assert json.loads(version.tags["release.paired_test"]) == paired
    loser = client.get_model_version("clf", "4")
    assert loser.tags["release.decision"] == "challenger" and loser.tags["release.audit_verdict"] == "fail"
    mlflow.set_tracking_uri(tracking.uri)
    files = Path(mlflow.artifacts.download_artifacts("models:/clf@champion", dst_path=str(tmp_path / "dl")))
    assert (files / "model.onnx").is_file() and len(list(files.rglob("model.pt"))) == 1
    pytorch_model = mlflow.pytorch.load_model(version.tags["pytorch_model_uri"])
    images = torch.rand(3, 1, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(pytorch_model(images), good_model(images))


def test_failed_audit_is_never_first_champion_and_stale_export_is_refused(
    tmp_path: Path, mlflow_store: TrackingParams, prepared_synthetic: dict[str, Path], committed_repo: Path
) -> None:
    tracking, prepared = mlflow_store, prepared_synthetic["L"]
    paths = exported(tmp_path, "m", constant_model(0), tracking, "fail")
    result = do_release(paths, tracking, prepared, committed_repo)
    assert (result["promoted"], result["champion"]) == (False, None)
    assert aliases(MlflowClient(tracking.uri)) == {"challenger": "1"}

    _, other_report = model_run(tmp_path, "other", constant_model(0), tracking)
    with pytest.raises(StageInputError, match=r"model.onnx was exported from MLflow run \w+, but .*stale"):
        do_release({**paths, "train_report": other_report}, tracking, prepared, committed_repo)
    paths["audit_report"].write_text(json.dumps({"status": "ok"}))
    with pytest.raises(StageInputError, match=r"audit.json: top-level 'verdict' is None"):
        do_release(paths, tracking, prepared, committed_repo)


def test_an_experiment_or_a_dirty_tree_never_moves_champion(
    tmp_path: Path,
    mlflow_store: TrackingParams,
    prepared_synthetic: dict[str, Path],
    good_model: Classifier,
    committed_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model that earned champion stays challenger, and the report says why, until the run is one
    that a commit reproduces; then the same release promotes it."""
    tracking, prepared = mlflow_store, prepared_synthetic["L"]
    model = exported(tmp_path, "m", good_model, tracking, "pass")
    client = MlflowClient(tracking.uri)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep")
    held = do_release(model, tracking, prepared, committed_repo)
    assert not held["promoted"] and held["champion"] is None
    assert "runs under `dvc exp run` (experiment 'lr-sweep')" in held["reason"]
    assert "no champion yet" in held["reason"] and aliases(client) == {"challenger": "1"}
    monkeypatch.delenv("DVC_EXP_NAME")

    (committed_repo / "params.yaml").write_text("a: 2\n")  # an uncommitted change
    dirty = do_release(model, tracking, prepared, committed_repo)
    assert not dirty["promoted"] and "has uncommitted changes" in dirty["reason"]
    assert "not a git work tree" in do_release(model, tracking, prepared, tmp_path / "m")["reason"]
    assert aliases(client) == {"challenger": "1"}

    subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=committed_repo, check=True)
    promoted = do_release(model, tracking, prepared, committed_repo)
    assert promoted["promoted"] and aliases(client) == {"champion": "1", "challenger": "1"}


def test_export_then_release_the_model_train_made(
    tmp_path: Path, trained_digits, committed_repo: Path
) -> None:
    """The real chain on the session's trained digits model: export.run, then release.run."""
    t = trained_digits
    onnx_path = tmp_path / "model.onnx"
    export_paths = export.ExportPaths(
        t.model, t.prepared, t.train_report, onnx_path, tmp_path / "compressed", tmp_path / "export.json",
        t.metrics,
    )  # fmt: skip
    export_params = stage_params(
        t.tracking, export=ExportParams.from_defaults(latency_runs=5, throughput_batch=16)
    )
    exported_report = export.run(export_params, export_paths).report
    evaluated = json.loads(t.metrics.read_text())
    assert exported_report["accuracy"]["onnx"] == pytest.approx(evaluated["accuracy"])
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"verdict": "pass"}))
    paths = release.ReleasePaths(
        onnx_path, t.model, t.prepared, t.train_report, audit, tmp_path / "release.json", committed_repo
    )
    result = release.run(
        stage_params(t.tracking, release=ReleaseParams.from_defaults(model_name="digits")),
        paths,
    ).report
    assert result["promoted"] and result["run_id"] == t.run_id
    assert result["score"] == pytest.approx(evaluated["accuracy"])
    meta = read_metadata(onnx_path)
    assert meta.class_names == [str(d) for d in range(10)]
    temperature = evaluated["calibration"]["temperature"]  # fitted by evaluate, divided in by the graph
    assert meta.temperature == temperature == exported_report["temperature"] and temperature != 1.0
