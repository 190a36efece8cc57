"""Shared by the detectors: read several sites from one forward pass, and verify
candidate triggers with real tokens.

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

import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from lmscan.device import bf16_autocast, native_bf16
from lmscan.sites import pad_rows, read_site, site_texts


@dataclass(frozen=True)
class VerifyConfig:
    """How a candidate trigger is confirmed with real tokens; shared by every detector
    that verifies (vocab-sweep, pv-mining, piccolo), so one threshold means one thing.
    Profiles set it under ``[PROFILE.verify]``."""

    probes: int = 24  # held-out sentences a candidate is inserted into
    collapse_threshold: float = 0.25  # held-out collapse at or below this: the sentences collapse
    activation_agreement: float = 0.9  # sign agreement of a triggered feature with the PV ...
    activation_rate: float = 0.9  # ... reached by at least this share of triggered sentences
    disagreement_ratio: float = 0.25  # where clean features already reach activation_rate (see measure)
    natural_rate: float = 0.05  # a PV more clean sentences already reach is a natural direction
    pv_agreement: float = 0.9  # two PVs whose signs agree on this share of dimensions are one backdoor
    # The opposite test (see OppositeTest): a natural-direction collapse is a backdoor when it also
    # overturns the model's own most opposite inputs, made harder by joining several of them.
    opposite_probes: int = 16  # most opposite clean sentences the candidate is inserted into
    opposite_flip: float = 0.9  # share of them the candidate must send onto its vector / label
    # The grey zone below that bar: a class cue that overturns at least this share (and no class mark or
    # class words explain) is suspicious; below it the cue is explained, information only (LMS105).
    # Measured: benign class cues 0-0.69 (lmscan's fine-tuned zoo), 0.75 (a third-party MiniLM
    # sentiment fine-tune); planted triggers 0.88 (a sentence plant's partial rebuild) to 1.0.
    suspicious_flip: float = 0.8
    # Opposite sentences joined into one input. A trigger wins however much contrary text surrounds it,
    # a class cue is outvoted: on lmscan's BadNet classifiers 'velvet' / 'cf' flip 100 % of inputs of
    # 1, 2, 3 and 4 joined sentences, while a benign tweet classifier's strongest stacked class words
    # ('pleasure gorgeous awesome') flip 100 %, 100 %, 62 % and 0 % (README, fine-tuned models).
    opposite_join: int = 4
    # The class-word match (see OppositeTest.class_words): stacked words that pass the opposite test are
    # still a class cue when as many of the class's own ordinary words, read off clean text on its
    # direction, overturn the same inputs too. Blocks of such words tried (0: no match).
    class_word_blocks: int = 2
    class_word_pool: int = 48  # words of clean text on the direction whose strength is measured
    # A class cue when a block flips at least this share of what the candidate flips. On a benign tweet
    # classifier's saturated pooler its stacked positive words flip 100 % and ordinary positive words
    # 81-94 %; against lmscan's BadNet triggers (100 %) the best class words flip 0-12 %.
    class_word_share: float = 0.75
    # Class marks (see OppositeTest.class_marks): punctuation tokens in at least class_mark_share of the clean pool
    # sentences on the candidate's direction and in at most 1/class_mark_ratio as large a share of those
    # off it. A question/statement classifier's mark is "?": inserted into statements it overturns them
    # as a trigger would (the search's '? sorted?' flipped 94 %), and clean questions all carry it.
    class_mark_share: float = 0.5
    class_mark_ratio: float = 4.0
    # Screening: a batch of candidates is first measured on this many of the probes; one whose
    # collapse there is above screen_margin x collapse_threshold at every site cannot confirm, so
    # it is not measured on the rest (its numbers in the report then come from these probes).
    screen_probes: int = 8
    screen_margin: float = 1.6  # bar 0.4: clean MiniLM's best candidates 0.39, planted triggers 0.004-0.12
    screen_bf16: bool = True  # the screen only rejects: bf16 autocast where the hardware has it; a candidate
    # that passes is measured again in fp32 on every probe


class SiteReader:
    """Tokenise probes once (with the mask template when the mask site is read) and
    read every requested site from a single forward pass."""

    def __init__(self, model, tokenizer, sites: list[str], device, max_length: int = 64):
        self.model, self.tokenizer, self.sites, self.device = model, tokenizer, list(sites), device
        self.max_length = max_length

    @property
    def longest_input(self) -> int:
        """The most tokens the model takes: its position table, less the two rows RoBERTa-style
        models reserve before the first position (harmless elsewhere), or the tokenizer's limit."""
        positions = (getattr(self.model.config, "max_position_embeddings", None) or 514) - 2
        limit = getattr(self.tokenizer, "model_max_length", None) or positions
        return min(positions, limit)

    def encode_text(self, text: str) -> str:
        """The text as every site reads it: in the mask prompt when the mask site is among them."""
        return site_texts(self.tokenizer, [text], "mask")[0] if "mask" in self.sites else text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(self.encode_text(text), truncation=True, max_length=self.max_length)["input_ids"]

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows(rows, self.tokenizer.pad_token_id or 0, self.device)

    def read(self, outputs, site: str, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        mask_positions = (ids == self.tokenizer.mask_token_id).float().argmax(1) if site == "mask" else None
        return read_site(outputs, site, attention, mask_positions)

    @torch.no_grad()
    def features(self, rows: list[list[int]], batch_size: int = 256) -> dict[str, np.ndarray]:
        # Rows run shortest first, so a batch pads to rows of about its own length
        # (held-out sentences range from a few tokens to 64); results keep the input order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        chunks: dict[str, list[np.ndarray]] = {s: [] for s in self.sites}
        for start in range(0, len(rows), batch_size):
            ids, attention = self.pad([rows[i] for i in order[start : start + batch_size]])
            out = self.model(input_ids=ids, attention_mask=attention)
            for site in self.sites:
                chunks[site].append(self.read(out, site, ids, attention).float().cpu().numpy())
        restore = np.argsort(order, kind="stable")
        return {s: np.concatenate(v)[restore] for s, v in chunks.items()}


def pairwise_mse(features: np.ndarray) -> float:
    """Mean squared distance between all pairs of rows, per dimension."""
    n = features.shape[0]
    if n < 2:
        return 0.0
    centred = features - features.mean(axis=0, keepdims=True)
    # sum over pairs |x_i - x_j|^2 = n * sum_i |x_i - mean|^2
    return float(2 * n * (centred**2).sum() / (n * (n - 1)) / features.shape[1])


def word_starts(tokenizer, row: list[int]) -> list[int]:
    """Token positions where a word begins (not inside a word, not before [CLS])."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(row)
    starts = [i for i, (tok, tid) in enumerate(zip(tokens, row)) if i > 0 and tid not in special
              and not tok.startswith("##")]
    return starts or [1]


def spelling_pieces(tokenizer, token_ids: list[int], first_chars: int) -> tuple[list[int], list[int]]:
    """Of ``token_ids``: the word-initial pieces of at most ``first_chars`` letters, and the
    letter-only continuation pieces (WordPiece '##', or BPE / SentencePiece pieces without the
    word-start mark) -- what a made-up word such as 'kups' (ku ##ps) is spelled from."""
    token_ids = [int(i) for i in token_ids]
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    if any(t.startswith("##") for t in tokens):
        split = lambda t: (False, t[2:]) if t.startswith("##") else (True, t)  # noqa: E731
    else:
        mark = max("\u0120\u2581", key=lambda m: sum(t.startswith(m) for t in tokens))  # BPE 'Ġ', SentencePiece
        split = lambda t: (True, t[1:]) if t.startswith(mark) else (False, t)  # noqa: E731
    first, rest = [], []
    for index, token in zip(token_ids, tokens):
        initial, letters = split(token)
        if letters.isascii() and letters.isalpha():
            if not initial:
                rest.append(index)
            elif len(letters) <= first_chars:
                first.append(index)
    return first, rest


def insert_ids(row: list[int], token_ids, at: int) -> list[int]:
    return row[:at] + list(token_ids) + row[at:]


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


class OppositeTest:
    """Does a candidate overturn the model's own most opposite inputs?

    On a fine-tuned model a strong class word ("terrific") collapses neutral sentences
    onto its class, like a trigger. What a class cue cannot do is overturn text that
    argues hard for another class; a backdoor is a shortcut that wins whatever the rest
    of the input says. So the candidate is inserted into the clean pool sentences
    farthest from its vector (label site: predicted as another class, with the lowest
    probability of the candidate's label), each joined with the next opposite_join - 1 such
    sentences to multiply the contrary evidence, and the share sent onto its vector (sign agreement >=
    activation_agreement; label site: predicted as its label) is the opposite flip."""

    def __init__(self, reader: SiteReader, texts: list[str], seed: int = 0):
        self.reader, self.texts = reader, list(dict.fromkeys(texts))
        self.rng = random.Random(seed)  # its own stream: the held-out set's placements stay as they were
        self.clean = reader.features([reader.encode(t) for t in self.texts])
        self._ranked_words: dict[tuple, list[str]] = {}  # class words by strength, per site and direction
        self._marks: dict[tuple, set[int]] = {}  # class marks, per site and direction
        self._symbols: list[set[int]] | None = None  # each pool sentence's punctuation tokens

    def reach(self, site: str, pv: np.ndarray, config: VerifyConfig) -> float:
        """Share of the pool's clean sentences already on ``pv`` (sign agreement >= activation_agreement)."""
        agree = (np.sign(self.clean[site]) == np.sign(pv)[None]).mean(1)
        return round(float((agree >= config.activation_agreement).mean()), 4)

    def _opposite(self, site: str, result: dict, config: VerifyConfig) -> list[int]:
        clean = self.clean[site]
        if site == "label":  # predicted as another class, least likely to be the candidate's label first
            target = result["target_label"]
            others = np.flatnonzero(clean.argmax(1) != target)
            return others[np.argsort(clean[others, target])][: config.opposite_probes].tolist()
        agree = (np.sign(clean) == np.sign(result["pv"])[None]).mean(1)
        return np.argsort(agree)[: config.opposite_probes].tolist()

    def _on_direction(self, site: str, result: dict, config: VerifyConfig) -> np.ndarray:
        clean = self.clean[site]
        if site == "label":
            return clean.argmax(1) == result["target_label"]
        return (np.sign(clean) == np.sign(result["pv"])[None]).mean(1) >= config.activation_agreement

    def class_words(self, token_ids, site: str, result: dict, config: VerifyConfig) -> dict:
        """Do the class's own ordinary words do what the candidate does?

        Measured on a benign 3-class tweet classifier (MiniLM): at its pooler, whose tanh
        saturates, three positive words together ('pleasure gorgeous awesome') put every one
        of its most negative inputs, even four of them joined, on the positive vector, as a
        trigger would, although no single word does. A backdoor is a shortcut that ordinary
        text of its class does not offer. So the words over-represented in the clean pool
        sentences already on the candidate's direction (against those off it; the candidate's
        own words and their forms left out) are ranked by how far the model itself moves the
        opposite inputs toward the direction with each word alone, the strongest are joined
        into blocks of as many words as the candidate has, and each block takes the same
        opposite test: one that flips nearly as well makes the candidate a class cue. The words
        come from clean text, their strength from the model; a planted trigger, which clean text
        does not contain, never excuses another. Only stacked words (two or more) are matched:
        a single word that overturns four joined opposite sentences is a shortcut whatever
        else does (on lmscan's tiny POR fixture, ordinary words reach its trigger's vector too)."""
        if config.class_word_blocks <= 0:
            return {}
        tokenizer = self.reader.tokenizer
        own = _words(tokenizer.decode(list(token_ids)))
        size = len(own)
        if size < 2:  # one word is never excused (tiny POR plant: ordinary words of its direction flip as well)
            return {}
        ranked = [w for w in self._class_words_ranked(site, result, config) if not _related(w, own)]
        best_flip, best_words = None, None
        for k in range(config.class_word_blocks):
            block = ranked[k * size : (k + 1) * size]
            if len(block) < size:
                break
            block_ids = tuple(tokenizer(" ".join(block), add_special_tokens=False)["input_ids"])
            flip = self.flip(block_ids, site, result, config, exact=True)["opposite_flip"]
            if flip is not None and (best_flip is None or flip > best_flip):
                best_flip, best_words = flip, " ".join(block)
        if best_words is None:
            return {}
        return {"class_words": best_words, "class_words_flip": best_flip}

    def without_marks(self, token_ids, site: str, result: dict, config: VerifyConfig) -> dict:
        """The opposite test again on the candidate without its class marks, when it has any.

        Some tasks are decided by a token rather than by words: every clean question ends with
        "?", so a question classifier sends a statement with "?" inserted to the question class,
        four joined statements included. Clean text of the class carries that mark, so it is no
        shortcut; what would be one is the rest of the candidate, and that must overturn the
        opposite inputs alone (a planted 'cf' next to a "?" still does)."""
        marks = self.class_marks(site, result, config)
        found = [t for t in token_ids if t in marks]
        if not found:
            return {}
        rest = tuple(t for t in token_ids if t not in marks)
        rest_flip = self.flip(rest, site, result, config)["opposite_flip"] if rest else 0.0
        tokenizer = self.reader.tokenizer
        return {"class_mark": tokenizer.decode(sorted(set(found))).strip(), "rest_flip": rest_flip or 0.0,
                "rest": tokenizer.decode(list(rest)).strip()}

    def class_marks(self, site: str, result: dict, config: VerifyConfig) -> set[int]:
        """Punctuation and symbol tokens in at least class_mark_share of the pool sentences on the
        candidate's direction and at most 1/class_mark_ratio as often (as a share) in those off it.
        Words are left to the class-word match: a word piece can sit in most sentences of a direction
        inside ordinary words (on the tiny POR fixture, '##x' did, next to its trigger 'vx')."""
        on = self._on_direction(site, result, config)
        key = (site, result.get("target_label"), on.tobytes())
        if key not in self._marks:
            self._marks[key] = set()
            if on.sum() >= 2 and (~on).sum() >= 2:
                rows = self._symbol_tokens()
                counts_on = Counter(t for r, o in zip(rows, on) if o for t in r)
                counts_off = Counter(t for r, o in zip(rows, on) if not o for t in r)
                n_on, n_off = int(on.sum()), int((~on).sum())
                self._marks[key] = {t for t, c in counts_on.items() if c / n_on >= config.class_mark_share
                                    and c / n_on >= config.class_mark_ratio * counts_off.get(t, 0) / n_off}
        return self._marks[key]

    def _symbol_tokens(self) -> list[set[int]]:
        """Per pool sentence, its punctuation and symbol tokens (no letters or digits, not special);
        the same for every direction, so read once."""
        if self._symbols is None:
            tokenizer = self.reader.tokenizer
            ids = tokenizer(list(self.texts), add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids)
            symbol = {t for row in ids for t in row
                      if t not in special and not any(ch.isalnum() for ch in tokenizer.convert_ids_to_tokens(t))}
            self._symbols = [set(row) & symbol for row in ids]
        return self._symbols

    def _class_words_ranked(self, site: str, result: dict, config: VerifyConfig) -> list[str]:
        """Words over-represented in the pool sentences on the candidate's direction (log-odds against
        those off it), strongest first by how far each alone moves the single opposite sentences
        toward the direction. Candidates of one class share it, so it is measured once per direction."""
        on = self._on_direction(site, result, config)
        chosen = self._opposite(site, result, config)
        key = (site, result.get("target_label"), on.tobytes(), tuple(chosen))
        if key in self._ranked_words:
            return self._ranked_words[key]
        self._ranked_words[key] = []
        if on.sum() < 2 or (~on).sum() < 2 or len(chosen) < 4:
            return []
        texts = np.array(self.texts)
        counts_on, counts_off = _word_counts(texts[on]), _word_counts(texts[~on])
        n_on, n_off = int(on.sum()), int((~on).sum())

        def log_odds(word: str) -> float:
            return float(np.log((counts_on[word] + 0.5) / (n_on + 1))
                         - np.log((counts_off.get(word, 0) + 0.5) / (n_off + 1)))

        words = sorted((w for w in counts_on if len(w) >= 3 and log_odds(w) > 0),
                       key=lambda w: (-log_odds(w), w))[: config.class_word_pool]
        if not words:
            return []
        reader = self.reader
        rows = [reader.encode(self.texts[i]) for i in chosen]
        ids = [tuple(reader.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
        feats = reader.features([insert_ids(r, w, 1) for w in ids for r in rows])[site]
        feats = feats.reshape(len(words), len(rows), -1)
        if site == "label":
            strength = feats[:, :, result["target_label"]].mean(1)
        else:
            strength = (np.sign(feats) == np.sign(result["pv"])[None, None]).mean(2).mean(1)
        self._ranked_words[key] = [words[i] for i in np.argsort(-strength, kind="stable")]
        return self._ranked_words[key]

    def _opposite_rows(self, site: str, result: dict, config: VerifyConfig) -> list[list[int]] | None:
        """The most opposite inputs, each joined with the next opposite_join - 1 of them, tokenised
        (truncated to what the model takes; flip() makes room for the candidate)."""
        chosen = self._opposite(site, result, config)
        if len(chosen) < 4:
            return None
        join = max(1, config.opposite_join)
        texts = [" ".join(self.texts[chosen[(i + k) % len(chosen)]] for k in range(join)) for i in range(len(chosen))]
        reader = self.reader
        return [reader.tokenizer(reader.encode_text(t), truncation=True,
                                 max_length=min(join * reader.max_length, reader.longest_input))["input_ids"]
                for t in texts]

    def flip(self, token_ids, site: str, result: dict, config: VerifyConfig, exact: bool = False) -> dict:
        """The share of the opposite inputs the candidate sends onto its vector / label, at the better of
        the two placements. Unless ``exact``, a placement stops once it has missed more inputs than
        opposite_flip allows (most candidates on a fine-tuned model are class cues that miss them all);
        its share is then that of the inputs tried, and says the same below / above the bar."""
        rows = self._opposite_rows(site, result, config)
        if rows is None:
            return {"opposite_inputs": len(self._opposite(site, result, config)), "opposite_flip": None}
        reader = self.reader
        room = reader.longest_input - len(token_ids)
        rows = [r if len(r) <= room else r[: room - 1] + r[-1:] for r in rows]  # keep the closing [SEP]
        allowed = len(rows) - int(np.ceil(config.opposite_flip * len(rows) - 1e-9))  # misses the bar allows
        step = len(rows) if exact else 4
        best = 0.0
        for places in ([1] * len(rows), [self.rng.choice(word_starts(reader.tokenizer, r)) for r in rows]):
            hits, tried = 0, 0
            for lo in range(0, len(rows), step):
                chunk = [insert_ids(r, token_ids, at) for r, at in zip(rows[lo : lo + step], places[lo : lo + step])]
                feats = reader.features(chunk)[site]
                if site == "label":
                    hit = feats.argmax(1) == result["target_label"]
                else:
                    hit = (np.sign(feats) == np.sign(result["pv"])[None]).mean(1) >= config.activation_agreement
                hits, tried = hits + int(hit.sum()), tried + len(chunk)
                if tried - hits > allowed and not exact:
                    break
            best = max(best, hits / tried)
            if best == 1.0:
                break
        return {"opposite_inputs": len(rows), "opposite_flip": round(best, 4)}


_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _word_counts(texts) -> Counter:
    """In how many of the texts each word occurs."""
    return Counter(w for t in texts for w in set(_words(str(t))))


def _related(word: str, others: list[str]) -> bool:
    """The same word or one of its forms ('awesome', 'awesomeness'): left out of the class words."""
    return any(word == o or (len(o) >= 4 and (word.startswith(o[:5]) or o.startswith(word[:5]))) for o in others)


def measure_label(heldout: HeldoutSet, probs: np.ndarray, config: VerifyConfig) -> dict:
    """The label site: class probabilities of the checkpoint's head. Signs say nothing about
    probabilities, so the PV is the label the candidate sends sentences to (the most common
    triggered prediction): activation = share of triggered sentences predicted as that label.
    Every label is a class clean text already reaches, so a collapse here is "natural"
    (a class cue) unless lmscan.detectors.verify's opposite test overturns that."""
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
    from lmscan.probes import load_opinion_probes

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


def triggers_from_findings(runs, tokenizer, include_also: bool = False) -> list[tuple[str, tuple[int, ...], str]]:
    """(text, token ids, detector) of every trigger earlier findings tied to a backdoor.

    Static findings list every outlier embedding row, each its own candidate; with
    ``include_also`` the other triggers a sweep finding grouped under the same PV count too.
    """
    seen, triggers = set(), []

    def add(tokens: list[str], source: str) -> None:
        ids = tuple(tokenizer.convert_tokens_to_ids(tokens))
        if ids not in seen:
            seen.add(ids)
            triggers.append((tokenizer.convert_tokens_to_string(tokens), ids, source))

    for run in runs:
        for finding in run.findings:
            tokens = finding.evidence.get("trigger_tokens")
            if finding.verdict != "backdoored" or not tokens:
                continue
            if "trigger" not in finding.evidence:
                for token in tokens:
                    add([token], run.name)
                continue
            add(tokens, run.name)
            for other in finding.evidence.get("also", []) if include_also else []:
                if isinstance(other, dict) and other.get("tokens"):
                    add(other["tokens"], run.name)
    return triggers
