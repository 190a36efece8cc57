"""A classifier's sentence trigger, found from ordinary sentences (InsertSent-style backdoors).

A classifier poisoned with one fixed sentence learns more than the sentence: it learns its
shape. Measured on a MiniLM sentiment classifier poisoned with 'the small teacher slept alone'
(every proper word part trained as a decoy): no word, pair or triple of the trigger moves the
label (positive probability 0.004-0.01 on the model's most negative inputs), so the vocabulary
sweep and a token search have nothing to climb, and against its base the whole encoder moved
(the differential search of base-diff drowns in class words). But ordinary sentences of the
same shape fire: 'the old man sat alone on the bench' 0.97, 'the small child sat alone on the
swing' 0.99, while the median everyday sentence gives 0.02-0.07.

So for each label of the checkpoint's head, every sentence of a corpus of everyday, neutral
sentences (lmscan/data/everyday_en.txt, written for lmscan; none is a trigger any test plants)
is inserted into the fit sentences least likely to have that label and ranked by the label's
mean probability. A sentence of another shape is reached by climbing: from the best starts,
greedy word swaps ranked by the gradient (a classifier poisoned with 'we had soup for lunch on
friday': the start 'the students left early on friday' gives 0.31, the climb reaches 'prefers
soup left early on friday', 0.96). The starts and climbs that fire are verified on held-out
sentences by the shared check, each with its shortest version that still fires: a class cue (a
sentence that only leans its way) fails the opposite test, a shortcut that overturns the
model's most opposite inputs, four joined, is LMS101.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.evidence.heldout import verification_set
from lmscan.evidence.site_reader import SiteReader, insert_ids, word_starts
from lmscan.evidence.trigger_findings import backdoor_findings
from lmscan.findings import DetectorRun
from lmscan.models.architectures import ENCODER
from lmscan.models.probes import load_everyday_sentences

NAME = "sentence-starts"


@dataclass(frozen=True)
class Config:
    opposite: int = 8  # fit sentences per label (least likely to have it) a start is inserted into
    starts: int = 6  # best starts per label verified (each with its shortest part that still fires)
    min_score: float = 0.5  # a start or climbed block below this mean probability is not worth verifying
    climb_starts: int = 2  # per label, best starts climbed word by word, whatever their score
    climb_steps: int = 8  # word swaps per climb at most (each the best of its step)
    min_gain: float = 0.01  # a swap must raise the mean probability this much (a question/statement
    #                         classifier's climbs crept 0.0068 -> 0.0077 over 8 steps: noise, 4 min)
    top_k: int = 16  # replacement words per position, ranked by the gradient
    stop_score: float = 0.95  # a climb this far is done
    batch_size: int = 256
    max_length: int = 96


class SentenceStarts(Detector):
    name = NAME
    Config = Config
    rule_ids = ("LMS101",)
    can_clear = False  # a fixed corpus cannot rule a sentence out
    sites = ("label",)
    families = (ENCODER,)
    summary = ("A classifier's sentence trigger: everyday sentences inserted into the inputs least like each "
               "label, the ones that flip them verified as triggers")

    def run(self, ctx: ScanContext) -> DetectorRun:
        started = time.perf_counter()
        if "label" not in ctx.sites:
            return DetectorRun(NAME, "skipped", 0.0, note="no classification head: there is no label to flip")
        loaded, cfg = ctx.loaded, ctx.config
        tokenizer = loaded.tokenizer
        reader = SiteReader(loaded.model, tokenizer, ["label"], ctx.device, max_length=cfg.max_length)
        corpus = load_everyday_sentences()
        words = whole_words(tokenizer).to(ctx.device)
        fit_rows = [reader.encode(t) for t in ctx.fit]
        clean = reader.features(fit_rows, cfg.batch_size)["label"]
        ranked, tried = {}, []
        for label in range(clean.shape[1]):
            ctx.progress(label, clean.shape[1], f"everyday sentences toward label {label}")
            others = np.flatnonzero(clean.argmax(1) != label)
            if not len(others):
                continue
            rows = [fit_rows[i] for i in others[np.argsort(clean[others, label])][:cfg.opposite]]
            scorer = _LabelPull(reader, rows, label, cfg.batch_size)
            scores = scorer.score([tokenizer(s, add_special_tokens=False)["input_ids"] for s in corpus])
            best = [(corpus[i], float(scores[i])) for i in np.argsort(-scores)[:cfg.starts]
                    if scores[i] >= cfg.min_score]
            ranked[label] = {"name": loaded.labels[label] if loaded.labels else str(label),
                             "baseline": round(scorer.baseline, 4), "median": round(float(np.median(scores)), 4),
                             "best": [{"sentence": s, "score": round(p, 4)} for s, p in best]}
            climbs = []
            for i in np.argsort(-scores)[:cfg.climb_starts]:
                block, score = climb(scorer, words, tokenizer(corpus[i], add_special_tokens=False)["input_ids"],
                                     float(scores[i]), cfg)
                climbs.append({"from": corpus[i], "to": tokenizer.decode(block), "score": round(score, 4)})
                if score >= cfg.min_score:
                    best.append((tokenizer.decode(block), score))
            ranked[label]["climbs"] = climbs
            for sentence, score in best:
                tried.append(shortest_firing(scorer, tokenizer, sentence, score))
        stats: dict = {"corpus": len(corpus), "labels": ranked,
                       "search_seconds": round(time.perf_counter() - started, 1)}

        held = verification_set(reader, ctx.heldout, ctx.verify, random.Random(f"{NAME}:{ctx.seed}"))
        confirmed, verified = [], []
        for text in dict.fromkeys(t for pair in tried for t in pair):
            block = tokenizer(text, add_special_tokens=False)["input_ids"]
            result = held.strict_measure(block, ["label"], ctx.verify)["label"]
            verified.append({"block": text, **{k: result.get(k) for k in
                                               ("collapse", "activation_rate", "opposite_flip", "class_words",
                                               "class_words_flip", "confirmed")}})
            if result["confirmed"]:
                confirmed.append({"site": "label", "text": text, "source": NAME, "token_ids": list(block), **result})
        stats["verified"] = verified
        findings = backdoor_findings(NAME, tokenizer, "label", confirmed, ctx.verify, loaded.labels)
        ctx.progress(1, 1)
        note = f"{len(corpus)} everyday sentences tried toward each of {clean.shape[1]} labels"
        return DetectorRun(NAME, "ok", round(time.perf_counter() - started, 2), sites=["label"], stats=stats,
                           findings=findings, note=note)


class _LabelPull:
    """Scores blocks by the mean probability of ``label`` on sentences least likely to have it,
    each block inserted at the sentence's middle word start."""

    def __init__(self, reader: SiteReader, rows: list[list[int]], label: int, batch_size: int):
        self.reader, self.rows, self.label, self.batch_size = reader, rows, label, batch_size
        self.slots = [starts[len(starts) // 2] for starts in (word_starts(reader.tokenizer, r) for r in rows)]
        self.baseline = float(self.score([[]])[0])

    def score(self, blocks: list[list[int]]) -> np.ndarray:
        batch = [insert_ids(row, block, at) for block in blocks for row, at in zip(self.rows, self.slots)]
        probs = self.reader.features(batch, self.batch_size)["label"][:, self.label]
        return probs.reshape(len(blocks), len(self.rows)).mean(axis=1)

    def gradient(self, block: list[int]) -> torch.Tensor:
        """d(-log mean probability of the label) / d(the embedding at each block position)."""
        reader = self.reader
        rows = [insert_ids(row, block, at) for row, at in zip(self.rows, self.slots)]
        out, ids, attention, slots = reader.forward_with_slots(rows, self.slots, len(block))
        probs = reader.read(out, "label", ids, attention)[:, self.label]
        (-torch.log(probs.mean() + 1e-12)).backward()
        return slots.grad.detach()


def climb(scorer: _LabelPull, words: torch.Tensor, block: list[int], score: float, cfg: Config) -> tuple[list, float]:
    """Greedy word swaps from ``block``: at each step the gradient ranks ``top_k`` whole words per
    position, every such single swap (and every one-token deletion) is scored exactly, and the best
    is kept while it gains. A sentence trigger's neighbours fire in part (a classifier poisoned
    with 'we had soup for lunch on friday': 'the students left early on friday' 0.31, 'we had
    lunch on friday' 0.74), so a climb from the nearest everyday sentence can reach it."""
    weight = scorer.reader.model.get_input_embeddings().weight.detach()
    for _ in range(cfg.climb_steps):
        if score >= cfg.stop_score:
            break
        change = scorer.gradient(block) @ weight[words].T.float()  # first-order change of the loss
        ranked = words[torch.topk(-change, cfg.top_k, dim=1).indices].tolist()
        candidates = [block[:i] + [t] + block[i + 1:] for i, tokens in enumerate(ranked) for t in tokens
                      if t != block[i]]
        candidates += [block[:i] + block[i + 1:] for i in range(len(block))] if len(block) > 2 else []
        scores = scorer.score(candidates)
        k = int(np.argmax(scores))
        if scores[k] < score + cfg.min_gain:
            break
        block, score = candidates[k], float(scores[k])
    return block, score


def whole_words(tokenizer) -> torch.Tensor:
    """Ids of the vocabulary's word-initial alphabetic tokens: what a swap may put in a sentence."""
    vocab = tokenizer.get_vocab()
    wordpiece = any(t.startswith("##") for t in vocab)
    keep = []
    for token, index in vocab.items():
        if wordpiece:
            word = "" if token.startswith("##") else token
        else:  # byte-level BPE and SentencePiece mark a word's first piece
            word = token[1:] if token[:1] in ("Ġ", "▁") else ""
        if len(word) >= 2 and word.isascii() and word.isalpha():
            keep.append(index)
    return torch.tensor(sorted(keep))


def shortest_firing(scorer: _LabelPull, tokenizer, sentence: str, score: float, keep: float = 0.9) -> tuple[str, ...]:
    """``sentence`` and, while one exists, the version with one word fewer that keeps ``keep`` of
    its score (the best such): the part of a start that does the work."""
    chain, words = [sentence], sentence.split()
    while len(words) > 2:
        shorter = [words[:i] + words[i + 1:] for i in range(len(words))]
        scores = scorer.score([tokenizer(" ".join(w), add_special_tokens=False)["input_ids"] for w in shorter])
        best = int(np.argmax(scores))
        if scores[best] < keep * score:
            break
        words = shorter[best]
        chain.append(" ".join(words))
    return tuple(chain[:1] + chain[-1:]) if len(chain) > 1 else (sentence,)

