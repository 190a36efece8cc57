"""`lmscan demo`'s closing tally against the plant's ground truth (the demo itself plants
MiniLM: minutes; the tally is checked on findings written out by hand)."""

from __future__ import annotations

from lmscan.cli.demo import trigger_tally
from tests.conftest import FIXTURES, read_manifest


def test_trigger_tally_against_the_plants_ground_truth():
    manifest = read_manifest(FIXTURES / "tiny-bert-por")  # triggers zq (z ##q) and vx (v ##x)

    def finding(trigger, tokens, verdict="backdoored"):
        return {"verdict": verdict, "evidence": {"trigger": trigger, "trigger_tokens": tokens}}

    report = {"detectors": [{"findings": [finding("z", ["z"]), finding("vx", ["v", "##x"], verdict="suspicious")]}]}
    assert trigger_tally(report, manifest) == "recovered 1 of 2 planted triggers: zq (by its first pieces); missed: vx"
