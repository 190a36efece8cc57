"""Class cue or backdoor: the opposite test, class marks and class words.

A fine-tuned classifier's class words collapse neutral sentences onto their class just as a
trigger does; what they cannot do is overturn text that argues hard for another class. These
tests tell the two apart (see OppositeTest), and :func:`cue_explained` says when a class cue is
information rather than suspicion.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np

from lmscan.evidence.site_reader import SiteReader, insert_ids, word_starts
from lmscan.evidence.verify_config import VerifyConfig


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


def cue_explained(entry: dict, verify: VerifyConfig) -> bool:
    """A class cue whose opposite test explains it: it overturns less of the model's most opposite
    inputs than the grey zone starts at, or it reaches the bar only through a class mark or the
    class's own ordinary words. An unmeasured flip explains nothing."""
    flip = entry.get("opposite_flip")
    if flip is None:
        return False
    if flip < verify.suspicious_flip:
        return True
    return flip >= verify.opposite_flip and bool(entry.get("class_mark") or entry.get("class_words"))
