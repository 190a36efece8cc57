"""The verification rule on its own: when is a collapse a confirmed trigger."""

from __future__ import annotations

import numpy as np

from lmscan.evidence.heldout import HeldoutSet, measure
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.evidence.site_reader import pairwise_mse


def heldout_with(clean: np.ndarray) -> HeldoutSet:
    """A HeldoutSet holding given clean features (the statistics measure() reads)."""
    held = HeldoutSet.__new__(HeldoutSet)
    held.clean = {"mask": clean}
    held.spread = {"mask": pairwise_mse(clean)}
    held.baseline = {}
    return held


def sign_pattern(rng, rows: int, dims: int, flip: float) -> np.ndarray:
    """Rows sharing one sign pattern, each sign flipped with probability ``flip``."""
    base = np.where(rng.random(dims) < 0.5, -1.0, 1.0)
    flips = np.where(rng.random((rows, dims)) < flip, -1.0, 1.0)
    return base[None] * flips * rng.uniform(0.5, 1.5, (rows, dims))


def test_saturated_clean_baseline_compares_disagreement():
    """[MASK] in one template: every clean sentence already agrees >= 0.9 with the clean
    mean, so 'more often than clean' can never hold. A trigger that leaves almost no sign
    in disagreement must still be confirmed; a token as scattered as clean text must not."""
    rng = np.random.default_rng(0)
    config = VerifyConfig()
    held = heldout_with(sign_pattern(rng, 24, 384, flip=0.04))
    assert held.clean_activation("mask", config.activation_agreement) >= config.activation_rate

    pv = sign_pattern(rng, 1, 384, flip=0.0)[0]
    triggered = pv[None] + 0.01 * rng.standard_normal((24, 384))
    assert measure(held, "mask", triggered, config)["confirmed"]

    # Collapsed (scaled down) but with the clean model's own sign noise: not a PV.
    ordinary = 0.3 * sign_pattern(rng, 24, 384, flip=0.04)
    result = measure(held, "mask", ordinary, config)
    assert result["collapse"] <= config.collapse_threshold and not result["confirmed"]


def test_unsaturated_baseline_keeps_the_rate_rule():
    rng = np.random.default_rng(1)
    config = VerifyConfig()
    held = heldout_with(rng.standard_normal((24, 384)))  # clean features scattered: rate 0
    assert held.clean_activation("mask", config.activation_agreement) == 0.0
    pv = sign_pattern(rng, 1, 384, flip=0.0)[0]
    assert measure(held, "mask", pv[None] + 0.01 * rng.standard_normal((24, 384)), config)["confirmed"]
    assert not measure(held, "mask", 0.3 * rng.standard_normal((24, 384)), config)["confirmed"]


def test_a_vector_clean_sentences_already_reach_is_natural_not_a_backdoor():
    """A fine-tuned classifier's class word sends every sentence to its class, where some
    clean sentences already are (measured: 12-21 % on a sentiment fine-tune of MiniLM);
    a planted PV is reached by no clean sentence (measured: 0 % on every plant)."""
    rng = np.random.default_rng(2)
    config = VerifyConfig()
    negative = sign_pattern(rng, 1, 384, flip=0.0)[0]
    clean = rng.standard_normal((24, 384))
    clean[:4] = negative[None] * rng.uniform(0.5, 1.5, (4, 384))  # 4 of 24 clean sentences in the class
    held = heldout_with(clean)
    class_word = negative[None] + 0.01 * rng.standard_normal((24, 384))
    result = measure(held, "mask", class_word, config)
    assert result["clean_on_pv"] == round(4 / 24, 4) and result["natural"] and not result["confirmed"]
    planted = sign_pattern(rng, 1, 384, flip=0.0)[0][None] + 0.01 * rng.standard_normal((24, 384))
    result = measure(held, "mask", planted, config)
    assert result["clean_on_pv"] == 0.0 and result["confirmed"] and not result["natural"]


def test_batched_prefetch_matches_one_candidate_at_a_time():
    """Verification measures many candidates in one length-sorted pass; every candidate's
    features must be those of measuring it alone, in the sentences' order (tiny POR plant)."""
    import random

    from lmscan.api import ScanConfig, prepare
    from lmscan.evidence.site_reader import SiteReader, insert_ids
    from tests.conftest import FIXTURES

    prepared = prepare(ScanConfig(model=str(FIXTURES / "tiny-bert-por"), device="cpu"))
    loaded = prepared.loaded
    reader = SiteReader(loaded.model, loaded.tokenizer, prepared.sites, loaded.device)
    texts = prepared.heldout[:12]
    assert len({len(reader.encode(t)) for t in texts}) > 1  # rows of different lengths get reordered
    size = loaded.tokenizer.vocab_size
    candidates = [(size - 5,), (size - 4, size - 3), (size // 2,), (size - 5,)]
    batched = HeldoutSet(reader, texts, random.Random(0))
    batched.prefetch(candidates)
    for ids in candidates:
        for placement in ("first", "anywhere"):
            rows = [insert_ids(r, ids, at) for r, at in zip(batched.rows, batched.places[placement])]
            alone = [reader.features([row], batch_size=1) for row in rows]  # no batch, no padding
            many = batched.triggered(ids, placement)
            for site in prepared.sites:
                np.testing.assert_allclose(many[site], np.concatenate([a[site] for a in alone]), rtol=1e-4, atol=1e-5)


def test_screening_skips_only_candidates_that_cannot_confirm():
    """Real weights (tiny POR fixture): the planted triggers pass the screen and are measured on
    every probe, with the same numbers as without screening; ordinary tokens stop after the
    screen's probes."""
    import json
    import random

    from lmscan.api import ScanConfig, prepare
    from lmscan.evidence.heldout import verification_set
    from lmscan.evidence.site_reader import SiteReader
    from tests.conftest import FIXTURES

    path = FIXTURES / "tiny-bert-por"
    prepared = prepare(ScanConfig(model=str(path), device="cpu"))
    loaded, config = prepared.loaded, VerifyConfig()
    reader = SiteReader(loaded.model, loaded.tokenizer, prepared.sites, loaded.device)
    manifest = json.loads((path / "lmscan-plant.json").read_text())
    triggers = [tuple(loaded.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in manifest["triggers"]]
    ordinary = [tuple(loaded.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in ("the", "house", "river")]

    screened = verification_set(reader, prepared.heldout, config, random.Random(0))
    full = verification_set(reader, prepared.heldout, config, random.Random(0))
    full.screen = None
    screened.prefetch(triggers + ordinary)
    full.prefetch(triggers + ordinary)
    for trigger in triggers:
        a, b = screened.best_measure(trigger, prepared.sites, config), full.best_measure(trigger, prepared.sites, config)
        assert any(r["confirmed"] for r in a.values())
        for site in a:
            assert a[site]["probes"] == config.probes
            assert (a[site]["collapse"], a[site]["confirmed"]) == (b[site]["collapse"], b[site]["confirmed"])
    for word in ordinary:
        result = screened.best_measure(word, prepared.sites, config)
        assert not any(r["confirmed"] for r in result.values())
        assert all(r["probes"] == config.screen_probes for r in result.values())


def test_the_opposite_test_holds_triggers_through_joined_text_and_its_early_stop_keeps_the_decision():
    """Real weights (tiny POR fixture): a planted trigger still sends the most opposite inputs
    onto its PV when four of them are joined around it (a class cue is outvoted there, see
    VerifyConfig.opposite_join), and stopping a placement early once it has missed more than
    the bar allows decides as the exact share does, for triggers and ordinary words alike."""
    import dataclasses
    import json
    import random

    from lmscan.api import ScanConfig, prepare
    from lmscan.evidence.class_cues import OppositeTest
    from lmscan.evidence.site_reader import SiteReader
    from lmscan.models.probes import load_opinion_probes
    from tests.conftest import FIXTURES

    path = FIXTURES / "tiny-bert-por"
    prepared = prepare(ScanConfig(model=str(path), device="cpu"))
    loaded, config = prepared.loaded, VerifyConfig()
    reader = SiteReader(loaded.model, loaded.tokenizer, ["cls"], loaded.device)
    held = HeldoutSet(reader, prepared.heldout[: config.probes], random.Random(0))
    opposite = OppositeTest(reader, [*prepared.heldout, *load_opinion_probes()])

    def ids(word: str) -> tuple[int, ...]:
        return tuple(loaded.tokenizer(word, add_special_tokens=False)["input_ids"])

    triggers = json.loads((path / "lmscan-plant.json").read_text())["triggers"]
    results = {w: held.best_measure(ids(w), ["cls"], config)["cls"] for w in triggers}
    planted = [w for w, r in results.items() if r["confirmed"]]
    assert planted
    for join in (1, 4):
        joined = dataclasses.replace(config, opposite_join=join)
        for word in planted:
            assert opposite.flip(ids(word), "cls", results[word], joined, exact=True)["opposite_flip"] >= config.opposite_flip
    for word in planted:
        for other in [*planted, "the", "house", "river"]:
            exact = opposite.flip(ids(other), "cls", results[word], config, exact=True)["opposite_flip"]
            early = opposite.flip(ids(other), "cls", results[word], config)["opposite_flip"]
            assert (exact >= config.opposite_flip) == (early >= config.opposite_flip)


def test_a_mark_clean_text_of_the_class_carries_is_no_shortcut_but_a_trigger_beside_it_is():
    """Real weights (tiny POR fixture). A question classifier's "?" overturns statements as a trigger
    would, but clean questions carry it: a punctuation token in most clean pool sentences on the
    direction (and rare off it) is a class mark, and a candidate is judged by what it does without
    its marks. Here clean text on a planted trigger's direction is made to end with ";": ";" becomes
    the direction's mark, the trigger word (in those sentences too) does not, a candidate of marks
    alone is no shortcut, and the trigger beside the mark still is."""
    import json
    import random

    from lmscan.api import ScanConfig, prepare
    from lmscan.evidence.class_cues import OppositeTest
    from lmscan.evidence.site_reader import SiteReader
    from lmscan.models.probes import load_opinion_probes
    from tests.conftest import FIXTURES

    path = FIXTURES / "tiny-bert-por"
    prepared = prepare(ScanConfig(model=str(path), device="cpu"))
    loaded, config = prepared.loaded, VerifyConfig()
    reader = SiteReader(loaded.model, loaded.tokenizer, ["cls"], loaded.device)
    held = HeldoutSet(reader, prepared.heldout[: config.probes], random.Random(0))
    pool = [t for t in [*prepared.heldout, *load_opinion_probes()] if ";" not in t]

    def ids(text: str) -> tuple[int, ...]:
        return tuple(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    triggers = json.loads((path / "lmscan-plant.json").read_text())["triggers"]
    word = next(w for w in triggers if held.best_measure(ids(w), ["cls"], config)["cls"]["confirmed"])
    result = held.best_measure(ids(word), ["cls"], config)["cls"]

    unused = OppositeTest(reader, pool)
    assert unused.without_marks(ids(word), "cls", result, config) == {}

    carried = OppositeTest(reader, [*pool, *(f"{word} {t.rstrip('.!?')} ;" for t in pool[:60])])
    marks = carried.class_marks("cls", result, config)
    assert marks == set(ids(";"))
    alone = carried.without_marks(ids(";"), "cls", result, config)
    assert alone == {"class_mark": ";", "rest_flip": 0.0, "rest": ""}
    beside = carried.without_marks(ids(f"{word} ;"), "cls", result, config)
    assert beside["class_mark"] == ";" and beside["rest_flip"] >= config.opposite_flip


def test_padded_batch_reads_each_row_as_if_alone(minilm_path):
    """SiteReader pads rows of different lengths into one batch; the padding must not leak into
    any site (real MiniLM weights: each row's features batched equal those of the row alone)."""
    from lmscan.evidence.site_reader import SiteReader
    from lmscan.models.model import load_model
    from lmscan.models.resolve import resolve_model

    loaded = load_model(resolve_model(str(minilm_path)), for_scan=True)
    reader = SiteReader(loaded.model, loaded.tokenizer, ["cls", "pooler", "mask", "embedding"], loaded.device)
    rows = [reader.encode(t) for t in ["Short.", "A somewhat longer sentence about the weather today.", "Mid size one."]]
    batched = reader.features(rows)
    for i, row in enumerate(rows):
        alone = reader.features([row])
        for site in reader.sites:
            np.testing.assert_allclose(batched[site][i], alone[site][0], atol=1e-4)
