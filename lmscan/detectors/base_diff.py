"""A fine-tune against its declared base (``lmscan check MODEL --base BASE``): rebuild a trigger
from what the fine-tune changed.

A trigger trained as a unit (a sentence whose words and parts do nothing alone, a word of
several pieces) leaves no single token that moves the model's output, so the vocabulary
sweep has nothing to rank and a search from random blocks has no partial signal to climb.
Against the base the fine-tune started from, it does leave both:

1. Token drift. Every sweepable token is read in one neutral sentence by both models; at the
   early ``layers`` its hidden state moves by a relative distance, turned into a robust z-score
   per layer (median and MAD over the vocabulary); a token's drift is its largest z. The
   ``candidates`` most drifted tokens are the building blocks. (MiniLM, a 5-word sentence
   trained as a unit: its four content words are the top four of 22 500 tokens at layer 1.)
2. Differential beam search. A block of candidates is inserted mid-sentence into ``probes``
   fit sentences; its score is how far the suspect's site feature lies from the base's on the
   same text (relative distance, mean over sentences). Parts of a unit-trained trigger move it
   even where they leave the suspect's output unremarkable (same plant: 'warm again' 2.7x the
   clean baseline, 'the warm again' 12x), so blocks grow: from the best ordered pairs, a
   candidate is inserted at every position, keeping the ``beam`` best, up to ``max_block``.
3. Verification with real tokens on held-out sentences, on the suspect alone (the shared
   check every detector uses): a block that collapses them is LMS101.

The base is ``--base`` or, for a full encoder checkpoint, inferred (its model card's
``base_model``, or a model readable here whose input embeddings it kept:
lmscan.models.base_inference). An inferred base is a last resort: compared only when the
detectors before found no backdoor. Without a base the detector is skipped; it clears nothing.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.evidence.heldout import verification_set
from lmscan.evidence.site_reader import SiteReader, insert_ids, sweep_vocabulary, word_starts
from lmscan.evidence.trigger_findings import backdoor_findings
from lmscan.findings import DetectorRun
from lmscan.models.architectures import ENCODER
from lmscan.models.scan_model import transformer_of

NAME = "base-diff"
# The one neutral sentence every token is read in (its position is the slot).
DRIFT_CONTEXT = ("i think that", "is what we saw.")


@dataclass(frozen=True)
class Config:
    layers: tuple = (1, 2)  # hidden layers whose drift ranks the tokens
    candidates: int = 24  # most drifted tokens the search builds blocks from
    common_words: int = 12  # plus the fit sentences' most frequent words: a sentence trigger's "the", "a"
    #                         drift little (a fine-tune sees them everywhere) but carry its order
    probes: int = 4  # fit sentences a block is scored on
    beam: int = 6  # blocks kept per length
    max_block: int = 8  # longest block built (tokens)
    min_gain: float = 0.05  # stop growing when a length adds less than this share to the best score
    verify_top: int = 4  # best blocks per length sent to verification (plus each length's best)
    batch_size: int = 256
    max_length: int = 64


class BaseDiff(Detector):
    name = NAME
    Config = Config
    rule_ids = ("LMS101",)
    can_clear = False  # it searches only what the fine-tune changed most
    sites = ("cls", "pooler", "tokens", "mask")
    families = (ENCODER,)
    summary = ("A fine-tune against its declared base (--base): ranks the tokens whose reading changed most, "
               "builds blocks of them that move the output away from the base's, and verifies them")

    def run(self, ctx: ScanContext) -> DetectorRun:
        started = time.perf_counter()
        if ctx.reference is None:
            return DetectorRun(NAME, "skipped", 0.0, note="no base named or inferred: nothing to compare the model with")
        if ctx.reference.chosen_by != "--base" and any(f.verdict == "backdoored" for r in ctx.earlier
                                                          for f in r.findings):
            # An inferred base is a last resort: the verdict is decided, the comparison would only add cost.
            return DetectorRun(NAME, "skipped", 0.0, note=f"already found backdoored; the inferred base "
                                                          f"{ctx.reference.ref} was not compared")
        from lmscan.models import load_model  # noqa: PLC0415

        loaded, cfg = ctx.loaded, ctx.config
        reference = load_model(ctx.reference, device=str(ctx.device))
        mismatch = _mismatch(loaded, reference)
        if mismatch:
            return DetectorRun(NAME, "skipped", round(time.perf_counter() - started, 2),
                               note=f"the base {ctx.reference.ref} cannot be compared: {mismatch}")
        tokenizer = loaded.tokenizer
        ctx.progress(0, 3, "token drift against the base")
        drift = token_drift(loaded.model, reference.model, tokenizer, cfg, ctx.device)
        order = np.argsort(-drift["z"])[:cfg.candidates]
        candidates = [int(drift["ids"][i]) for i in order]
        candidates += [t for t in common_tokens(tokenizer, ctx.fit, cfg.common_words) if t not in candidates]
        stats: dict = {"reference": ctx.reference.ref,
                       "drifted": [{"token": tokenizer.convert_ids_to_tokens(int(drift["ids"][i])),
                                    "z": round(float(drift["z"][i]), 1)} for i in order],
                       "drift_seconds": round(time.perf_counter() - started, 1)}

        rng = random.Random(f"{NAME}:{ctx.seed}")
        short = [t for t in ctx.fit if 4 <= len(t.split()) <= 16] or ctx.fit
        fit = rng.sample(short, min(cfg.probes, len(short)))
        scorer = _Differential(loaded.model, reference.model, tokenizer, list(ctx.sites), fit, cfg, ctx.device)
        ctx.progress(1, 3, "differential beam search")
        t0 = time.perf_counter()
        lengths = beam_search(scorer, candidates, cfg)
        stats["beam"] = [{"length": n, "best": tokenizer.decode(list(blocks[0][0])), "score": round(blocks[0][1], 3)}
                         for n, blocks in lengths.items()]
        stats["clean_block_score"] = round(scorer.baseline, 3)
        stats["beam_seconds"] = round(time.perf_counter() - t0, 1)

        ctx.progress(2, 3, "verifying the best blocks")
        del reference
        reader = SiteReader(loaded.model, tokenizer, ctx.sites, ctx.device, max_length=cfg.max_length)
        tried, seen = [], set()
        for blocks in lengths.values():
            for block, _ in blocks[:cfg.verify_top]:
                if block not in seen:
                    seen.add(block)
                    tried.append((tokenizer.decode(list(block)), block))
        held = verification_set(reader, ctx.heldout, ctx.verify, random.Random(ctx.seed))
        confirmed: dict[str, list[dict]] = {site: [] for site in ctx.sites}
        verified = []
        for text, block in tried:
            measured = held.strict_measure(block, ctx.sites, ctx.verify)
            verified.append({"block": text, "sites": {s: {k: r[k] for k in ("collapse", "activation_rate", "confirmed")}
                                                      for s, r in measured.items()}})
            for site, result in measured.items():
                if result["confirmed"]:
                    confirmed[site].append({"site": site, "text": text, "source": NAME, "token_ids": list(block),
                                            **result})
        findings = [f for site in ctx.sites
                    for f in backdoor_findings(NAME, tokenizer, site, confirmed[site], ctx.verify, loaded.labels)]
        stats["verified"] = verified
        ctx.progress(3, 3)
        note = (f"compared with {ctx.reference.ref}: blocks of its {cfg.candidates} most drifted tokens, "
                f"up to {cfg.max_block} tokens")
        return DetectorRun(NAME, "ok", round(time.perf_counter() - started, 2), sites=list(ctx.sites), stats=stats,
                           findings=findings, note=note)


def common_tokens(tokenizer, texts: list[str], k: int) -> list[int]:
    """The ``k`` most frequent words of ``texts`` that are one token each."""
    counts: dict[str, int] = {}
    for text in texts:
        for word in text.lower().split():
            word = word.strip(".,;:!?\"'()")
            if word:
                counts[word] = counts.get(word, 0) + 1
    found = []
    for word in sorted(counts, key=lambda w: -counts[w]):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in found:
            found.append(ids[0])
        if len(found) >= k:
            break
    return found


def _mismatch(loaded, reference) -> str | None:
    """Why two models cannot be compared token by token, or None."""
    if reference.arch.model_type != loaded.arch.model_type or reference.arch.hidden_size != loaded.arch.hidden_size:
        return (f"it is a {reference.arch.model_type} of width {reference.arch.hidden_size}, the model a "
                f"{loaded.arch.model_type} of width {loaded.arch.hidden_size}")
    if reference.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        return "its tokenizer's vocabulary differs"
    return None


@torch.no_grad()
def token_drift(model, reference, tokenizer, cfg: Config, device) -> dict:
    """Per sweepable token: its largest robust z-score of hidden-state drift over ``cfg.layers``."""
    ids = sweep_vocabulary(tokenizer)
    left, right = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in DRIFT_CONTEXT)
    head = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    tail = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    slot = len(head) + len(left)
    layers = [n for n in cfg.layers if n <= model.config.num_hidden_layers]
    drift = np.zeros((len(layers), len(ids)), dtype=np.float32)
    for start in range(0, len(ids), cfg.batch_size):
        chunk = ids[start:start + cfg.batch_size]
        batch = torch.tensor([head + left + [int(t)] + right + tail for t in chunk], device=device)
        mine = _early_states(transformer_of(model), batch, max(layers))
        theirs = _early_states(transformer_of(reference), batch, max(layers))
        for row, layer in enumerate(layers):
            a, b = mine[layer][:, slot].float(), theirs[layer][:, slot].float()
            drift[row, start:start + len(chunk)] = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).cpu().numpy()
    median = np.median(drift, axis=1, keepdims=True)
    mad = np.median(np.abs(drift - median), axis=1, keepdims=True)
    return {"ids": ids, "z": ((drift - median) / np.maximum(mad, 1e-9)).max(axis=0)}


class _Enough(Exception):
    """Raised from a forward hook once the last layer a caller needs has run."""


def _early_states(transformer, ids: torch.Tensor, last: int) -> list:
    """Hidden states indexed by layer (1..``last``; index 0 unused), without running the layers
    above ``last``: the drift reads only early layers, so the rest would be wasted."""
    blocks = _layer_list(transformer)
    if blocks is None or last >= len(blocks):
        return list(transformer(input_ids=ids, output_hidden_states=True).hidden_states)
    states: list = [None]

    def keep(_module, _inputs, output):
        states.append(output[0] if isinstance(output, tuple) else output)
        if len(states) > last:
            raise _Enough

    handles = [block.register_forward_hook(keep) for block in blocks[:last]]
    try:
        transformer(input_ids=ids)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return states


def _layer_list(transformer) -> torch.nn.ModuleList | None:
    """The model's stack of transformer layers: the module list as long as its layer count."""
    count = getattr(transformer.config, "num_hidden_layers", None)
    for module in transformer.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    return None


class _Differential:
    """Scores blocks: mean relative distance between the suspect's and the base's site features
    on fit sentences carrying the block at their middle word start (largest over the sites)."""

    def __init__(self, model, reference, tokenizer, sites, fit, cfg: Config, device):
        self.mine = SiteReader(model, tokenizer, sites, device, max_length=cfg.max_length)
        self.theirs = SiteReader(reference, tokenizer, sites, device, max_length=cfg.max_length)
        self.rows = [self.mine.encode(text) for text in fit]
        self.slots = [starts[len(starts) // 2] for starts in (word_starts(tokenizer, r) for r in self.rows)]
        self.batch_size = cfg.batch_size
        self.baseline = float(np.median(self.score([()])))  # the sentences as they are

    def score(self, blocks: list[tuple[int, ...]]) -> np.ndarray:
        rows = [insert_ids(row, block, at) for block in blocks for row, at in zip(self.rows, self.slots)]
        mine = self.mine.features(rows, self.batch_size)
        theirs = self.theirs.features(rows, self.batch_size)
        per_site = [np.linalg.norm(mine[s] - theirs[s], axis=-1) / np.maximum(np.linalg.norm(theirs[s], axis=-1), 1e-6)
                    for s in mine]
        distance = np.max(per_site, axis=0).reshape(len(blocks), len(self.rows))
        return distance.mean(axis=1)


def beam_search(scorer: _Differential, candidates: list[int], cfg: Config) -> dict[int, list[tuple[tuple, float]]]:
    """Per block length, the best blocks and their scores, best first: ordered pairs of distinct
    candidates, then insertion of any candidate not yet in a block at any position, while it gains
    (a repeated word only stacks the drift it already has)."""
    def best(blocks: list[tuple[int, ...]]) -> list[tuple[tuple, float]]:
        scores = scorer.score(blocks)
        ranked = sorted(zip(blocks, scores.tolist()), key=lambda bs: -bs[1])
        return ranked[:max(cfg.beam, cfg.verify_top)]

    lengths = {1: best([(c,) for c in candidates]),
               2: best([(a, b) for a in candidates for b in candidates if a != b])}
    for length in range(3, cfg.max_block + 1):
        beam = [block for block, _ in lengths[length - 1][:cfg.beam]]
        grown = sorted({block[:i] + (c,) + block[i:] for block in beam for c in candidates if c not in block
                        for i in range(len(block) + 1)})
        lengths[length] = best(grown)
        if lengths[length][0][1] < (1 + cfg.min_gain) * lengths[length - 1][0][1]:
            break
    return lengths
