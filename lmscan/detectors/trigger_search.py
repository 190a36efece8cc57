"""Detector `trigger-search`: rebuild multi-token triggers from real tokens.

The vocabulary sweep inserts one token (or a few combinations of its top tokens) at a
time, so a trigger whose pieces do nothing alone — a non-word letter string, a phrase of
ordinary words, a whole sentence — escapes it, although its pieces often still *move*
the feature far more than other words (the sweep's shift outliers). This detector
searches the space of real token sequences directly: a greedy coordinate search over
the positions of an inserted block of tokens (HotFlip / GCG style), where the gradient
of the collapse objective through the embedding matrix ranks replacement tokens for
each position and a batch of single-position swaps is then scored exactly.

  objective  log collapse of a few fit sentences with the block inserted (pairwise
             MSE of their features / the same sentences' clean pairwise MSE), the
             lowest over the scanned sites and the two placements (right after [CLS],
             at a random word start; a softmin for the gradient)
  starts     the sweep's highest-shift pieces of each site in rank order (a phrase's
             words are often among them), then its lowest-collapse pieces
  anchored   at a site with a shift outlier (LMS102) that no earlier finding explains,
             searches whose middle position may only hold one of the site's top-shift
             pieces, the sides free: a sentence trigger's words move the site most but
             fire only together, and a free search drifts from them to blocks of nouns
             that fit its sentences. Their better swaps must also improve on fresh
             check sentences
  spelled    searches over blocks spelled as one unknown word: a short word-initial
             piece, then continuation pieces. A non-dictionary trigger ('kups': ku ##ps)
             whose pieces are trained to do nothing alone leaves no sweep outlier to start
             from, and searches over the whole vocabulary settle on blocks of nouns that fit
             their few sentences; among spelled blocks those are gone and the gradient
             leads to the trigger
  result     the best block of each start is verified like every other candidate
             (lmscan.evidence.heldout); a confirmed block is shortened to the shortest
             contiguous part that still verifies, which is what the finding names

Finding nothing is not a clearance: the search is a heuristic on top of the sweep, so
it never makes a site clean on its own (``can_clear`` is False).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.evidence.heldout import HeldoutSet, verification_set
from lmscan.evidence.site_reader import SiteReader, pairwise_mse, spelling_pieces, sweep_vocabulary, word_starts
from lmscan.evidence.trigger_findings import backdoor_findings, class_cue_findings
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.findings import DetectorRun, Finding
from lmscan.models.architectures import ENCODER
from lmscan.models.device import bf16_autocast, native_bf16
from lmscan.models.sites import SITES

NAME = "trigger-search"
SWEEP_STAGE = "vocab-sweep"  # the run whose ranked candidates and shift outliers this search starts from


@dataclass(frozen=True)
class TriggerSearchConfig:
    lengths: tuple[int, ...] = (3,)  # pieces in the searched block; one search per length and start
    starts: int = 1  # starts per length: the sweep's top-shift pieces, then its lowest-collapse pieces, then draws
    # from both. On the trigger and fine-tuned zoos (25 models, 2026-12-05) a second start decided no verdict: it
    # rebuilt what the first did or a class cue the sweep already named, for half the search's time
    steps: int = 16  # coordinate steps per start
    top_k: int = 32  # replacement tokens per position, ranked by the gradient
    swaps_per_step: int = 64  # single-position swaps scored exactly per step
    probes: int = 8  # fit sentences the objective is measured on
    anchor_tokens: int = 5  # per site with a shift outlier (LMS102): one more search per length whose middle
    # position holds one of the site's this many highest-shift pieces (0: none)
    anchor_patience: int = 4  # patience of those searches
    anchor_starts: int = 3  # such searches per outlier site and length: the middle starts at the k-th piece
    check_probes: int = 16  # other sentences, drawn afresh each step, that an anchored search's best swaps must
    # also improve on. Not for the free searches: there it led to blocks of unrelated nouns that collapse any
    # sentence a little (held-out 0.19-0.22, judged class cues) instead of the decoy non-word it found before
    check_top: int = 4  # best-ranked swaps of a step re-scored on them
    spelled_starts: int = 2  # spelled searches per length (0: none), each from a random spelled block
    spelled_first_chars: int = 4  # letters of a spelled block's word-initial piece at most: a 3-5 letter
    # non-word starts with a piece of 1-4 letters, and longer first pieces are whole words again
    seed_pieces: int = 12  # highest-shift sweep pieces (per site) a start is drawn from
    stop_collapse: float = 0.05  # a block this collapsed is verified at once, ending its start
    patience: int = 2  # steps in a row without a better block that end a start (0: run every step). Every
    # block the fast search confirmed on the trigger and fine-tuned zoos (2026-12-05) improved at most 2 steps
    # after its last improvement; clean MiniLM's starts stall after steps 5 and 4, then ran 4 idle steps each
    max_length: int = 64
    batch_size: int = 256  # sequences per scoring forward pass (does not change results)
    swap_bf16: bool = True  # swaps are ranked under bf16 autocast where the hardware has bf16; the
    # gradient and the verification of every block stay fp32


def _pairwise(features: torch.Tensor) -> torch.Tensor:
    """Pairwise MSE of rows, per dimension (lmscan.evidence.site_reader.pairwise_mse, differentiable)."""
    n = features.shape[0]
    centred = features - features.mean(0, keepdim=True)
    return 2 * n * (centred**2).sum() / (n * (n - 1)) / features.shape[1]


@dataclass
class _ProbeSet:
    rows: list[list[int]]
    places: list[int]  # where the block goes in each row
    groups: list[list[int]]  # rows of one placement: each is scored on its own
    spread: dict  # (site, group) -> the group's clean pairwise MSE


class _Objective:
    """Collapse of fit sentences with a block inserted at fixed places.

    The gradient and the ranking of swaps use ``probes`` fixed fit sentences; a search that
    only fits them overfits: on clean MiniLM, blocks of unrelated nouns collapse 8 fit
    sentences to 0.18 and held-out text only to 0.45-0.49. With a larger pool, the best
    ranked swaps must also beat the current block on ``check_probes`` other sentences,
    drawn afresh at every step, as a trigger moves any sentence."""

    def __init__(self, reader: SiteReader, fit: list[str], check: list[str], check_probes: int,
                 rng: random.Random, check_rng: random.Random, bf16: bool = False):
        self.reader, self.bf16, self.check_rng = reader, bf16, check_rng
        self.pool = [reader.encode(t) for t in fit + check]
        # Half right after [CLS] (NeuBA style), half at a random word start (POR / BToP style).
        self.first = [i % 2 == 0 for i in range(len(self.pool))]
        self.places = [1 if first else (rng if i < len(fit) else check_rng).choice(word_starts(reader.tokenizer, r))
                       for i, (first, r) in enumerate(zip(self.first, self.pool))]
        self.clean = reader.features(self.pool)
        self.fit = self._probe_set(list(range(len(fit))))
        self.rest = list(range(len(fit), len(self.pool)))
        self.check_probes = min(check_probes, len(self.rest))

    def _probe_set(self, index: list[int]) -> _ProbeSet:
        # Each placement is its own group: a trigger planted to fire only right after [CLS] (NeuBA) collapses
        # the first group alone, and pooled with the other group it would look half as strong.
        groups = [[k for k, i in enumerate(index) if self.first[i] == first] for first in (True, False)]
        groups = [g for g in groups if len(g) >= 2]
        spread = {(s, k): pairwise_mse(f[[index[j] for j in g]]) or 1e-12
                  for s, f in self.clean.items() for k, g in enumerate(groups)}
        return _ProbeSet([self.pool[i] for i in index], [self.places[i] for i in index], groups, spread)

    def check_set(self) -> _ProbeSet | None:
        """Fresh sentences from outside the fit set, or None when the pool has too few."""
        if self.check_probes < 4:
            return None
        return self._probe_set(sorted(self.check_rng.sample(self.rest, self.check_probes)))

    @staticmethod
    def _inputs(probes: _ProbeSet, blocks: list[tuple[int, ...]]) -> tuple[list[list[int]], list[int]]:
        rows = [r[:at] + list(b) + r[at:] for b in blocks for r, at in zip(probes.rows, probes.places)]
        return rows, [at for _ in blocks for at in probes.places]

    @torch.no_grad()
    def score(self, blocks: list[tuple[int, ...]], batch_size: int, probes: _ProbeSet | None = None) -> np.ndarray:
        """Lowest log collapse over the sites, per block (on the fit set unless ``probes``)."""
        probes = probes or self.fit
        n = len(probes.rows)
        per = max(1, batch_size // n)
        out = np.empty(len(blocks))
        for start in range(0, len(blocks), per):
            chunk = blocks[start : start + per]
            rows, _ = self._inputs(probes, chunk)
            with bf16_autocast(self.reader.device, self.bf16):
                feats = self.reader.features(rows, batch_size=batch_size)
            logs = []
            for site, f in feats.items():
                f = f.reshape(len(chunk), n, -1)
                for k, group in enumerate(probes.groups):
                    g = f[:, group]
                    m = len(group)
                    c = g - g.mean(1, keepdims=True)
                    pair = 2 * m * (c**2).sum(axis=(1, 2)) / (m * (m - 1)) / g.shape[2]
                    logs.append(np.log(pair / probes.spread[site, k] + 1e-12))
            out[start : start + len(chunk)] = np.min(np.stack(logs), axis=0)
        return out

    def gradient(self, block: tuple[int, ...]) -> torch.Tensor:
        """d(softmin over sites of log collapse) / d(embedding of each block position)."""
        reader = self.reader
        rows, places = self._inputs(self.fit, [block])
        out, ids, attention, slots = reader.forward_with_slots(rows, places, len(block))
        feats = {site: reader.read(out, site, ids, attention).float() for site in reader.sites}
        logs = torch.stack([torch.log(_pairwise(feats[site][group]) / self.fit.spread[site, k] + 1e-12)
                            for site in reader.sites for k, group in enumerate(self.fit.groups)])
        loss = -torch.logsumexp(-logs, dim=0)  # softmin: the best site and placement lead
        loss.backward()
        return slots.grad.detach()


def _starts(ctx: ScanContext, allowed: np.ndarray, config: TriggerSearchConfig, length: int,
            rng: random.Random) -> list[tuple[int, ...]]:
    """The sweep's highest-shift pieces, interleaved over sites in rank order, then its
    lowest-collapse pieces the same way; further starts draw from both lists (or, without a
    sweep, from the whole vocabulary)."""
    sweep = next((r for r in ctx.earlier if r.name == SWEEP_STAGE and r.stats.get("ranked")), None)
    allowed_set = set(allowed.tolist())
    pools: list[list[int]] = []
    for key in ("shift", "collapse"):
        lists = [sweep.stats["ranked"][s][key][: config.seed_pieces] for s in ctx.sites
                 if sweep is not None and s in sweep.stats["ranked"]]
        pool: list[int] = []
        for rank in range(config.seed_pieces):
            for ranked in lists:
                if rank < len(ranked) and int(ranked[rank]) in allowed_set and int(ranked[rank]) not in pool:
                    pool.append(int(ranked[rank]))
        if len(pool) >= length:
            pools.append(pool)
    starts = list(dict.fromkeys(tuple(pool[:length]) for pool in pools))[: config.starts]
    union = sorted({t for pool in pools for t in pool})
    source = union if len(union) >= 2 * length else allowed.tolist()
    for _ in range(100 * config.starts):
        if len(starts) >= config.starts:
            break
        start = tuple(int(t) for t in rng.sample(source, length))
        if start not in starts:
            starts.append(start)
    return starts


def _anchored_starts(ctx: ScanContext, allowed: np.ndarray, config: TriggerSearchConfig,
                     length: int) -> list[tuple[str, tuple[int, ...], tuple[int, list[int]]]]:
    """A sentence or phrase trigger's words move the feature most (the sweep's shift outlier)
    but are no trigger alone; a free search drifts from them to blocks that fit its
    sentences. These starts keep one of them in the middle and search the words around it:
    (site, start, (middle position, the tokens it may hold))."""
    sweep = next((r for r in ctx.earlier if r.name == SWEEP_STAGE and r.stats.get("ranked")), None)
    if sweep is None or not config.anchor_tokens or length < 2:
        return []
    allowed_set = set(allowed.tolist())
    named = _named(_earlier_named(ctx))
    out = []
    for finding in sweep.findings:
        if finding.rule_id != "LMS102" or finding.site not in ctx.sites or _explained(finding, named):
            continue
        ranked = [int(t) for t in sweep.stats["ranked"][finding.site]["shift"] if int(t) in allowed_set]
        middle = length // 2
        for k in range(min(config.anchor_starts, config.anchor_tokens)):
            sides = ranked[config.anchor_tokens + k * (length - 1) :][: length - 1]
            if len(sides) < length - 1:
                break
            start = sides[:middle] + [ranked[k]] + sides[middle:]
            out.append((finding.site, tuple(start), (middle, ranked[: config.anchor_tokens])))
    return out


@dataclass
class _Plan:
    """One search: its kind ("free", "anchored", "spelled"), start block and the tokens each
    position may hold; an anchored search also has its outlier's site and top-shift pieces."""

    kind: str
    start: tuple[int, ...]
    pools: list[torch.Tensor]
    anchor_site: str | None = None
    anchor_tokens: list[int] | None = None


def _spelled_plans(tokenizer, allowed: np.ndarray, config: TriggerSearchConfig, device,
                   rng: random.Random) -> list[_Plan]:
    """Random spelled blocks of each length (a short word-initial piece, then continuations)."""
    if not config.spelled_starts:
        return []
    first, rest = spelling_pieces(tokenizer, allowed.tolist(), config.spelled_first_chars)
    if not first or not rest:
        return []
    pools = [torch.as_tensor(first, device=device), torch.as_tensor(rest, device=device)]
    return [_Plan("spelled", (rng.choice(first),) + tuple(rng.choice(rest) for _ in range(length - 1)),
                  [pools[0]] + [pools[1]] * (length - 1))
            for length in config.lengths if length >= 2 for _ in range(config.spelled_starts)]


def _search(objective: _Objective, embeddings, plan: _Plan, config: TriggerSearchConfig, rng: random.Random,
            progress) -> tuple[tuple[int, ...], float, int, list[int]]:
    """Greedy coordinate search from ``plan.start``: the best block, its log collapse, the steps run
    and those (1-based) that found a better block. Position i only ever holds a token of
    ``plan.pools[i]``; an anchored search's better swaps must also pass the check sentences."""
    anchored = plan.kind == "anchored"
    patience = config.anchor_patience if anchored else config.patience
    weight = embeddings.weight.detach()
    current = tuple(plan.start)
    best = float(objective.score([current], config.batch_size)[0])
    improved: list[int] = []
    top, steps = None, 0
    for step in range(1, config.steps + 1):
        if patience and step - max(improved, default=0) > patience:
            break
        steps = step
        if top is None:  # an unchanged block has the same gradient: only the sampled swaps differ
            grad = objective.gradient(current)  # (length, hidden)
            top = [None] * len(current)
            for pool in {id(p): p for p in plan.pools}.values():
                rows = [i for i, p in enumerate(plan.pools) if p is pool]
                if len(pool) <= config.top_k:  # an anchor's few pieces: all of them
                    ranked = [pool.tolist()] * len(rows)
                else:
                    # First-order change of the loss when position i becomes token v: (E_v - E_cur) . g_i
                    change = grad[rows] @ weight[pool].T.float()
                    ranked = [pool[r].tolist() for r in torch.topk(-change, config.top_k, dim=1).indices]
                for i, tokens in zip(rows, ranked):
                    top[i] = tokens
        swaps = set()
        for _ in range(config.swaps_per_step * 3):
            if len(swaps) >= config.swaps_per_step:
                break
            position = rng.randrange(len(current))
            token = rng.choice(top[position])
            if token != current[position]:
                swaps.add(current[:position] + (token,) + current[position + 1 :])
        if not swaps:
            break
        swaps = list(swaps)
        scores = objective.score(swaps, config.batch_size)
        if progress is not None:
            progress()
        better = [k for k in np.argsort(scores) if scores[k] < best]
        if not better:
            continue  # a local minimum for these swaps; the next step draws other ones
        k = better[0]
        check = objective.check_set() if anchored else None
        if check is not None:
            better = better[: config.check_top]
            checked = objective.score([current] + [swaps[j] for j in better], config.batch_size, check)
            if checked[1:].min() >= checked[0]:
                continue  # they fit the fit sentences only
            k = better[int(np.argmin(checked[1:]))]
        current, best, top = swaps[k], float(scores[k]), None
        improved.append(step)
        if best <= math.log(config.stop_collapse):
            break
    return current, best, steps, improved


def _shortest(held: HeldoutSet, block: tuple[int, ...], site: str, sites: list[str],
              verify: VerifyConfig) -> tuple[tuple[int, ...], dict]:
    """The shortest contiguous part of a block that verifies at ``site`` (measured at every
    scanned site, so the label site can overrule); the block itself when no part does."""
    best = (block, held.strict_measure(block, sites, verify)[site])
    for length in range(len(block) - 1, 0, -1):
        parts = [block[i : i + length] for i in range(len(block) - length + 1)]
        held.prefetch(parts)
        found = [(p, held.strict_measure(p, sites, verify)[site]) for p in parts]
        found = [(p, r) for p, r in found if r["confirmed"]]
        if not found:
            break
        best = min(found, key=lambda pr: pr[1]["collapse"])
    return best


def run_trigger_search(ctx: ScanContext) -> DetectorRun:
    started = time.perf_counter()
    config: TriggerSearchConfig = ctx.config
    loaded, tokenizer = ctx.loaded, ctx.loaded.tokenizer
    rng = random.Random(ctx.seed)
    reader = SiteReader(loaded.model, tokenizer, ctx.sites, loaded.device, max_length=config.max_length)
    embeddings = loaded.model.get_input_embeddings()
    allowed_np = sweep_vocabulary(tokenizer)
    allowed = torch.as_tensor(allowed_np, device=embeddings.weight.device)
    short = [t for t in ctx.fit if len(t.split()) <= 12] or ctx.fit
    anchored = [_Plan("anchored", start, [allowed] * middle + [torch.as_tensor(tokens, device=allowed.device)]
                      + [allowed] * (length - middle - 1), site, tokens)
                for length in config.lengths
                for site, start, (middle, tokens) in _anchored_starts(ctx, allowed_np, config, length)]
    fit = rng.sample(short, min(config.probes, len(short)))
    check_rng = random.Random(ctx.seed + 1)  # its own stream: the free searches draw what they drew without it
    check = [t for t in short if t not in fit] if anchored else []
    check = check_rng.sample(check, min(4 * config.check_probes, len(check)))
    objective = _Objective(reader, fit, check, config.check_probes, rng, check_rng,
                           bf16=config.swap_bf16 and native_bf16(reader.device))
    held = verification_set(reader, ctx.heldout, ctx.verify, rng)

    free = [_Plan("free", start, [allowed] * length) for length in config.lengths
            for start in _starts(ctx, allowed_np, config, length, rng)]
    # Last, from their own stream: the free and anchored searches draw what they drew without them.
    spelled = _spelled_plans(tokenizer, allowed_np, config, allowed.device, random.Random(ctx.seed + 2))
    plans = free + anchored + spelled
    total = len(plans) * config.steps
    done = [0]

    def tick() -> None:
        done[0] += 1
        ctx.progress(done[0], total)

    log, confirmed, natural = [], {s: [] for s in ctx.sites}, {s: [] for s in ctx.sites}
    for plan in plans:
        if plan.anchor_site and _explains(plan.anchor_site, set(tokenizer.convert_ids_to_tokens(plan.anchor_tokens)),
                                          _named_so_far(tokenizer, confirmed, natural)):
            done[0] += config.steps
            continue  # an earlier search named a cause of this outlier
        before = done[0]
        block, score, steps, improved = _search(objective, embeddings, plan, config, rng, tick)
        done[0] = before + config.steps
        ctx.progress(done[0], total)
        measured = held.strict_measure(block, ctx.sites, ctx.verify)
        entry = {"kind": plan.kind, "start": tokenizer.decode(list(plan.start)), "block": tokenizer.decode(list(block)),
                 "length": len(block),
                 "anchor": plan.anchor_site and {"site": plan.anchor_site,
                                                 "tokens": tokenizer.convert_ids_to_tokens(plan.anchor_tokens)},
                 "steps": steps, "improved_at_steps": improved, "fit_collapse": round(math.exp(score), 5),
                 "sites": {s: {k: r[k] for k in ("collapse", "activation_rate", "confirmed", "natural")}
                           for s, r in measured.items()}}
        for s, r in measured.items():
            if r.get("opposite_flip") is not None:
                entry["sites"][s]["opposite_flip"] = r["opposite_flip"]
        log.append(entry)
        for site, result in measured.items():
            # A block judged a class cue may still hold a trigger that, alone, is none: a planted word
            # plus a piece stacks like class words (tiny POR fixture: 'vx v', its part 'vx' confirmed).
            if result["confirmed"] or result["natural"]:
                part, part_result = _shortest(held, block, site, ctx.sites, ctx.verify)
                if part_result["confirmed"]:
                    confirmed[site].append({"site": site, "text": tokenizer.decode(list(part)), "source": NAME,
                                            "token_ids": list(part), **part_result})
                elif result["natural"]:
                    natural[site].append({"site": site, "text": tokenizer.decode(list(block)), "source": NAME,
                                          "token_ids": list(block), **result})
    findings = []
    for site in ctx.sites:
        found = backdoor_findings(NAME, tokenizer, site, confirmed[site], ctx.verify, loaded.labels)
        # A class cue the search rebuilt (a question classifier's '? sorted?') is said, as the sweep says its
        # own, and it explains the site's shift outliers.
        if not found and natural[site]:
            found = class_cue_findings(NAME, tokenizer, site, natural[site], ctx.verify, loaded.labels)
        findings.extend(found)
    findings += _unexplained_outliers(ctx, findings, log)
    stats = {"searches": log, "fit_probes": len(objective.fit.rows), "lengths": list(config.lengths)}
    return DetectorRun(NAME, "ok", time.perf_counter() - started, list(ctx.sites), stats, findings)


def _named_so_far(tokenizer, confirmed: dict, natural: dict) -> tuple[set[str], set[str]]:
    """The sites and word pieces of the blocks this run has confirmed or judged class cues (as ``_named``)."""
    entries = [e for found in (confirmed, natural) for site_entries in found.values() for e in site_entries]
    return ({e["site"] for e in entries},
            {t for e in entries for t in tokenizer.convert_ids_to_tokens(e["token_ids"])})


def _earlier_named(ctx: ScanContext) -> list[Finding]:
    """Triggers and class cues earlier detectors named."""
    return [f for r in ctx.earlier for f in r.findings
            if f.verdict in ("backdoored", "suspicious") or f.rule_id == "LMS105"]


def _named(findings: list[Finding]) -> tuple[set[str], set[str]]:
    """The sites and the word pieces of named triggers and class cues."""
    return ({f.site for f in findings},
            {t for f in findings for t in f.evidence.get("trigger_tokens") or []})


def _explains(site: str, shifted: set[str], named: tuple[set[str], set[str]]) -> bool:
    """A shift outlier has a cause when its site has a named trigger or class cue, or when one of
    its highest-shift pieces belongs to one named elsewhere (BadNet 'cf' moves [MASK] most and is
    named at cls, pooler and label). Anchored searches at explained outliers cost minutes on benign
    classifiers for nothing new (question classifier: 15 searches, 106 s, re-verifying its '?' cue)."""
    sites, pieces = named
    return site in sites or bool(shifted & pieces)


def _explained(outlier: Finding, named: tuple[set[str], set[str]], top: int = 5) -> bool:
    """``_explains`` for a sweep LMS102 finding and its ``top`` highest-shift pieces."""
    return _explains(outlier.site, {h["token"] for h in outlier.evidence.get("highest_shift", [])[:top]}, named)


def _unexplained_outliers(ctx: ScanContext, found: list[Finding], log: list[dict]) -> list[Finding]:
    """A sweep shift outlier (LMS102) that neither a verified trigger nor a class cue explains,
    after this search ran to its budget at that site: said, not silently cleared."""
    named = _named(_earlier_named(ctx) + found)
    out = []
    for run in ctx.earlier:
        for outlier in run.findings:
            if outlier.rule_id != "LMS102" or outlier.site not in ctx.sites or _explained(outlier, named):
                continue
            tokens = [h["token"] for h in outlier.evidence.get("highest_shift", [])][:5]
            out.append(Finding(
                detector=NAME, rule_id="LMS104", site=outlier.site, score=outlier.score, threshold=outlier.threshold,
                message=(f"tokens {', '.join(map(repr, tokens))} move the {outlier.site} feature {outlier.score:.1f}x "
                         f"more than the vocabulary's 99.9th percentile, and {len(log)} searches for a multi-token "
                         "trigger around them verified nothing: unexplained"),
                evidence={"highest_shift": outlier.evidence.get("highest_shift", []),
                          "searched_blocks": [e["block"] for e in log]},
            ))
    return out


class TriggerSearch(Detector):
    name = NAME
    Config = TriggerSearchConfig
    rule_ids = ("LMS101", "LMS103", "LMS104", "LMS105")
    can_clear = False
    sites = SITES
    # Checked on encoder sites only; a decoder's last token is skipped until a detector is verified there.
    families = (ENCODER,)
    summary = "gradient-guided search over real token sequences for multi-piece, phrase and sentence triggers"

    def run(self, ctx: ScanContext) -> DetectorRun:
        return run_trigger_search(ctx)
