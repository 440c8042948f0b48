"""Audit figures shared by the verdict, contract and regions tests: a clean class (every intervention
flat, attention on the object) that each test changes in one place, and the default audit params."""

from __future__ import annotations

from dataclasses import replace

from cnnops.audit.contract import Attention, ClassFigures, Deletion, Errors, Transplant
from cnnops.audit.regions import OUTER_BAND
from cnnops.config import parse_params

A = parse_params({}).audit
NONE = Transplant(flip_rate=0.0, control_flip_rate=0.0, pairs=50)
CLEAN = ClassFigures(
    n_correct=20,
    n_errors=1,
    attention=Attention(peak_spread=0.1, object_spread=0.1, peak_off_object=0.0),
    top_off_object=0.1,
    energy={OUTER_BAND: 0.2},
    energy_others={OUTER_BAND: 0.2},
    transplant_top=replace(NONE, pixels=51, where="centre"),
    transplant_regions={OUTER_BAND: NONE, "top-left corner": NONE},
    transplant_regions_mean={OUTER_BAND: NONE, "top-left corner": NONE},
    transplant_tone=NONE,
    deletion=Deletion(drop_top=0.5, drop_random=0.1, gap=0.4),  # large, but on the object
    masks=None,
    errors=Errors(n=1, energy=None, attention=None),
)
