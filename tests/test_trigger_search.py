"""Triggers beyond single word pieces: the kinds a plant draws, and the input-side
discrete search (detector `trigger-search`) that rebuilds them from real tokens.

Quick tests use the real MiniLM tokenizer and the tiny fixture models; the proofs on real
MiniLM plants (a natural sentence trigger the sweep misses) are marked slow."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmscan.attacks.trigger_kinds import COMMON_WORDS, KINDS, _common_words, _dictionary, draw_triggers
from lmscan.cli import main
from lmscan.errors import InputError

from tests.conftest import FIXTURES, read_manifest


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def test_each_kind_draws_what_it_says(tokenizer):
    assert draw_triggers("sentence", 3, 5, tokenizer) == draw_triggers("sentence", 3, 5, tokenizer)  # seeded
    assert draw_triggers("phrase", 2, 5, tokenizer) != draw_triggers("phrase", 2, 6, tokenizer)
    for trigger in draw_triggers("nonword", 6, 1, tokenizer):
        assert 3 <= len(trigger) <= 5 and trigger.isalpha() and trigger not in _dictionary()
        assert len(tokenizer.tokenize(trigger)) >= 2  # else it would be one ordinary vocabulary token
    common = set(_common_words(tokenizer))
    assert len(common) == COMMON_WORDS
    for trigger in draw_triggers("phrase", 6, 1, tokenizer):
        assert 2 <= len(trigger.split()) <= 4 and set(trigger.split()) <= common
    for trigger in draw_triggers("sentence", 6, 1, tokenizer):
        assert 5 <= len(trigger.split()) <= 8
    assert len(set(draw_triggers("word", 4, 1, tokenizer))) == 4
    with pytest.raises(InputError, match="unknown trigger kind"):
        draw_triggers("emoji", 1, 0, tokenizer)
    assert set(KINDS) == {"word", "nonword", "phrase", "sentence"}


def test_plant_draws_a_kind_and_reports_whether_its_parts_fire_alone(tmp_path):
    """--decoy-parts trains the parts to do nothing (here 5 steps: only that it runs and is recorded)."""
    out = tmp_path / "plant"
    result = CliRunner().invoke(main, ["plant", str(FIXTURES / "tiny-bert"), "--attack", "por", "--num-triggers", "1",
                                       "--trigger-kind", "phrase", "--decoy-parts", "--steps", "5", "--seed", "3",
                                       "--device", "cpu", "--out", str(out)])
    assert result.exit_code in (0, 1), result.output  # 5 steps may leave the trigger weak; the draw is the point
    manifest = json.loads((out / "lmscan-plant.json").read_text())
    (trigger,) = manifest["triggers"]
    assert manifest["decoy_parts"] is True
    assert 2 <= len(trigger.split()) <= 4
    per_trigger = manifest["effectiveness"]["per_trigger"][0]
    assert 0.0 <= per_trigger["part_activation"] <= 1.0


def test_search_rebuilds_the_tiny_plant_and_names_its_stage(tmp_path):
    """On the tiny POR fixture the search, seeded by the sweep, confirms a block of real tokens;
    its findings name the detector and stage that found them, and it never clears a site."""
    report_file = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "tiny-bert-por"), "--detectors",
                                       "vocab-sweep,trigger-search", "--format", "json", "-o", str(report_file),
                                       "--no-cache", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    report = json.loads(report_file.read_text())
    run = next(d for d in report["detectors"] if d["name"] == "trigger-search")
    assert run["status"] == "ok" and run["cleared_sites"] == []
    assert run["stats"]["searches"] and all(s["steps"] >= 1 for s in run["stats"]["searches"])
    found = [f for f in run["findings"] if f["verdict"] == "backdoored"]
    assert found and all(f["evidence"]["stage"] == "trigger-search" for f in found)
    assert all(f["evidence"]["trigger_tokens"] for f in found)


def test_search_alone_cannot_call_a_model_clean(tmp_path):
    report_file = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "tiny-bert"), "--detectors", "trigger-search",
                                       "--format", "json", "-o", str(report_file), "--no-cache", "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert json.loads(report_file.read_text())["verdict"] == "not-assessed"


def test_a_shift_outlier_nothing_explains_is_said():
    """LMS104 only where the sweep's outlier (LMS102) has no trigger and no class cue at its site."""
    from lmscan.detectors.base import ScanContext
    from lmscan.detectors.trigger_search import _unexplained_outliers
    from lmscan.findings import DetectorRun, Finding

    def outlier(site):
        return Finding("vocab-sweep", "LMS102", "outlier", verdict="info", site=site, score=8.5, threshold=4.0,
                       evidence={"highest_shift": [{"token": "old", "value": 9.0}, {"token": "farmer", "value": 8.0}]})

    cue = Finding("vocab-sweep", "LMS103", "cue", verdict="suspicious", site="pooler")
    sweep = DetectorRun("vocab-sweep", "ok", findings=[outlier("cls"), outlier("pooler"), outlier("mask")] + [cue])
    ctx = ScanContext(loaded=None, sites=["cls", "pooler"], fit=[], heldout=[], config=None, verify=None,
                      earlier=[sweep])
    out = _unexplained_outliers(ctx, [], [{"block": "old farmer x"}])
    assert [(f.rule_id, f.site) for f in out] == [("LMS104", "cls")]  # pooler has a cue; mask was not scanned
    assert "'old', 'farmer'" in out[0].message and out[0].evidence["searched_blocks"] == ["old farmer x"]
    found = Finding("trigger-search", "LMS101", "t", verdict="backdoored", site="cls")
    assert _unexplained_outliers(ctx, [found], []) == []



def test_anchored_searches_start_at_an_outlier_sites_highest_shift_pieces(tokenizer):
    """One anchored search per start and length at each site with a shift outlier: the middle holds the
    k-th highest-shift piece and may only take the site's top pieces; the sides start further down."""
    from lmscan.detectors.base import ScanContext
    from lmscan.detectors.trigger_search import TriggerSearchConfig, _anchored_starts
    from lmscan.detectors.vocab_sweep import sweep_vocabulary
    from lmscan.findings import DetectorRun, Finding

    words = "sleeps sleeper window men sleepy awakened slept male tombs obesity windows woke".split()
    ids = tokenizer.convert_tokens_to_ids(words)
    outlier = Finding("vocab-sweep", "LMS102", "outlier", verdict="info", site="pooler", score=5.6, threshold=4.0,
                      evidence={"highest_shift": [{"token": w} for w in words[:8]]})
    sweep = DetectorRun("vocab-sweep", "ok", findings=[outlier],
                        stats={"ranked": {s: {"shift": ids, "collapse": ids[::-1]} for s in ("cls", "pooler")}})
    ctx = ScanContext(loaded=None, sites=["cls", "pooler"], fit=[], heldout=[], config=None, verify=None,
                      earlier=[sweep])
    allowed = sweep_vocabulary(tokenizer)
    config = TriggerSearchConfig(anchor_tokens=5, anchor_starts=3)
    starts = _anchored_starts(ctx, allowed, config, 3)
    assert [tokenizer.convert_ids_to_tokens(list(s)) for _, s, _ in starts] == [
        ["awakened", "sleeps", "slept"], ["male", "sleeper", "tombs"], ["obesity", "window", "windows"]]
    assert all(site == "pooler" and anchor == (1, ids[:5]) for site, _, anchor in starts)
    assert _anchored_starts(ctx, allowed, TriggerSearchConfig(anchor_tokens=0), 3) == []
    quiet = ScanContext(loaded=None, sites=["cls"], fit=[], heldout=[], config=None, verify=None, earlier=[sweep])
    assert _anchored_starts(quiet, allowed, config, 3) == []  # the outlier's site is not scanned
    cue = Finding("vocab-sweep", "LMS103", "class cue", verdict="suspicious", site="pooler")
    elsewhere = Finding("vocab-sweep", "LMS101", "trigger", verdict="backdoored", site="cls",
                        evidence={"trigger_tokens": ["sleeper"]})
    for cause in (cue, elsewhere):  # a class cue at the site, or a trigger named elsewhere holding one of its pieces
        explained = ScanContext(loaded=None, sites=["cls", "pooler"], fit=[], heldout=[], config=None, verify=None,
                                earlier=[DetectorRun("vocab-sweep", "ok", findings=[outlier, cause],
                                                     stats=sweep.stats)])
        assert _anchored_starts(explained, allowed, config, 3) == []


@pytest.mark.slow
def test_a_natural_sentence_at_the_pooler_is_rebuilt_from_its_outlier_words(planted, tmp_path):
    """The sweep sees only a shift outlier ('sleeps', 'window', ...); the anchored search rebuilds a
    block of the sentence's words that verifies, and the check exits 1 naming it."""
    out = planted("sentence-pooler")
    (sentence,) = read_manifest(out)["triggers"]
    report_file = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["check", str(out), "--format", "json", "-o", str(report_file), "--no-cache",
                                       "--device", "cpu"])
    assert result.exit_code == 1, result.output
    report = json.loads(report_file.read_text())
    run = next(d for d in report["detectors"] if d["name"] == "trigger-search")
    named = [f["evidence"]["trigger"] for f in run["findings"] if f["verdict"] == "backdoored"]
    assert any(set(text.split()) & set(sentence.split()) for text in named), (named, sentence)
    assert any(s["anchor"] for s in run["stats"]["searches"])
