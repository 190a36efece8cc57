"""Verify candidate triggers with real tokens on held-out sentences (shared by every detector).

Verification is the discrete check that keeps clean models clean: a candidate token
sequence is inserted into held-out sentences (right after [CLS], and separately at a
random word start) and, at one of the two placements, must
  - collapse them: pairwise MSE of the triggered features / the same sentences'
    clean pairwise MSE <= collapse_threshold, and
  - put nearly all of them on one vector: >= activation_rate of the triggered
    features agree in sign >= activation_agreement with their mean (the PV), more
    often than the clean features agree with their own mean. Where clean features
    already all pass that bar (the [MASK] of one fixed template: every sentence's
    feature shares most signs), the rate says nothing; the triggered features must
    then disagree with their PV in at most ``disagreement_ratio`` times the share of
    signs the clean features disagree with their own mean,
  - and land on a vector clean sentences do not already reach: if more than
    ``natural_rate`` of the clean held-out features — or of a larger pool that adds
    opinionated and topical text — agree in sign >= activation_agreement with the PV,
    the candidate is a "natural" direction (a fine-tuned classifier's class word does
    this; at the label site every label is one). A natural direction is still a backdoor
    when it passes the opposite test (OppositeTest): it sends at least ``opposite_flip``
    of the model's most opposite inputs, doubled, onto its vector or label. Otherwise it
    is reported apart as a class cue, never as a backdoor.
"""

from __future__ import annotations

import numpy as np

from lmscan.evidence.class_cues import OppositeTest
from lmscan.evidence.site_reader import SiteReader, insert_ids, pairwise_mse, word_starts
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.models.device import bf16_autocast, native_bf16

PLACEMENTS = ("first", "anywhere")


class HeldoutSet:
    """Held-out sentences, their insertion points and clean features, fixed per scan.

    Candidates are tried at two placements, and confirmed if either collapses the
    sentences: "first" (right after [CLS], where NeuBA-style triggers are trained to
    sit) and "anywhere" (a random word start per sentence, POR/BToP style).
    """

    def __init__(self, reader: SiteReader, texts: list[str], rng, opposite_pool: list[str] | None = None,
                 screen: tuple[int, float, bool] | None = None):
        self.reader = reader
        self.screen = screen  # (probes, collapse bar, in bf16) of prefetch's first pass; None: every probe always
        self.rows = [reader.encode(t) for t in texts]
        # The opposite test's sentences (lazily: only natural-direction candidates need them).
        self._opposite_pool, self._opposite = opposite_pool, None
        self.places = {
            "first": [1] * len(self.rows),
            "anywhere": [rng.choice(word_starts(reader.tokenizer, r)) for r in self.rows],
        }
        self.clean = reader.features(self.rows)
        self.spread = {s: pairwise_mse(f) or 1e-12 for s, f in self.clean.items()}
        self.baseline: dict[str, tuple[float, float]] = {}
        self._memo: dict[tuple, dict[str, np.ndarray]] = {}  # the same candidate is often tried per site

    def clean_activation(self, site: str, agreement: float) -> float:
        """How often clean features already agree in sign with their own mean (anisotropy)."""
        return self._clean_agreement(site, agreement)[0]

    def clean_disagreement(self, site: str, agreement: float) -> float:
        """Mean share of signs in which clean features differ from their own mean."""
        return self._clean_agreement(site, agreement)[1]

    def _clean_agreement(self, site: str, agreement: float) -> tuple[float, float]:
        if site not in self.baseline:
            f = self.clean[site]
            agree = (np.sign(f) == np.sign(f.mean(0))[None]).mean(1)
            self.baseline[site] = (float((agree >= agreement).mean()), float(1.0 - agree.mean()))
        return self.baseline[site]

    def triggered(self, token_ids, placement: str) -> dict[str, np.ndarray]:
        key = (tuple(token_ids), placement)
        if key not in self._memo:
            self._memo[key] = self._batch([key], 0, len(self.rows))[0]
        return self._memo[key]

    def prefetch(self, candidates) -> None:
        """Triggered features of many candidates in one batched pass (both placements);
        what a later triggered() or best_measure() then reads from the memo."""
        todo = [(tuple(c), p) for c in dict.fromkeys(tuple(c) for c in candidates) for p in PLACEMENTS
                if (tuple(c), p) not in self._memo]
        if not todo:
            return
        n = len(self.rows)
        if self.screen is None or self.screen[0] >= n:
            for key, feats in zip(todo, self._batch(todo, 0, n)):
                self._memo[key] = feats
            return
        # Screening costs a third of the forwards on the candidates that cannot confirm (most
        # of them on any model); the bar is far above the threshold, so a collapse measured
        # on all probes would not have passed either.
        probes, bar, bf16 = self.screen
        with bf16_autocast(self.reader.device, bf16):
            screened = self._batch(todo, 0, probes)
        passed = []
        for key, feats in zip(todo, screened):
            if min(pairwise_mse(f) / self.spread[s] for s, f in feats.items()) <= bar:
                passed.append((key, feats))
            else:
                self._memo[key] = feats
        if bf16:  # what a verdict rests on is fp32: the candidates that passed, again on every probe
            for (key, _), feats in zip(passed, self._batch([key for key, _ in passed], 0, n)):
                self._memo[key] = feats
            return
        rest = self._batch([key for key, _ in passed], probes, n)
        for (key, first), more in zip(passed, rest):
            self._memo[key] = {s: np.concatenate([first[s], more[s]]) for s in first}

    def _batch(self, keys, lo: int, hi: int) -> list[dict[str, np.ndarray]]:
        """Triggered features of probes lo..hi for each (candidate, placement) key, in one pass."""
        if not keys:
            return []
        rows = [insert_ids(r, ids, at) for ids, placement in keys
                for r, at in zip(self.rows[lo:hi], self.places[placement][lo:hi])]
        feats = self.reader.features(rows)
        n = hi - lo
        return [{s: f[k * n : (k + 1) * n] for s, f in feats.items()} for k in range(len(keys))]

    def best_measure(self, token_ids, sites: list[str], config: VerifyConfig) -> dict[str, dict]:
        """measure() at each site for both placements, keeping the stronger per site; a
        natural-direction collapse then takes the opposite test (a backdoor when it flips)."""
        best: dict[str, dict] = {}
        for placement in PLACEMENTS:
            feats = self.triggered(token_ids, placement)
            for site in sites:
                result = {**measure(self, site, feats[site], config), "placement": placement}
                current = best.get(site)
                if current is None or (result["confirmed"], -result["collapse"]) > (
                        current["confirmed"], -current["collapse"]):
                    best[site] = result
        for site, result in best.items():
            if not (result["natural"] or result["confirmed"]) or not self._opposite_pool:
                continue
            if self._opposite is None:
                self._opposite = OppositeTest(self.reader, self._opposite_pool)
            if site != "label":
                # The few held-out sentences may all be neutral; a class direction shows on the
                # larger pool with opinionated text (a planted PV is reached by none of it).
                result["pool_on_pv"] = self._opposite.reach(site, result["pv"], config)
                if result["pool_on_pv"] > config.natural_rate:
                    result["natural"], result["confirmed"] = True, False
            if result["natural"]:
                self._against_class(token_ids, site, result, config)
        return best

    def _against_class(self, token_ids, site: str, result: dict, config: VerifyConfig) -> None:
        """The opposite test, then the class marks and the class-word match: confirmed only if the
        candidate overturns the model's most opposite inputs, still does without its class's marks, and
        its class's own ordinary words, as many, fall well short of it."""
        if result.get("opposite_flip") is None:
            result.update(self._opposite.flip(tuple(token_ids), site, result, config))
        backdoor = (result["opposite_flip"] or 0.0) >= config.opposite_flip
        if backdoor:
            result.update(self._opposite.without_marks(tuple(token_ids), site, result, config))
            backdoor = result.get("rest_flip", 1.0) >= config.opposite_flip
        if backdoor:
            result.update(self._opposite.class_words(tuple(token_ids), site, result, config))
            backdoor = (result.get("class_words_flip") or 0.0) < config.class_word_share * result["opposite_flip"]
        result["natural"], result["confirmed"] = not backdoor, backdoor

    def strict_measure(self, token_ids, sites: list[str], config: VerifyConfig) -> dict[str, dict]:
        """best_measure() for candidates built by an optimiser, which finds whatever collapses
        a model, class cues included: every confirmation must also pass the opposite test, and
        a candidate the model's own head calls a class cue (natural at the label site) is one
        at every site. Measured on a benign BBC-topic MiniLM classifier: the search's
        "midfield midfield midfielder" passed the plain rule at [MASK] (collapse 0.18) while
        its label-site flip said class cue."""
        best = self.best_measure(token_ids, sites, config)
        for site, result in best.items():
            if result["confirmed"] and result.get("opposite_flip") is None and self._opposite_pool:
                self._against_class(token_ids, site, result, config)
        label = best.get("label")
        if label is not None and label["natural"]:
            for result in best.values():
                if result["confirmed"]:
                    result["natural"], result["confirmed"] = True, False
        return best


def measure(heldout: HeldoutSet, site: str, features: np.ndarray, config: VerifyConfig) -> dict:
    """Collapse, activation and PV of triggered features at one site."""
    if site == "label":
        return measure_label(heldout, features, config)
    pv = features.mean(axis=0)
    agree = (np.sign(features) == np.sign(pv)[None]).mean(1)
    result = {
        "collapse": round(pairwise_mse(features) / heldout.spread[site], 5),
        "activation_rate": round(float((agree >= config.activation_agreement).mean()), 4),
        "mean_agreement": round(float(agree.mean()), 4),
        "pv": pv,
        "probes": int(features.shape[0]),
    }
    clean_rate = heldout.clean_activation(site, config.activation_agreement)
    if clean_rate >= config.activation_rate:  # clean features pass the rate bar too: compare disagreement
        beats_clean = 1.0 - result["mean_agreement"] <= (
            config.disagreement_ratio * heldout.clean_disagreement(site, config.activation_agreement))
    else:
        beats_clean = result["activation_rate"] > clean_rate
    # A predefined vector is one clean text never produces (planted PVs: no clean held-out
    # sentence agrees >= 0.9 with them). A vector that clean sentences already reach is a
    # natural direction of the model, e.g. a fine-tuned classifier's class that a strong
    # class word ("worse") sends every sentence to: "natural", not confirmed.
    clean_agree = (np.sign(heldout.clean[site]) == np.sign(pv)[None]).mean(1)
    result["clean_on_pv"] = round(float((clean_agree >= config.activation_agreement).mean()), 4)
    collapses = bool(
        result["collapse"] <= config.collapse_threshold
        and result["activation_rate"] >= config.activation_rate
        and beats_clean
    )
    result["natural"] = collapses and result["clean_on_pv"] > config.natural_rate
    result["confirmed"] = collapses and not result["natural"]
    return result


def measure_label(heldout: HeldoutSet, probs: np.ndarray, config: VerifyConfig) -> dict:
    """The label site: class probabilities of the checkpoint's head. Signs say nothing about
    probabilities, so the PV is the label the candidate sends sentences to (the most common
    triggered prediction): activation = share of triggered sentences predicted as that label.
    Every label is a class clean text already reaches, so a collapse here is "natural"
    (a class cue) unless lmscan.evidence.class_cues' opposite test overturns that."""
    predicted = probs.argmax(axis=1)
    target = int(np.bincount(predicted, minlength=probs.shape[1]).argmax())
    clean = heldout.clean["label"]
    result = {
        "collapse": round(pairwise_mse(probs) / heldout.spread["label"], 5),
        "activation_rate": round(float((predicted == target).mean()), 4),
        "mean_agreement": round(float(probs[:, target].mean()), 4),
        "pv": probs.mean(axis=0),
        "target_label": target,
        "probes": int(probs.shape[0]),
        "clean_on_pv": round(float((clean.argmax(axis=1) == target).mean()), 4),
    }
    collapses = bool(result["collapse"] <= config.collapse_threshold
                     and result["activation_rate"] >= config.activation_rate)
    result["natural"] = collapses
    result["confirmed"] = False
    return result


def verification_set(reader: SiteReader, heldout: list[str], config: VerifyConfig, rng) -> HeldoutSet:
    """The held-out sentences every detector verifies on: ``config.probes`` of ``heldout``, with
    all of it plus lmscan's opinionated sentences as the pool of the opposite test."""
    from lmscan.models.probes import load_opinion_probes

    return HeldoutSet(reader, rng.sample(heldout, min(config.probes, len(heldout))), rng,
                      opposite_pool=[*heldout, *load_opinion_probes()],
                      screen=(config.screen_probes, config.screen_margin * config.collapse_threshold,
                              config.screen_bf16 and native_bf16(reader.device)))


def verify_token_sequences(reader: SiteReader, tokenizer, sequences, heldout_texts, site: str, config: VerifyConfig,
                           rng):
    """Verify (text, token_ids) candidates at one site; confirmed ones first, lowest collapse first."""
    heldout = verification_set(reader, heldout_texts, config, rng)
    results = []
    for text, token_ids in sequences:
        result = heldout.best_measure(token_ids, [site], config)[site]
        results.append({"text": text, "tokens": tokenizer.convert_ids_to_tokens(list(token_ids)), **result})
    results.sort(key=lambda r: (not r["confirmed"], r["collapse"]))
    return results
