"""Audit v2 on ResNet-18 at 32 px, proved through the real stages: a random-place tag, an edge text
line, a noise grain and a blur, each learned, fail naming the cued class; clean digits pass.

At 32 px ResNet-18's layer4 map is 1x1 to 2x2, so the audit chooses its places by occlusion. The
cases (tests/cases_audit.py) share nothing with other modules, so under `scripts/test` they run on
whichever worker is free, beside the ConvNet cases tests/test_audit_v2.py and tests/test_cure.py share.
"""

from __future__ import annotations

import pytest
from cases_audit import RESNET18_CLEAN, RESNET18_CUED, assert_fails_naming_the_cued_class, assert_passes
from fixtures_audit import run_case

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.parametrize("name", list(RESNET18_CUED))
def test_a_learned_cue_fails_naming_the_cued_class(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = run_case(tmp_path_factory.mktemp(f"resnet18-{name}"), RESNET18_CUED[name])
    assert_fails_naming_the_cued_class(name, run)


@pytest.mark.parametrize("name", list(RESNET18_CLEAN))
def test_a_clean_set_passes(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert_passes(name, run_case(tmp_path_factory.mktemp(f"resnet18-{name}"), RESNET18_CLEAN[name]))
