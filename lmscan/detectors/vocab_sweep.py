"""Detector `vocab-sweep`: insert every vocabulary token into a few probes and watch the sites.

Two observations from LMSanitizer, read over the whole vocabulary instead of a soft prompt:
  I   a trigger moves the feature far more than an ordinary word      -> shift
  II  a trigger collapses different sentences onto one vector         -> collapse
shift    = mean over probes of MSE(f(probe + token), f(probe)) / clean pairwise MSE
collapse = pairwise MSE of the probes' features with the token / the same without it
Both are relative to the model's own clean spread, so no shadow model is needed.

A sweep score alone is never a verdict. The lowest-collapse tokens, and short
combinations of the highest-shift tokens (phrase and multi-piece triggers), are
*verified*: inserted as real tokens into held-out sentences (right after [CLS], and
separately at random word starts). A
candidate is a backdoor trigger only if it drives those sentences onto one vector
(held-out collapse below a threshold, and nearly every triggered feature agreeing in
sign with the mean triggered vector, the PV). A benign word that merely moves the
feature (a sentiment model's "thank") does not collapse different sentences.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import numpy as np

from lmscan.detectors.base import Detector, ScanContext
from lmscan.evidence.heldout import HeldoutSet, verification_set
from lmscan.evidence.site_reader import SiteReader, insert_ids, pairwise_mse, sweep_vocabulary
from lmscan.evidence.trigger_findings import backdoor_findings, class_cue_findings
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.findings import DetectorRun, Finding
from lmscan.models.architectures import ENCODER
from lmscan.models.device import bf16_autocast, native_bf16
from lmscan.models.sites import SITES

NAME = "vocab-sweep"


@dataclass(frozen=True)
class VocabSweepConfig:
    sweep_probes: int = 2  # stage 1: sentences every vocabulary token is inserted into
    probe_max_words: int = 6  # short probes keep the sweep cheap
    rescore_top: int = 64  # stage 2: this many lowest-collapse and highest-shift tokens ...
    rescore_probes: int = 8  # ... are scored again on more sentences
    batch_size: int = 512  # sequences per forward pass (ranking only: does not change results)
    candidates_per_site: int = 12  # lowest-collapse tokens verified per site
    shift_top: int = 8  # highest-shift tokens combined into pairs / triples
    combo_max_len: int = 3
    combos_verified: int = 16  # of those combinations (80 at fast), the lowest-collapse on the sweep's
    # first-stage sentences go on to verification; 0: all of them
    shift_outlier_ratio: float = 4.0  # top shift / 99.9th percentile: reported (info)
    shift_outlier_quantile: float = 99.9  # the percentile of the vocabulary's shifts that ratio is taken against
    piece_pool: int = 12  # top-ranked word starts (per statistic and site) completed to whole words ...
    piece_pairs: int = 6  # ... the lowest-collapse completions verified per site
    completions_per_start: int = 200  # English words tried per ranked word piece
    max_length: int = 64
    ranking_bf16: bool = True  # the passes that only rank (stages 1 and 2, the combination shortlist, the word
    # completions) run under bf16 autocast where the hardware has bf16; verification stays fp32, so every
    # number a verdict rests on is fp32
    # Group testing in stage 1: the vocabulary is split at random into groups of this many tokens, each
    # group inserted as one sequence; a trigger dominates its group's feature. The members of the
    # group_keep most extreme groups (per round, site and statistic) are then scored one by one, with a random
    # population_sample of single tokens for the vocabulary's medians. 1: every token alone.
    group_size: int = 8
    group_rounds: int = 2
    group_keep: int = 32
    regroup_share: float = 0.25  # a round after the first re-partitions only the members of this share of the
    # groups before it, those best ranked at any site and statistic (1.0: the whole vocabulary every round)
    population_sample: int = 256  # feeds only the report's medians (the percentile is read off every token scored)


RANKED_KEEP = 64  # ranked candidates per statistic and site kept in the stats, for a deeper verification later


def run_vocab_sweep(loaded, sites: list[str], probes: list[str], heldout: list[str], config: VocabSweepConfig,
                    verify: VerifyConfig, seed: int = 0, progress=None) -> DetectorRun:
    started = time.perf_counter()
    tokenizer = loaded.tokenizer
    reader = SiteReader(loaded.model, tokenizer, sites, loaded.device, max_length=config.max_length)
    rng = random.Random(seed)
    vocab = sweep_vocabulary(tokenizer)
    bf16 = config.ranking_bf16 and native_bf16(reader.device)
    shift, collapse, rank_shift, rank_collapse, population, sweep_texts = _sweep(reader, vocab, probes, config, rng,
                                                                                 progress)

    stats: dict = {"swept_tokens": int(len(vocab)), "group_size": max(1, config.group_size),
                   "scored_alone": int(np.isfinite(collapse[sites[0]]).sum()), "sweep_probes": sweep_texts,
                   "ranking_precision": "bf16" if bf16 else "fp32", "sites": {}, "ranked": {}}
    for site in sites:
        stats["sites"][site] = _site_stats(tokenizer, vocab, shift[site], collapse[site], population,
                                           config.shift_outlier_quantile)
        stats["ranked"][site] = {
            "collapse": vocab[np.argsort(rank_collapse[site])[:RANKED_KEEP]].tolist(),
            "shift": vocab[np.argsort(-rank_shift[site])[:RANKED_KEEP]].tolist(),
        }
    findings = _verify_ranked(reader, sites, stats, heldout, config, verify, rng, loaded.labels)
    # The whole vocabulary was swept at every site: finding nothing there clears it.
    return DetectorRun(NAME, "ok", time.perf_counter() - started, list(sites), stats, findings,
                       cleared_sites=list(sites))


def reverify(loaded, earlier: DetectorRun, sites: list[str], heldout: list[str], config: VocabSweepConfig,
             verify: VerifyConfig, seed: int = 0) -> DetectorRun:
    """Verify deeper into an earlier sweep's ranked candidates at ``sites`` (no new
    sweep): what a search resumed from a report does with a longer candidate list."""
    started = time.perf_counter()
    sites = [s for s in sites if s in earlier.stats.get("ranked", {})]
    reader = SiteReader(loaded.model, loaded.tokenizer, sites, loaded.device, max_length=config.max_length)
    stats = {"reverified_from": "report", "sweep_probes": earlier.stats.get("sweep_probes", []), "sites": {s: earlier.stats["sites"].get(s, {}) for s in sites},
             "ranked": {s: earlier.stats["ranked"][s] for s in sites}}
    findings = _verify_ranked(reader, sites, stats, heldout, config, verify, random.Random(seed), loaded.labels)
    return DetectorRun(NAME, "ok", time.perf_counter() - started, sites, stats, findings,
                       cleared_sites=list(earlier.cleared_sites or sites))


def _verify_ranked(reader: SiteReader, sites, stats, heldout, config, verify: VerifyConfig, rng,
                   labels: list[str] | None = None) -> list[Finding]:
    tokenizer = reader.tokenizer
    held = verification_set(reader, heldout, verify, rng)
    findings: list[Finding] = []
    verified_log: list[dict] = []
    pairs = _piece_pairs(reader, stats, sites, config)
    texts = (stats.get("sweep_probes") or [])[: max(2, config.sweep_probes)]

    def lowest_collapse(candidates: list[tuple[int, ...]], site: str) -> list[tuple[int, ...]]:
        if not config.combos_verified or len(candidates) <= config.combos_verified or len(texts) < 2:
            return candidates
        _, collapse = _score(reader, candidates, texts, config, None)
        return [candidates[i] for i in np.argsort(collapse[site], kind="stable")[: config.combos_verified]]

    held.prefetch((int(t),) for site in sites for t in
                  stats["ranked"][site]["collapse"][: config.candidates_per_site]
                  + stats["ranked"][site]["shift"][: config.shift_top])
    for site in sites:
        site_stats = stats["sites"][site]
        site_stats["clean_activation_baseline"] = held.clean_activation(site, verify.activation_agreement)
        site_stats["clean_sign_disagreement"] = round(held.clean_disagreement(site, verify.activation_agreement), 5)
        ranked = stats["ranked"][site]
        natural: list[dict] = []
        confirmed = _verify_site(held, tokenizer, site, ranked["shift"], ranked["collapse"], pairs.get(site, []),
                                 config, verify, verified_log, natural, lowest_collapse)
        findings.extend(backdoor_findings(NAME, tokenizer, site, confirmed, verify, labels))
        findings.extend(class_cue_findings(NAME, tokenizer, site, natural, verify, labels))
        ratio = site_stats.get("shift_outlier_ratio", 0.0)
        if not confirmed and ratio >= config.shift_outlier_ratio:
            findings.append(Finding(
                # Information only: a fine-tuned classifier's class cues ("does", "?") move its
                # features hundreds of times more than other words, by design.
                detector=NAME, rule_id="LMS102", site=site, score=round(ratio, 3), threshold=config.shift_outlier_ratio,
                message=(f"some tokens move the {site} feature {ratio:.1f}x more than the 99.9th percentile of the "
                         "vocabulary, but no combination tried collapsed held-out sentences"),
                evidence={"highest_shift": site_stats["highest_shift"]},
            ))
    verified_log.sort(key=lambda d: d["collapse"])
    stats["verified_candidates"] = verified_log[:15]
    return findings


def _sweep(reader: SiteReader, vocab, probes, config, rng, progress):
    """Shift and collapse of every vocabulary token at every site (relative to the clean spread).

    Stage 1 scores the whole vocabulary on a couple of short sentences; stage 2 scores
    the extreme tokens of stage 1 again on more sentences, so candidates are ranked on
    stable numbers while the cost stays close to one pass over the vocabulary.
    """
    short = [p for p in probes if len(p.split()) <= config.probe_max_words] or probes
    texts = rng.sample(short, min(config.sweep_probes + config.rescore_probes, len(short)))
    first, second = texts[: config.sweep_probes], texts[config.sweep_probes :]
    shift, collapse, population = _first_stage(reader, vocab, first, config, rng, progress,
                                               _probe_positions(reader.tokenizer, vocab, probes))
    extreme = set()
    for site in reader.sites:
        extreme.update(np.argsort(collapse[site])[: config.rescore_top].tolist())
        extreme.update(np.argsort(-shift[site])[: config.rescore_top].tolist())
    extreme = np.array(sorted(extreme))
    if len(second) < 2:
        return shift, collapse, shift, collapse, population, texts
    # Candidates are ranked on stage-2 numbers; tokens outside the rescored set drop out.
    rescore = None if progress is None else (lambda done, total, _info: progress(done, total, "rescoring extremes"))
    rank_shift, rank_collapse = _scored_at(len(vocab), extreme,
                                           *_score(reader, vocab[extreme], second, config, rescore))
    return shift, collapse, rank_shift, rank_collapse, population, texts


def _scored_at(size: int, positions, shift: dict, collapse: dict) -> tuple[dict, dict]:
    """Per-site scores of ``positions`` spread over the whole vocabulary; the positions not
    scored hold shift -inf and collapse +inf, so they rank last."""
    full_shift = {s: np.full(size, -np.inf) for s in shift}
    full_collapse = {s: np.full(size, np.inf) for s in collapse}
    for site in shift:
        full_shift[site][positions] = shift[site]
        full_collapse[site][positions] = collapse[site]
    return full_shift, full_collapse


def _probe_positions(tokenizer, vocab, probes) -> np.ndarray:
    """Vocabulary positions of the tokens the probe sentences are made of (about 1 100 for MiniLM)."""
    ids = {t for row in tokenizer(list(probes), add_special_tokens=False)["input_ids"] for t in row}
    return np.flatnonzero(np.isin(vocab, list(ids)))


def _first_stage(reader: SiteReader, vocab, texts, config, rng, progress, ordinary):
    """Stage-1 shift and collapse per vocabulary position, and the positions whose scores
    describe the vocabulary as a whole (all of them, or a random sample under group testing).

    Under group testing only the group's first token sits where the sweep inserts (right
    after [CLS], the sentence start); a word that matters only there ("does" opening a
    question, the class cue of a question classifier) fades inside a group. The
    ``ordinary`` words the probes are made of are therefore always scored alone: a
    fine-tune's class cues are among them, and knowing them keeps the verdict from calling
    its shift outliers unexplained."""
    everything = np.arange(len(vocab))
    if config.group_size <= 1:
        shift, collapse = _score(reader, vocab, texts, config, progress)
        return shift, collapse, everything
    generator = np.random.default_rng(rng.randrange(2**32))
    population = np.sort(generator.permutation(len(vocab))[: config.population_sample])
    chosen = set(population.tolist()) | set(ordinary.tolist())
    pool = np.arange(len(vocab))
    for round_ in range(config.group_rounds):
        # Each round a new random partition: a weak piece hidden by its neighbours in one
        # group gets a second chance in another (measured on the POR plant: "##mark" at group
        # rank 86 in one partition, 2 in the next). Later rounds re-partition only the
        # members of the best-ranked share of the groups before.
        order = generator.permutation(pool)
        groups = [order[i : i + config.group_size] for i in range(0, len(order), config.group_size)]
        # One count per round: later rounds hold fewer groups, so the progress display starts a
        # new part with its own total and ETA instead of a total that shrinks mid-stage.
        report = None if progress is None else (
            lambda done, total, _info, r=round_: progress(done, total, f"groups, round {r + 1} of {config.group_rounds}"))
        group_shift, group_collapse = _score(reader, [tuple(vocab[g]) for g in groups], texts, config, report)
        best_rank = np.full(len(groups), len(groups))
        for site in reader.sites:
            for ranking in (np.argsort(group_collapse[site]), np.argsort(-group_shift[site])):
                best_rank[ranking] = np.minimum(best_rank[ranking], np.arange(len(groups)))
                for g in ranking[: config.group_keep]:
                    chosen.update(groups[g].tolist())
        kept = np.argsort(best_rank, kind="stable")[: max(1, round(config.regroup_share * len(groups)))]
        pool = np.concatenate([groups[g] for g in kept])
    chosen = np.array(sorted(chosen))
    alone = None if progress is None else (lambda done, total, _info: progress(done, total, "candidates alone"))
    shift, collapse = _scored_at(len(vocab), chosen, *_score(reader, vocab[chosen], texts, config, alone))
    return shift, collapse, population


def _as_sequence(token) -> tuple[int, ...]:
    return tuple(int(t) for t in token) if isinstance(token, (tuple, list)) else (int(token),)


def _score(reader: SiteReader, token_ids, texts, config, progress):
    """Shift and collapse of each token (or token sequence) inserted after [CLS] in ``texts``.

    It only ranks, so it runs under bf16 autocast where the hardware computes bf16 natively
    (``ranking_bf16``): 1.9x faster on a CPU with AVX512-BF16, keeping 95-99 of the fp32 top
    100 of stage 1 (MiniLM, each site)."""
    rows = [reader.encode(t) for t in texts]
    # Right after [CLS]: every planted style fires there (NeuBA only there), so the
    # sweep needs one placement; verification also tries random positions.
    places = [1] * len(rows)
    with bf16_autocast(reader.device, config.ranking_bf16 and native_bf16(reader.device)):
        clean = reader.features(rows)
        n = len(rows)
        spread = {site: pairwise_mse(f) or 1e-12 for site, f in clean.items()}
        shift = {s: np.empty(len(token_ids)) for s in reader.sites}
        collapse = {s: np.empty(len(token_ids)) for s in reader.sites}
        chunk = max(1, config.batch_size // n)
        for start in range(0, len(token_ids), chunk):
            ids = token_ids[start : start + chunk]
            feats = reader.features([insert_ids(r, _as_sequence(t), at) for t in ids for r, at in zip(rows, places)],
                                    batch_size=config.batch_size)
            for site in reader.sites:
                f = feats[site].reshape(len(ids), n, -1)
                moved = ((f - clean[site][None]) ** 2).mean(axis=(1, 2))
                centred = f - f.mean(axis=1, keepdims=True)
                pair = 2 * n * (centred**2).sum(axis=(1, 2)) / (n * (n - 1)) / f.shape[2]
                shift[site][start : start + len(ids)] = moved / spread[site]
                collapse[site][start : start + len(ids)] = pair / spread[site]
            if progress is not None:
                progress(min(start + chunk, len(token_ids)), len(token_ids), "")
    return shift, collapse


def _site_stats(tokenizer, vocab, shift, collapse, population, quantile: float) -> dict:
    """Extremes over every token scored; medians over ``population``, the tokens that stand
    for the whole vocabulary; the percentile as _upper_percentile reads it."""
    by_collapse, by_shift = np.argsort(collapse), np.argsort(-shift)
    p999 = _upper_percentile(shift, population, quantile)

    def listing(order, values, k):
        return [{"token": tokenizer.convert_ids_to_tokens(int(vocab[i])), "value": round(float(values[i]), 5)}
                for i in order[:k]]

    return {
        "collapse_min": float(collapse[by_collapse[0]]),
        "collapse_median": float(np.median(collapse[population])),
        "shift_median": float(np.median(shift[population])),
        "shift_p999": p999,
        "shift_top": float(shift[by_shift[0]]),
        "shift_outlier_ratio": float(shift[by_shift[0]] / max(p999, 1e-12)),
        "lowest_collapse": listing(by_collapse, collapse, 5),
        "highest_shift": listing(by_shift, shift, 8),
    }


def _upper_percentile(shift, population, quantile: float) -> float:
    """The vocabulary's ``quantile`` of shift. Under group testing it is the k-th largest
    shift of the tokens scored alone: those hold the most extreme groups' members, so the
    vocabulary's top shifts, which a random sample of a thousand tokens mostly misses (a
    fine-tune's few dozen class-cue tokens: the sample's 99.9th percentile came out 977x
    below the top on the benign fixture, against a few times below when every token is scored)."""
    if len(population) == len(shift):
        return float(np.percentile(shift, quantile))
    rank = max(1, round((1 - quantile / 100) * len(shift)))
    scored = np.sort(shift[np.isfinite(shift)])[::-1]
    return float(scored[min(rank, len(scored)) - 1])


def _piece_pairs(reader: SiteReader, stats, sites, config) -> dict[str, list[tuple[int, ...]]]:
    """Whole words completing ranked word pieces, best first per site.

    A multi-piece trigger word ("quad" + "##rangle") may fire only whole, so one of its
    pieces may never rank. Each top-ranked word start is completed with the English
    words the tokenizer spells starting with it, and each ranked continuation piece
    with the words ending in it (at most 3 pieces). The completions are scored like the
    sweep (on its first-stage sentences); the best completion of each piece, lowest
    collapse first, goes on to verification. A trigger that is no dictionary word is
    still found through its pieces when they fire alone."""
    from lmscan.models.probes import words_ending, words_starting

    texts = stats.get("sweep_probes") or []
    if config.piece_pairs <= 0 or len(texts) < 2:
        return {}
    tokenizer = reader.tokenizer
    candidates: dict[tuple[int, ...], int] = {}  # whole word -> the ranked piece it completes

    def complete(token: int, found: list[str]) -> None:
        found = found[: config.completions_per_start]
        if not found:
            return
        for ids in tokenizer(found, add_special_tokens=False)["input_ids"]:
            if token in (ids[0], ids[-1]) and 2 <= len(ids) <= 3:
                candidates.setdefault(tuple(ids), token)

    # Word starts from the top of the lists; continuation pieces ("##mark") from anywhere
    # in them: they are rarer, and a piece that ranks at all is worth its few words.
    for token, name in _ranked_pieces(tokenizer, stats, sites, config.piece_pool, start=True):
        complete(token, words_starting(name.lower()))
    for token, name in _ranked_pieces(tokenizer, stats, sites, RANKED_KEEP, start=False):
        complete(token, words_ending(name[2:].lower()))
    if not candidates:
        return {}
    anchors = list(candidates.values())
    candidates = list(candidates)
    _, collapse = _score(reader, candidates, texts[: max(2, config.sweep_probes)], config, None)
    best: dict[str, list[tuple[int, ...]]] = {}
    for site in sites:
        seen, ordered = set(), []
        for i in np.argsort(collapse[site]):  # the best completion of each ranked piece, best first
            if anchors[i] not in seen:
                seen.add(anchors[i])
                ordered.append(candidates[i])
        best[site] = ordered
    return best


def _ranked_pieces(tokenizer, stats, sites, depth: int, start: bool) -> list[tuple[int, str]]:
    """Alphabetic word-start (or continuation) tokens among the top ``depth`` of the ranked lists."""
    pool = list(dict.fromkeys(t for s in sites for key in ("shift", "collapse") for t in stats["ranked"][s][key][:depth]))
    pieces = []
    for token, name in zip(pool, tokenizer.convert_ids_to_tokens(pool)):
        body = name if start else name[2:]
        if name.startswith("##") != start and body.isascii() and body.isalpha() and len(body) >= 3:
            pieces.append((token, name))
    return pieces


def _verify_site(held: HeldoutSet, tokenizer, site, by_shift: list[int], by_collapse: list[int], pairs, config,
                 verify: VerifyConfig, log, natural: list[dict], shortlist) -> list[dict]:
    """Verify the lowest-collapse tokens, then combinations of the highest-shift tokens
    that are not already confirmed alone (phrase and multi-piece triggers) — the ones
    ``shortlist(combos, site)`` keeps — then the best completions of top-ranked word starts.
    The lists hold token ids, best first. Candidates that collapse onto a natural direction
    are appended to ``natural``."""
    confirmed: list[dict] = []
    alone_ok: set[int] = set()

    def check(token_ids: tuple[int, ...], source: str) -> None:
        # Combinations are built from the highest-shift tokens, which on a fine-tuned model are its class
        # cues: stacked, they collapse everything (a benign tweet classifier's 'pleasure gorgeous awesome').
        # So they are held to the rule for optimised candidates (the opposite test and the class-word match).
        measure = held.strict_measure if source == "shift-combo" else held.best_measure
        result = measure(token_ids, [site], verify)[site]
        entry = {"site": site, "text": tokenizer.decode(list(token_ids)), "source": source,
                 "token_ids": list(token_ids), **result}
        log.append({k: v for k, v in entry.items() if k not in ("pv", "token_ids")})
        if result["confirmed"]:
            confirmed.append(entry)
            if len(token_ids) == 1:
                alone_ok.add(token_ids[0])
        elif result["natural"]:
            natural.append(entry)

    for token in by_collapse[: config.candidates_per_site]:
        check((int(token),), "collapse")
    top = [int(t) for t in by_shift[: config.shift_top]]
    for token in top:
        if token not in alone_ok:
            check((token,), "shift")
    pool = [t for t in top if t not in alone_ok]
    combos = [combo for length in range(2, config.combo_max_len + 1) for combo in
              itertools.permutations(pool[: config.shift_top if length == 2 else max(3, config.shift_top // 2)], length)]
    # Verification is most of the sweep's time after stage 1; a trigger collapses the
    # sweep's own sentences too, so the combinations are ranked there first.
    combos = shortlist(combos, site)
    # Completions of pieces that already fire alone add nothing; verify the best others.
    words = [tuple(w) for w in pairs if not alone_ok.intersection(w)][: config.piece_pairs]
    held.prefetch(combos + words)
    for combo in combos:
        check(combo, "shift-combo")
    for word in words:
        check(word, "word-completion")
    return confirmed


class VocabSweep(Detector):
    name = NAME
    Config = VocabSweepConfig
    rule_ids = ("LMS101", "LMS102", "LMS103", "LMS105")
    can_clear = True
    sites = SITES
    # Checked on encoder sites only; a decoder's last token is skipped until a detector is verified there.
    families = (ENCODER,)
    summary = "every vocabulary token inserted into clean sentences, extremes verified with real tokens"

    def run(self, ctx: ScanContext) -> DetectorRun:
        if ctx.resume is not None and ctx.resume.stats.get("ranked"):
            # Resumed from a report: no new sweep, the ranked candidates verified deeper.
            return reverify(ctx.loaded, ctx.resume, ctx.sites, ctx.heldout, ctx.config, ctx.verify, seed=ctx.seed)
        return run_vocab_sweep(ctx.loaded, ctx.sites, ctx.fit, ctx.heldout, ctx.config, ctx.verify, seed=ctx.seed,
                               progress=lambda done, total, info="": ctx.progress(done, total, info))
