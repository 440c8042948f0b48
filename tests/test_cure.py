"""The cure end to end: a model that learned a planted cue fails its audit; the cure retrains it with
counterfactuals from the findings, and the cured model no longer relies on the cue (ground truth:
`planted.cue_flip_rate`), keeps its accuracy on clean images (`planted.clean_accuracy`, against a
model trained on clean digits for as long) and passes its re-audit. A cure too weak to fix the model
says so, and so does one whose re-audit is inconclusive; the head-only cure (Deep Feature
Reweighting) is measured; a cure killed in round 2 resumes there; refusals by name.

Through the real stages (`fixtures_audit.run_case`: validate, prepare, train, audit; then evaluate,
and cure, which calls train, evaluate and audit itself) on tiny planted digits. The audit v2 proofs'
pipelines (tests/test_audit_v2.py) are the same `Case`s, run once a session for both modules.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import fixtures_cure
import pytest
import torch
from cases_audit import CLEAN, CUED, CURED, IMAGES_LOST, LEARNED
from fixtures_audit import Case
from fixtures_cure import CORNER, cure_paths, enabled
from fixtures_model import one_thread
from mlflow import MlflowClient

from cnnops.audit import counterfactual_plan
from cnnops.config import parse_params
from cnnops.errors import StageInputError
from cnnops.models import load_classifier
from cnnops.stages import cure
from cnnops.training import counterfactual, cure_resume

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CASES = {
    "corner": CORNER,
    "frame": Case("frame", "6", seed=2),
    "tint": Case("tint", "2", seed=4, cue_args=(("intensity", 90),)),
    **{kind: CUED[f"convnet-{kind}"] for kind in ("tag", "textline", "noise", "blur")},
    # test_cue_kinds' centre watermark (the same Case: one pipeline a session for both modules); its
    # audit fails on high-frequency energy, and the property's counterfactual cures it (0.64 -> 0.00)
    "centre": Case("centre", "3", seed=1, epochs=8, cue_args=(("confound", 0.4),)),
}
# The text line case (test_audit_v2's, seed 2): the cure takes the cue's flips from 1.00 to 0.00, but 3
# of class '7''s 5 test images are the confound's copies of other digits, which the cured model calls
# by their digit, so '7' keeps 2 correct test images, too few to audit: the re-audit is inconclusive
# (no failure), and cure.json says `not cured`. Measured; docs/audit.md "Cure benchmark".
TOO_FEW_TO_REAUDIT = {"textline"}
# The text line in class '7' at seed 3 (the text line's settings): the first audit names the top-left
# corner, where each planted line begins; cured there, the model reads the line's other end (round 1's
# re-audit: the top-right corner flips 65%, ground truth 0.99 -> 0.92 when measured with one round).
# Round 2 adds that corner and passes. Measured; docs/audit.md "Cure rounds".
MOVES_ALONG_THE_LINE = replace(CUED["convnet-textline"], seed=3)
# The text line in class '0' at seed 0 (the cure benchmark's `finetune` row): one fine-tuned round
# leaves the line's other end paying while its re-audit passes, that corner's transplant significant
# but under the flip threshold: the residual rule runs round 2. Measured; docs/audit.md "Cure benchmark".
RESIDUAL_LINE = replace(CUED["convnet-textline"], cued_class="0", seed=0)


@pytest.mark.parametrize("name", list(CASES))
def test_cure_breaks_a_learned_cue_and_passes_the_reaudit(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cured = fixtures_cure.cured(CASES[name], tmp_path_factory)
    audited, report = cured.audited, cured.result.report
    assert audited.report["verdict"] == "fail" and audited.cue_flips >= LEARNED  # it learned the cue
    assert cured.cue_flips < CURED, (audited.cue_flips, cured.cue_flips, report["findings"])
    if name in TOO_FEW_TO_REAUDIT:
        after = json.loads((audited.root / "reports" / "cure" / "audit.json").read_text())
        assert after["verdict"] == "inconclusive" and not after["failures"], after["failures"]
        too_few = f"class '{audited.spec.cued_class}': only"
        assert any(too_few in w["sentence"] for w in after["warnings"]), after["warnings"]
    else:
        assert report["status"] == "cured" and report["after"]["audit_verdict"] == "pass", report["findings"]
    assert cured.images_lost <= IMAGES_LOST, (cured.clean_accuracy, cured.clean_model_accuracy, cured.images)
    # the table: every finding before and after, the run linked to its parent
    assert report["parent_run_id"] == audited.result.run_id != report["run_id"]
    assert report["before"]["audit_verdict"] == "fail"
    assert {(f["class"], f["test"]) for f in report["findings"]} == {
        (f["class"], f["test"]) for f in audited.report["failures"]
    }
    assert json.loads((audited.root / "reports" / "cure.json").read_text()) == report
    store = MlflowClient(audited.params.tracking.uri)
    tags = store.get_run(report["run_id"]).data.tags
    assert tags["cnnops.cure.parent_run_id"] == audited.result.run_id
    assert f"class '{audited.spec.cued_class}'" in tags["cnnops.cure.findings"]


def test_an_inconclusive_reaudit_is_not_cured(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The text line's cure (the proof's run, shared): its re-audit is inconclusive, which proves
    nothing, so the cure is not cured, plans no round from it (it has no failure) though rounds remain,
    says why, and release keeps the model a challenger (there is no champion: a pass would take it)."""
    cured = fixtures_cure.cured(CASES["textline"], tmp_path_factory)
    report, cued = cured.report, cured.audited.spec.cued_class
    assert report["after"]["audit_verdict"] == "inconclusive", report["after"]
    assert report["status"] == "not cured" and len(report["rounds"]) == 1 < report["max_rounds"]
    why = "round 1's re-audit is inconclusive: no evidence the shortcut is gone"
    assert report["stopped"].startswith(why) and f"class '{cued}': only" in report["stopped"], report[
        "stopped"
    ]
    assert not report["release"]["promoted"] and "'inconclusive'" in report["release"]["reason"]


def test_a_cure_too_weak_to_fix_the_model_says_so(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Counterfactuals at 1% of the images leave the corner paying: the re-audit fails, and the
    report says `not cured` with the findings that still fail; a second round would train with the
    same corner cue, so the rounds stop, saying why."""
    cured = fixtures_cure.cured(CORNER, tmp_path_factory, "weak", rate=0.01)
    report = cured.result.report
    assert cured.cue_flips >= CURED, cured.cue_flips  # the cue still flips images (0.16 measured)
    assert report["status"] == "not cured" and report["after"]["audit_verdict"] == "fail"
    assert any(f["fails_after"] for f in report["findings"]), report["findings"]
    # the re-audit's failures are all answered by the corner cue the round trained with: no round 2
    assert len(report["rounds"]) == 1 and "nothing new to act on" in report["stopped"], report["stopped"]


def test_head_only_cure_from_the_failed_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`mode: head` (Deep Feature Reweighting: the failed model's backbone frozen, its head retrained
    on class-balanced counterfactual batches): what it achieves on the corner cue, measured."""
    cured = fixtures_cure.cured(CORNER, tmp_path_factory, "head", mode="head")
    report = cured.result.report
    failed = load_classifier(cured.audited.root / "models" / "model.pt")[0]
    head_only = load_classifier(cured.audited.root / "models" / "head" / "model.pt")[0]
    before = failed.state_dict()
    moved = {n for n, p in head_only.state_dict().items() if not torch.equal(p, before[n])}
    head = {n for n, p in head_only.named_parameters() if any(p is q for q in head_only.head.parameters())}
    assert moved and moved <= head, moved - head  # only the head was trained, BatchNorm statistics kept
    # the head stops reading the corner (ground truth 0.65 -> 0.00 when measured) ...
    assert report["mode"] == "head" and cured.cue_flips < CURED, cured.cue_flips
    # ... but the frozen backbone still attends there, so deleting the most-attended pixels still
    # moves the prediction: the re-audit fails on deletion and the report says so
    still = {f["test"] for f in report["findings"] if f["fails_after"]}
    assert report["status"] == "not cured" and report["after"]["audit_verdict"] == "fail", still
    assert "deletion" in still, still
    assert len(report["rounds"]) == 1 and "nothing new to act on" in report["stopped"], report["stopped"]


def _refused_paths(root: Path, audit_report: Path, tmp_path: Path) -> cure.CurePaths:
    """The cure's paths with its outputs in `tmp_path`: a refusal must write none of them."""
    paths = cure_paths(root, audit_report)
    return replace(paths, out=tmp_path / "cured.pt", report=tmp_path / "cure.json", folder=tmp_path / "cure")


def test_cure_refuses_a_passing_audit(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    audited, _ = fixtures_cure.audited(CLEAN["digits"], tmp_path_factory)
    assert audited.report["verdict"] == "pass"
    paths = _refused_paths(audited.root, audited.root / "reports" / "audit.json", tmp_path)
    with pytest.raises(StageInputError, match="verdict is 'pass', not 'fail'"):
        cure.run(enabled(audited.params), paths)
    assert not any(tmp_path.iterdir())


def test_cure_refuses_the_audit_of_another_model(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    corner, _ = fixtures_cure.audited(CASES["corner"], tmp_path_factory)
    tint, _ = fixtures_cure.audited(CASES["tint"], tmp_path_factory)
    paths = _refused_paths(tint.root, corner.root / "reports" / "audit.json", tmp_path)
    with pytest.raises(StageInputError, match="audited another model"):
        cure.run(enabled(tint.params), paths)
    assert not any(tmp_path.iterdir())


def test_cure_refuses_findings_it_cannot_act_on(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    corner, _ = fixtures_cure.audited(CASES["corner"], tmp_path_factory)
    document = json.loads((corner.root / "reports" / "audit.json").read_text())
    document["failures"] = [
        {"class": "3", "test": "masks", "value": 0.1, "threshold": 0.3, "sentence": "masks only"}
    ]
    masks_only = tmp_path / "audit.json"
    masks_only.write_text(json.dumps(document))
    paths = _refused_paths(corner.root, masks_only, tmp_path)
    with pytest.raises(StageInputError, match="no finding the cure can act on: class '3' masks"):
        cure.run(enabled(corner.params), paths)
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]  # the test's input only


def test_cure_disabled_writes_a_skipped_report(tmp_path: Path) -> None:
    from cnnops.config import parse_params

    params = parse_params({}, "cure test")
    assert params.cure.enabled is False  # the default
    paths = cure.CurePaths(report=tmp_path / "cure.json", out=tmp_path / "cured.pt")
    assert cure.run(params, paths).report["status"] == "skipped"
    assert json.loads(paths.report.read_text())["status"] == "skipped" and not paths.out.exists()


def test_counterfactual_place_paste_and_removal() -> None:
    labels = torch.tensor([0, 1] * 4)
    images = torch.where(labels[:, None, None, None] == 0, 50, 9).expand(8, 1, 8, 8).to(torch.uint8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:2, :2] = True
    cue = counterfactual.PlaceCue(0, "top-left corner", mask, torch.full((1, 8, 8), 200).to(torch.uint8),
                                  torch.full((1, 8, 8), 7).to(torch.uint8))  # fmt: skip
    out, same = counterfactual.Counterfactual([cue], rate=1.0)(images, labels)
    assert same is labels
    others, cued = out[labels == 1], out[labels == 0]
    assert (others[..., :2, :2] == 50).all() and (others[..., 2:, :] == 9).all()  # a class image's pixels
    assert (cued[..., :2, :2] == 9).all() and (cued[..., 2:, :] == 50).all()  # another class's content
    assert torch.equal(counterfactual.Counterfactual([cue], rate=0.0)(images, labels)[0], images)
    alone = counterfactual.Counterfactual([cue], rate=1.0)(images[labels == 1], labels[labels == 1])[0]
    assert (alone[..., :2, :2] == 200).all()  # no image of the class in the batch: its mean


def test_counterfactual_property_spread_over_classes() -> None:
    """Grain at the class's level for the other classes' images, the opposite (blur) for the class's."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 1] * 4)
    images = torch.full((8, 1, 16, 16), 128, dtype=torch.uint8)
    images[labels == 0] = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)  # the noisy class
    cue = counterfactual.PropertyCue(0, "noise", "grain", 0.1, "blur", 2.5)
    out, _ = counterfactual.Counterfactual([cue], rate=1.0)(images, labels)
    spread = out.float().std((1, 2, 3))
    assert (spread[labels == 1] > 10).all()  # grain given to the flat images of class 1
    assert (spread[labels == 0] < 0.5 * images[labels == 0].float().std((1, 2, 3))).all()  # blurred
    assert cue.strength in [d.get("strength") for d in counterfactual.Counterfactual([cue], 0.5).describe()]


def test_place_answers_keep_the_place_that_holds_the_cue() -> None:
    """A corner square's corner answers the strip and the cell around it; a text line across both top
    corners is answered by the top strip; a frame's band answers the weaker strips along it."""
    places = counterfactual_plan._places(
        {"border_fraction": 0.1, "corner_fraction": 0.3, "edge_fractions": [0.25], "centre_fraction": 0.5,
         "grids": [2]}, (32, 32),
    )  # fmt: skip
    corner = {(3, "bottom-left corner"): 0.9, (3, "bottom strip 25%"): 0.95, (3, "left strip 25%"): 0.5}
    assert set(counterfactual_plan.place_answers(corner, places).values()) == {"bottom-left corner"}
    line = {(7, "top-left corner"): 0.87, (7, "top-right corner"): 0.44, (7, "top strip 25%"): 0.85,
            (7, "left strip 25%"): 0.21, (2, "bottom-right corner"): 0.5}  # fmt: skip
    answers = counterfactual_plan.place_answers(line, places)
    assert {by for (cls, _), by in answers.items() if cls == 7} == {"top strip 25%"}
    assert answers[(2, "bottom-right corner")] == "bottom-right corner"  # another class's own cue
    frame = {(6, "outer band"): 0.99, (6, "left strip 25%"): 0.36, (6, "right strip 25%"): 0.21}
    assert set(counterfactual_plan.place_answers(frame, places).values()) == {"outer band"}
    # the text line whose strip did not fail (the object control excused its most-attended pixels)
    corners = {(7, "top-left corner"): 0.6, (7, "top-right corner"): 0.4}
    assert set(counterfactual_plan.place_answers(corners, places).values()) == {"top strip 25%"}
    framed = {(6, "outer band"): 0.99, (6, "top-left corner"): 0.5, (6, "top-right corner"): 0.4}
    assert set(counterfactual_plan.place_answers(framed, places).values()) == {"outer band"}
    apart = {(3, "top-left corner"): 0.6, (3, "bottom-right corner"): 0.5}  # nothing holds both
    assert counterfactual_plan.place_answers(apart, places) == {k: k[1] for k in apart}


def test_counterfactual_tone_swap_and_patch_paste() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1] * 4)
    images = torch.randint(0, 60, (8, 1, 8, 8), dtype=torch.uint8)
    tone = counterfactual.ToneCue(0, torch.tensor([[[150.0, 20.0]]]), torch.tensor([[[30.0, 10.0]]]))
    out, _ = counterfactual.Counterfactual([tone], rate=1.0)(images, labels)
    means = out.float().mean((1, 2, 3))
    assert torch.allclose(means[labels == 1], torch.tensor(150.0), atol=2)  # the class's tone given to others
    assert torch.allclose(means[labels == 0], torch.tensor(30.0), atol=2)  # the others' tone to the class
    patch = counterfactual.PatchCue(
        0, "recurring patch 1", (torch.full((1, 3, 3), 255).to(torch.uint8),), 1.0
    )
    out, _ = counterfactual.Counterfactual([patch], rate=0.0)(images, labels)  # at its share, not the rate
    assert ((out[labels == 1] == 255).sum((1, 2, 3)) == 9).all() and torch.equal(
        out[labels == 0], images[labels == 0]
    )


def test_a_later_round_acts_only_on_what_the_training_did_not_have() -> None:
    """`beyond`: a re-audit's plan less the cues an earlier round trained with; a finding one of those
    answers still fails with its counterfactual in the training, so it is listed, with that reason."""
    mask = torch.zeros(8, 8, dtype=torch.bool)
    grey = torch.zeros(1, 8, 8, dtype=torch.uint8)
    left, right = (
        counterfactual.PlaceCue(1, p, mask, grey, grey) for p in ("top-left corner", "top-right corner")
    )
    tone = counterfactual.ToneCue(0, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    plan = counterfactual_plan.Plan(
        (left, right, tone),
        ({"class": "b", "test": "transplant:top-left corner", "cue": "top-left corner"},
         {"class": "b", "test": "transplant:top-right corner", "cue": "top-right corner"},
         {"class": "a", "test": "transplant_tone", "cue": "tone"}),
        ({"class": "a", "test": "masks", "why": "a masks finding ..."},),
    )  # fmt: skip
    used = {counterfactual_plan.cue_key(left), counterfactual_plan.cue_key(tone)}
    assert used == {(1, "top-left corner"), (0, "tone")}
    later = counterfactual_plan.beyond(plan, used, ["a", "b"])
    assert later.cues == (right,)
    assert [a["test"] for a in later.addressed] == ["transplant:top-right corner"]
    again = [n for n in later.not_addressed if "earlier round" in n["why"]]
    assert [(n["class"], n["test"]) for n in again] == [
        ("b", "transplant:top-left corner"),
        ("a", "transplant_tone"),
    ]
    assert later.not_addressed[0]["test"] == "masks"
    assert counterfactual_plan.beyond(plan, used | {(1, "top-right corner")}, ["a", "b"]).cues == ()


def test_a_second_round_acts_on_the_reaudits_findings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Round 1 cures the text line where it begins and its re-audit fails at the line's other end;
    round 2 plans from that re-audit, trains with both rounds' counterfactuals and passes: the report
    holds both rounds, each run linked to the one before, and the released model is round 2's."""
    cured = fixtures_cure.cured(MOVES_ALONG_THE_LINE, tmp_path_factory, "rounds", rounds=2)
    audited, report = cured.audited, cured.report
    assert audited.report["verdict"] == "fail" and audited.cue_flips >= LEARNED
    first, second = report["rounds"]
    assert first["audit_verdict"] == "fail" and first["parent_run_id"] == audited.result.run_id
    first_cues = {a["cue"] for a in first["addressed"]}
    new = {a["cue"] for a in second["addressed"]} - first_cues
    assert new, (first["addressed"], second["addressed"])  # a place round 1 had no counterfactual for
    reaudit = {(f["class"], f["test"]) for f in second["findings"]}  # round 1's re-audit's failures
    assert {(a["class"], a["test"]) for a in second["addressed"]} <= reaudit
    assert first_cues | new == {c["place"] for c in second["counterfactuals"][:-1]}  # both rounds' cues
    assert not any(f["fails_after"] for f in second["findings"]), second["findings"]
    assert (
        report["status"] == "cured" and report["after"]["audit_verdict"] == "pass" == second["audit_verdict"]
    )
    assert report["stopped"] == "round 2's re-audit is pass"
    assert cured.cue_flips < CURED, cured.cue_flips  # ground truth on round 2's model
    assert cured.images_lost <= IMAGES_LOST, (cured.clean_accuracy, cured.clean_model_accuracy, cured.images)
    assert report["run_id"] == second["run_id"] == report["release"]["run_id"]  # released: round 2's
    assert report["kept_round"] == 2
    store = MlflowClient(audited.params.tracking.uri)
    tags = store.get_run(second["run_id"]).data.tags
    assert (tags["cnnops.cure.parent_run_id"], tags["cnnops.cure.round"]) == (first["run_id"], "2")
    assert store.get_run(first["run_id"]).data.tags["cnnops.cure.child_run_id"] == second["run_id"]


def test_a_passing_reaudit_with_a_significant_residual_on_the_cured_class_starts_round_two(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`finetune`'s first round on the text line passes its re-audit with the line's other end still
    read (significant after adjustment, under the flip threshold): the residual rule plans round 2
    from that test, which takes the line's ground-truth flips down, and cure.json names the residual."""
    cured = fixtures_cure.cured(RESIDUAL_LINE, tmp_path_factory, "residual", mode="finetune", rounds=2)
    audited, report = cured.audited, cured.report
    assert audited.report["verdict"] == "fail" and audited.cue_flips >= LEARNED
    first, second = report["rounds"]
    assert first["audit_verdict"] == "pass" and first["residual"] == [], first
    significance = audited.params.audit.significance
    residual = second["residual"]  # the passing re-audit's tests that started round 2
    assert residual and all(
        t["class"] == "0" and t["value"] > 0 and t["p_adjusted"] <= significance for t in residual
    ), residual
    assert all(t["value"] < audited.params.audit.transplant_flip_threshold for t in residual)  # no failure
    assert {a["test"] for a in second["addressed"]} <= {t["test"] for t in residual}
    assert second["addressed"] and second["findings"] == []  # planned from the residual, not failures
    assert (report["status"], report["residual"]) == ("cured", []), report["stopped"]
    started = "round 2's re-audit is pass; round 2 was started by a residual: class '0' "
    started += residual[0]["test"]
    assert report["stopped"].startswith(started), report["stopped"]
    # ground truth on round 2's model: the line no longer learned (one round of `finetune` left 0.48,
    # benchmarks/cure.py). Measured 0.051 here, one thread; 0.026 in the benchmark's two: at the bound
    assert cured.cue_flips < LEARNED, cured.cue_flips


def test_a_residual_is_a_significant_positive_test_of_a_cured_class() -> None:
    """`counterfactual_plan.residuals`: of a re-audit's tests, those of the given classes whose flip
    rate beats their control at an adjusted p-value at most the significance, as failures."""
    tests = [
        {"class": "0", "test": "transplant:bottom-right corner", "effect": 0.16, "p_adjusted": 0.02},
        {"class": "0", "test": "transplant:top-left corner", "effect": 0.16, "p_adjusted": 0.06},
        {"class": "0", "test": "transplant_top", "effect": -0.05, "p_adjusted": 0.01},
        {"class": "1", "test": "transplant:outer band", "effect": 0.3, "p_adjusted": 0.001},
    ]
    found = counterfactual_plan.residuals({"tests": tests}, {"0"}, 0.05)
    assert found == ({"class": "0", "test": "transplant:bottom-right corner", "value": 0.16,
                      "p_adjusted": 0.02},)  # fmt: skip


def test_a_place_known_only_from_saliency_leaves_the_class_properties_their_own_cue() -> None:
    """A sharpened class's most-attended pixels sit on its strokes: their place's swap is no answer
    to its sharpness (measured: the cue kept flipping 10%), while a transplanted corner answers the
    grain its tag brings."""
    wanted = {
        (0, "top edge strip 25%"): [{"class": "a", "test": "transplant_top", "value": 0.6}],
        (0, "property:sharpness"): [{"class": "a", "test": "property:sharpness", "value": 0.8}],
        (1, "top-left corner"): [{"class": "b", "test": "transplant:top-left corner", "value": 0.9}],
        (1, "property:noise"): [{"class": "b", "test": "property:noise", "value": 0.5}],
        (2, "recurring patch 1"): [{"class": "c", "test": "patch:recurring patch 1 at its own place"}],
        (3, "tone"): [{"class": "d", "test": "transplant_tone", "value": 0.9}],
        (4, "left strip 25%"): [{"class": "e", "test": "deletion", "value": 0.4}],
    }  # fmt: skip
    assert counterfactual_plan._seen_at_a_place(wanted) == {1, 2}


def test_a_kept_round_comes_back_only_for_the_same_inputs(tmp_path: Path) -> None:
    """`cure_resume`: a round's checkpoint and reports come back byte for byte when its record matches
    the inputs' key, the parent run and the plan; any of those changed, or a torn checkpoint, and the
    round is trained again (None)."""
    model, folder, store = tmp_path / "models" / "model.pt", tmp_path / "reports", tmp_path / "rounds"
    (folder / "audit").mkdir(parents=True)
    model.parent.mkdir()
    model.write_bytes(b"weights")
    (folder / "audit.json").write_text('{"verdict": "fail"}')
    (folder / "audit" / "index.html").write_text("gallery")
    outputs = cure_resume.Outputs(model, folder)
    expected = {"key": "k", "parent_run_id": "p", "plan": {"addressed": ({"class": "3"},)}}
    cure_resume.save(store, 1, {**expected, "run_id": "r1"}, outputs)
    model.write_bytes(b"round 2, half trained")
    (folder / "audit.json").write_text("{")
    assert cure_resume.restore(store, 1, expected, outputs)["run_id"] == "r1"
    assert model.read_bytes() == b"weights" and (folder / "audit.json").read_text() == '{"verdict": "fail"}'
    assert (folder / "audit" / "index.html").read_text() == "gallery"
    for changed in ({"key": "other"}, {"parent_run_id": "q"}, {"plan": {"addressed": []}}):
        assert cure_resume.restore(store, 1, {**expected, **changed}, outputs) is None, changed
    assert cure_resume.restore(store, 2, expected, outputs) is None  # never kept
    (store / "1" / model.name).write_bytes(b"torn")
    assert cure_resume.restore(store, 1, expected, outputs) is None
    for broken in (b"{", b"[]", b"\xff"):  # an edited or broken record: trained again, no traceback
        (store / "1" / cure_resume.RECORD).write_bytes(broken)
        assert cure_resume.restore(store, 1, expected, outputs) is None, broken
    cure_resume.clear(store)
    assert not store.exists()


def _round(number: int, verdict: str, failures: list[tuple[str, str]], accuracy: float) -> cure._Round:
    audit = {
        "verdict": verdict,
        "classes": {},
        "tests": [],
        "failures": [{"class": c, "test": t} for c, t in failures],
    }
    empty = counterfactual_plan.Plan((), (), ())
    return cure._Round(number, empty, (), audit, None, f"r{number}", {"accuracy": accuracy})


def test_a_later_round_worse_than_an_earlier_one_is_not_the_model_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hue cure on scenes (docs/audit.md): round 1 cleared the failed audit's findings but its
    re-audit failed another class; round 2 answered that and came out inconclusive, with objects of
    that class wiped out. Release refuses both, so the better of them is kept: the one that leaves
    fewer of the first audit's findings failing, then the more accurate (the later of equals); its
    model and reports are put back in place from the kept rounds, and the log says why."""
    paths = cure_paths(tmp_path)
    hue = [("3", "property:hue"), ("3", "transplant_mean:outer band")]
    done = [_round(0, "fail", hue, 0.9), _round(1, "fail", [("9", "transplant:centre")], 0.8)]
    done.append(_round(2, "inconclusive", [], 0.7))
    outputs = cure_resume.Outputs(paths.out, paths.folder)
    for r in done[1:]:
        paths.folder.mkdir(parents=True, exist_ok=True)
        paths.out.parent.mkdir(parents=True, exist_ok=True)
        paths.out.write_bytes(f"round {r.number}".encode())
        (paths.folder / "audit.json").write_text(json.dumps(r.audit))
        cure_resume.save(paths.rounds, r.number, {"run_id": r.run_id}, outputs)
    params = parse_params({})
    with caplog.at_level(logging.WARNING):
        assert cure._kept_round(params, paths, done) is done[1]
    assert (
        paths.out.read_bytes() == b"round 1"
        and json.loads((paths.folder / "audit.json").read_text()) == done[1].audit
    )
    assert "round 1's model is kept, not round 2's" in caplog.text
    assert "round 2: re-audit inconclusive, 0 of the failed audit's findings still fail" in caplog.text
    # a finding of the first audit still failing on round 1 outweighs its accuracy; the later of equals
    done[1] = _round(1, "fail", hue[:1], 0.8)
    assert cure._kept_round(params, paths, done) is done[2]
    done[1] = _round(1, "inconclusive", [], 0.7)
    assert cure._kept_round(params, paths, done) is done[2]
    # a pass outranks any failure, whatever its accuracy
    done[1] = _round(1, "pass", [], 0.5)
    assert cure._kept_round(params, paths, done) is done[1]


def test_a_cure_killed_in_round_two_resumes_at_round_two(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """`cnnops cure` in a process of its own, SIGKILLed once round 1 is kept and round 2 has trained an
    epoch; run again, it takes round 1 back (no MLflow run of a round 1 is started, nothing trained
    for it), resumes round 2's training from its epoch, and reaches the uninterrupted cure's verdicts."""
    audited, _ = fixtures_cure.audited(MOVES_ALONG_THE_LINE, tmp_path_factory)
    paths, params = cure_paths(audited.root, name="killed"), enabled(audited.params, rounds=2)
    kept, log_file = paths.rounds / "1" / cure_resume.RECORD, paths.report.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the in-process cures
    with (
        log_file.open("w") as out,
        subprocess.Popen(
            fixtures_cure.cure_command(paths, params), cwd=audited.root, env=env, stdout=out, stderr=out
        ) as proc,
    ):
        while not (kept.is_file() and paths.state.is_file()) and proc.poll() is None:
            time.sleep(0.1)  # round 1 kept, round 2's first epoch saved
        proc.kill()
    assert kept.is_file() and paths.state.is_file() and not paths.report.exists(), log_file.read_text()[
        -3000:
    ]
    first = json.loads(kept.read_text())
    store = MlflowClient(params.tracking.uri)
    experiment = [store.get_experiment_by_name(params.tracking.experiment).experiment_id]
    before = {r.info.run_id for r in store.search_runs(experiment)}
    with one_thread(), caplog.at_level(logging.INFO):
        report = cure.run(params, paths).report
    assert f"round 1 taken back from {paths.rounds / '1'}" in caplog.text and "resuming" in caplog.text
    assert "round 1's re-audit" not in caplog.text  # not audited again
    started = [r for r in store.search_runs(experiment) if r.info.run_id not in before]
    assert not any(r.data.tags.get("cnnops.cure.round") == "1" for r in started), started
    assert report["rounds"][0]["run_id"] == first["run_id"]
    whole = fixtures_cure.cured(MOVES_ALONG_THE_LINE, tmp_path_factory, "rounds", rounds=2).report
    verdicts = [(r["audit_verdict"], r["accuracy"]) for r in report["rounds"]]
    assert verdicts == [(r["audit_verdict"], r["accuracy"]) for r in whole["rounds"]], (report, whole)
    assert (report["status"], report["stopped"]) == (whole["status"], whole["stopped"])
    assert not paths.rounds.exists() and not paths.state.exists()  # a finished cure leaves no state
