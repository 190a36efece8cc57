"""Detector `piccolo`: PICCOLO-style word-level trigger inversion, as a baseline.

PICCOLO (Liu et al., S&P 2022) inverts a trigger word with a differentiable weight
vector over candidate words, each word a fixed token sequence, and optimises the
weighted word embedding inserted into clean inputs. The original objective flips a
classifier's label; a bare pretrained checkpoint has no task head, so this baseline
uses the same feature-space objective as PV mining (pv_mining.py) to keep the
comparison like for like:
  L = - sum_sites [ MSE(F_triggered, F_clean) / clean spread ]  - lambda_div * batch entropy
i.e. the inserted word should move the feature at each site far (relative to the
model's own clean pairwise spread) onto an input-independent vector.

What is implemented, and what is simplified:
  - Candidate words are whole-word vocabulary tokens (alphabetic, not special, not
    "##" pieces); two-piece words made of a short word start (at most
    ``pair_start_chars`` letters) and one alphabetic continuation piece, capped at
    ``max_pair_words``; and, with ``dictionary``, the English words (lmscan.models.probes'
    word list, as PICCOLO uses a dictionary) the tokenizer spells in exactly that
    many pieces — the only source of 3+-piece candidates. Each length is optimised
    in a separate run (a relaxed slot has one fixed length).
  - For K trigger slots (``slots``, e.g. [1, 2]) each slot holds softmax(logits / T)
    over the candidates. PICCOLO's tanh weights with periodic renormalisation are
    approximated by a softmax whose temperature T is annealed geometrically from
    ``temperature_start`` to ``temperature_end``, which sharpens the distribution
    towards one word as the optimisation goes on.
  - The weighted embedding is inserted right after [CLS] or at a random word start
    (per sentence, half and half) through ``inputs_embeds``.
  - Discretisation: the ``top_k`` words of each slot (their product for K > 1, at
    most ``max_candidates``) are inserted as real tokens into held-out sentences and
    measured with verify.HeldoutSet.best_measure. Only a confirmed candidate becomes
    a ``backdoored`` finding (LMS401); a distribution that concentrated on words that
    do not verify is reported as info (LMS402). Finding nothing is a valid result.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.evidence.heldout import verification_set
from lmscan.evidence.site_reader import SiteReader, pairwise_mse, spelling_pieces, word_starts
from lmscan.evidence.soft_prompt import batch_entropy, prompted_embeds
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.findings import DetectorRun, Finding
from lmscan.models.architectures import ENCODER
from lmscan.models.sites import SITES

NAME = "piccolo"


@dataclass(frozen=True)
class PiccoloConfig:
    slots: list[int] = field(default_factory=lambda: [1])  # trigger lengths in words, one run each
    word_lengths: list[int] = field(default_factory=lambda: [1, 2, 3])  # pieces per candidate word
    dictionary: bool = True  # add English words spelled in exactly that many pieces (lengths >= 2)
    pair_start_chars: int = 1  # two-piece words: starts of at most this many letters ...
    max_pair_words: int = 200000  # ... and at most this many such words
    steps: int = 60
    batch_size: int = 32
    max_length: int = 48
    max_insert_position: int = 32
    learning_rate: float = 0.1  # Adam on the slot logits
    temperature_start: float = 1.0
    temperature_end: float = 0.05
    lambda_diversity: float = 1.0
    concentration: float = 0.5  # a slot "concentrated" when its top word holds this much weight
    top_k: int = 5  # words per slot verified with real tokens
    max_candidates: int = 25


def dictionary_spellings(tokenizer) -> list[tuple[int, ...]]:
    """Token sequences of the English word list's words (those without an unknown piece).
    Tokenising 234k words takes seconds: kept per vocabulary for the process."""
    key = (tokenizer.name_or_path, len(tokenizer), type(tokenizer).__name__)
    if key not in _SPELLINGS:
        from lmscan.models.probes import word_list

        unknown = tokenizer.unk_token_id
        _SPELLINGS[key] = [tuple(ids) for ids in tokenizer(word_list(), add_special_tokens=False)["input_ids"]
                           if unknown not in ids]
    return _SPELLINGS[key]


_SPELLINGS: dict[tuple, list[tuple[int, ...]]] = {}


def candidate_words(tokenizer, length: int, config: PiccoloConfig,
                    dictionary: list[tuple[int, ...]] = ()) -> list[tuple[int, ...]]:
    """Fixed token sequences of the candidate words with ``length`` pieces; ``dictionary``:
    the spellings of dictionary_spellings()."""
    special = set(tokenizer.all_special_ids)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    starts = [(tok, i) for tok, i in vocab if i not in special and tok.isalpha() and tok.isascii()]
    if length == 1:
        return [(i,) for _, i in starts]
    words: dict[tuple[int, ...], None] = {}
    if length == 2:
        short, pieces = spelling_pieces(tokenizer, [i for _, i in vocab if i not in special], config.pair_start_chars)
        words.update((w, None) for w in itertools.islice(((s, p) for s in short for p in pieces),
                                                         config.max_pair_words))
    words.update((ids, None) for ids in dictionary if len(ids) == length)
    return list(itertools.islice(words, config.max_pair_words))


def run_piccolo(loaded, sites: list[str], probes: list[str], heldout: list[str], config: PiccoloConfig,
                verify: VerifyConfig, seed: int = 0, progress=None) -> DetectorRun:
    started = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    reader = SiteReader(model, tokenizer, sites, loaded.device, max_length=config.max_length)
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight.detach().float()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    rows = [reader.encode(t) for t in probes]
    clean = reader.features(rows)
    spread = {s: pairwise_mse(clean[s]) or 1e-12 for s in sites}
    pad_id = tokenizer.pad_token_id or 0
    held = verification_set(reader, heldout, verify, rng)

    plan = [(length, k) for length in config.word_lengths for k in config.slots]
    dictionary = dictionary_spellings(tokenizer) if config.dictionary and max(config.word_lengths) > 1 else []
    words_by_length = {length: candidate_words(tokenizer, length, config, dictionary)
                       for length in config.word_lengths}
    total = len(plan) * config.steps
    runs_log, findings, seen = [], [], set()
    for index, (length, k) in enumerate(plan):
        words = words_by_length[length]
        if not words:
            runs_log.append({"slots": k, "word_pieces": length, "candidates": 0, "skipped": "no candidate words"})
            continue
        table = torch.tensor(words, dtype=torch.long, device=weight.device)  # (n, length)
        word_embeds = weight[table]  # (n, length, hidden)
        logits = (0.01 * torch.randn((k, len(words)), generator=generator)).to(weight.device).requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=config.learning_rate)
        losses = []
        for step in range(config.steps):
            frac = step / max(1, config.steps - 1)
            temperature = config.temperature_start * (config.temperature_end / config.temperature_start) ** frac
            weights = torch.softmax(logits / temperature, dim=1)
            prompt = torch.einsum("kn,nlh->klh", weights, word_embeds).reshape(k * length, -1)
            batch = rng.sample(range(len(rows)), min(config.batch_size, len(rows)))
            batch_rows = [rows[i] for i in batch]
            positions = [1 if rng.random() < 0.5 else
                         rng.choice([p for p in word_starts(tokenizer, r) if p <= config.max_insert_position] or [1])
                         for r in batch_rows]
            embeds, attention, ids = prompted_embeds(embeddings, batch_rows, prompt, positions, pad_id)
            out = model(inputs_embeds=embeds, attention_mask=attention)
            loss = 0.0
            for site in sites:
                feature = reader.read(out, site, ids, attention).float()
                target = torch.as_tensor(clean[site][batch], device=feature.device)
                distance = torch.nn.functional.mse_loss(feature, target) / spread[site]
                loss = loss - distance - config.lambda_diversity * batch_entropy(feature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(index * config.steps + step + 1, total, losses[-1], len(findings))
        with torch.no_grad():
            final = torch.softmax(logits / config.temperature_end, dim=1).cpu().numpy()
        top = [np.argsort(-row)[: config.top_k] for row in final]
        tops = [[{"word": _text(tokenizer, words[i]), "weight": round(float(row[i]), 4)} for i in order]
                for row, order in zip(final, top)]
        peak = [float(row.max()) for row in final]  # at temperature_end: annealing pushes this towards 1
        with torch.no_grad():
            ranked = torch.topk(logits.detach(), min(2, len(words)), dim=1).values
        margin = [round(float(r[0] - r[-1]), 4) for r in ranked]  # top-1 minus top-2 logit: did one word win?
        entry = {
            "slots": k, "word_pieces": length, "candidates": len(words), "steps": config.steps,
            "loss": _curve(losses), "slot_peak_weight": [round(p, 4) for p in peak],
            "slot_logit_margin": margin,
            "slot_entropy_ratio": [round(float(-(row * np.log(np.clip(row, 1e-12, None))).sum())
                                         / math.log(len(words)), 4) if len(words) > 1 else 0.0 for row in final],
            "concentrated": all(p >= config.concentration for p in peak), "top_words": tops,
        }
        runs_log.append(entry)
        combos = list(itertools.islice(itertools.product(*top), config.max_candidates))
        verified = []
        for combo in combos:
            token_ids = tuple(t for i in combo for t in words[i])
            if token_ids in seen:
                continue
            seen.add(token_ids)
            best = held.best_measure(token_ids, sites, verify)
            confirmed = [s for s in sites if best[s]["confirmed"]]
            site = min(confirmed or sites, key=lambda s: best[s]["collapse"])
            verified.append({"text": _text(tokenizer, token_ids), "token_ids": token_ids, "site": site,
                             "confirmed": bool(confirmed), **{k2: v for k2, v in best[site].items() if k2 != "pv"},
                             "pv": best[site]["pv"],
                             "relaxed_weight": round(float(np.prod([final[j][i] for j, i in enumerate(combo)])), 4)})
        entry["verified"] = [{k2: v for k2, v in c.items() if k2 not in ("pv", "token_ids")} for c in verified]
        # Strongest first: the word the relaxed distribution chose, then the lowest collapse.
        hits = sorted((c for c in verified if c["confirmed"]), key=lambda c: (-c["relaxed_weight"], c["collapse"]))
        if hits:
            hit = hits[0]
            findings.append(Finding(
                detector=NAME, rule_id="LMS401", site=hit["site"], score=hit["collapse"],
                threshold=verify.collapse_threshold,
                message=(f"word-level inversion ({k} slot(s), {length}-piece words) found {hit['text']!r}: inserted "
                         f"into held-out sentences ({hit['placement']}) it drives {hit['activation_rate']:.0%} of "
                         f"them onto one {hit['site']} vector (collapse {hit['collapse']:.3f})"
                         + (f"; {len(hits) - 1} more candidate(s) verified" if len(hits) > 1 else "")),
                evidence={"trigger": hit["text"],
                          "trigger_tokens": tokenizer.convert_ids_to_tokens(list(hit["token_ids"])),
                          "collapse": hit["collapse"], "activation_rate": hit["activation_rate"],
                          "placement": hit["placement"], "relaxed_weight": hit["relaxed_weight"],
                          "pv": [round(float(x), 5) for x in hit["pv"]], "slots": k, "word_pieces": length,
                          "also": [{"text": c["text"], "tokens": tokenizer.convert_ids_to_tokens(list(c["token_ids"])),
                                    "site": c["site"], "collapse": c["collapse"]} for c in hits[1:]],
                          "top_words": tops},
            ))
        if not hits and entry["concentrated"]:
            best_c = min(verified, key=lambda c: c["collapse"]) if verified else None
            findings.append(Finding(
                detector=NAME, rule_id="LMS402", site=best_c["site"] if best_c else None,
                score=best_c["collapse"] if best_c else None, threshold=verify.collapse_threshold,
                message=(f"word-level inversion ({k} slot(s), {length}-piece words) concentrated on "
                         f"{', '.join(t[0]['word'] for t in tops)!s} but no candidate verified with real tokens"),
                evidence={"slots": k, "top_words": tops},
            ))
    stats = {"runs": runs_log, "clean_spread": {s: round(v, 6) for s, v in spread.items()},
             "converged": any(r.get("concentrated") for r in runs_log)}
    return DetectorRun(NAME, "ok", time.perf_counter() - started, list(sites), stats, findings)


def _text(tokenizer, token_ids) -> str:
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(token_ids)))


def _curve(losses: list[float]) -> dict:
    """First, best and last loss, and ten evenly spaced points of the curve."""
    picks = np.linspace(0, len(losses) - 1, min(10, len(losses))).round().astype(int)
    return {"first": round(losses[0], 4), "min": round(min(losses), 4), "last": round(losses[-1], 4),
            "points": [round(losses[i], 4) for i in picks]}


class Piccolo(Detector):
    """A baseline: a verified word is a finding, but an inversion that found nothing clears nothing."""

    name = NAME
    Config = PiccoloConfig
    rule_ids = ("LMS401", "LMS402")
    can_clear = False
    sites = SITES
    # Checked on encoder sites only; a decoder's last token is skipped until a detector is verified there.
    families = (ENCODER,)
    summary = "PICCOLO-style word-level trigger inversion (baseline; flags only)"

    def run(self, ctx: ScanContext) -> DetectorRun:
        return run_piccolo(ctx.loaded, ctx.sites, ctx.fit, ctx.heldout, ctx.config, ctx.verify, seed=ctx.seed,
                           progress=lambda done, total, _loss=0.0, _found=0: ctx.progress(done, total))
