"""PV search: collect every predefined vector (PV) a checkpoint hides, with the real
triggers that reach each one (LMSanitizer §IV-C, plus trigger recovery).

Detection stops at the first backdoor; a user who must keep the model needs all of
them for the runtime monitor. The search runs
  1. the static weight rules (their outlier rows are trigger candidates),
  2. the vocabulary sweep with a longer candidate list (resumed from a report: the
     report's ranked sweep candidates are verified that deeper, without a new sweep),
  3. the PV miner in search mode: fuzz loops steered away from every PV found so far
     (path loss), until ``patience`` loops in a row find nothing new,
then re-measures every candidate trigger at each site on held-out sentences, in the
input form the monitor will see (the mask site reads the prompt template, the others
the plain sentence). A trigger that drives the sentences onto one vector yields a PV,
unless a PV found before already flags those triggered sentences (then it is listed
as another trigger of that PV): single tokens are tried first, then combinations.

Finally the monitor threshold is calibrated: clean held-out sentences (never used for
verification) are matched against every PV, and T_match is raised above the paper's
0.8 only if clean text comes too close.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from lmscan.detectors.vocab_sweep import VocabSweepConfig
from lmscan.errors import LmscanError
from lmscan.evidence.heldout import HeldoutSet
from lmscan.evidence.site_reader import SiteReader
from lmscan.evidence.trigger_findings import triggers_from_findings
from lmscan.findings import DetectorRun
from lmscan.models.sites import MASK_TEMPLATE
from lmscan.scan.rules import dataclass_from


@dataclass(frozen=True)
class SearchConfig:
    candidates_per_site: int = 32  # vocabulary sweep: lowest-collapse tokens verified per site
    shift_top: int = 10  # vocabulary sweep: highest-shift tokens combined into phrases
    max_loops: int = 6  # PV-miner fuzz loops at most (paper: 1000)
    patience: int = 3  # stop after this many loops without a new PV (paper: 200)
    verify_probes: int = 48  # held-out sentences each trigger is re-measured on
    calibration_probes: int = 150  # clean held-out sentences the threshold is calibrated on
    t_match: float = 0.8  # the paper's sign-match threshold; raised only when clean text needs it
    t_match_margin: float = 0.05  # kept between T_match and the closest clean sentences
    t_match_quantile: float = 0.999  # the clean best-match quantile T_match must clear by the margin
    t_match_max: float = 0.95  # T_match is never raised above this
    coverage: float = 0.9  # a trigger joins a PV when this share of its triggered inputs agree with it (at
    # the verify table's pv_agreement)
    include_unverified: bool = False  # also export soft-prompt PVs no real token reproduces


@dataclass
class RecoveredPV:
    site: str
    pv: np.ndarray  # mean triggered feature (the monitor keeps only its signs)
    template: str | None  # the prompt the input is wrapped in before reading the site
    verified: bool  # real tokens reproduce it
    source: str  # which detector first proposed the trigger (or the soft prompt)
    triggers: list[dict] = field(default_factory=list)  # text, tokens, activation_rate, collapse, placement
    collapse: float | None = None
    activation_rate: float | None = None


@dataclass
class SearchResult:
    pvs: list[RecoveredPV]
    runs: list[DetectorRun]  # what each stage found (for the report / resume)
    calibration: dict
    t_match: float
    timings: dict
    loops_run: int


def site_template(site: str) -> str | None:
    return MASK_TEMPLATE if site == "mask" else None


def search_pvs(prepared, config: SearchConfig, seed: int = 0, progress=None, resume: list[DetectorRun] | None = None,
               catalog: dict | None = None) -> SearchResult:
    """Run the search on a prepared model (lmscan.api.prepare). ``resume``: detector runs of
    an earlier check or search of the same weights; their triggers and PVs are kept and the
    sweep is only re-verified. Every stage runs through the same StageRunner as a scan (error
    capture, OOM fallback); a stage that fails fails the search, since a partial PV file would
    let the monitor miss a backdoor."""
    from lmscan.scan.rules import load_catalog
    from lmscan.scan.stages import StageRunner, verify_config

    loaded, sites, heldout = prepared.loaded, prepared.sites, prepared.heldout
    stages = StageRunner(prepared, catalog if catalog is not None else load_catalog(None), seed, progress)
    stages.runs.extend(resume or [])
    runs = stages.runs
    done = {r.name for r in runs}
    search_settings = {
        **prepared.settings,
        "vocab-sweep": {**prepared.settings.get("vocab-sweep", {}), "candidates_per_site": config.candidates_per_site,
                        "shift_top": config.shift_top},
    }

    def stage(name: str, label: str, **extra) -> DetectorRun:
        run = stages.run(name, settings=search_settings, label=label, **extra)
        if run.status == "error":
            raise LmscanError(f"the PV search's {name} stage failed: {run.note}")
        return run

    if "static" not in done:
        stage("static", "static")
    earlier_sweep = next((r for r in runs if r.name == "vocab-sweep"), None)
    if earlier_sweep is None:
        stage("vocab-sweep", "vocab-sweep")
    elif earlier_sweep.stats.get("ranked"):
        stage("vocab-sweep", "vocab-sweep (resumed)", resume=earlier_sweep)

    earlier_loops = sum(len(r.stats.get("loops", [])) for r in runs if r.name == "pv-mining")
    search_settings["pv-mining"] = {**prepared.settings.get("pv-mining", {}), "stop_at_first": False,
                                    "loops": config.max_loops, "patience": config.patience,
                                    "first_loop": earlier_loops}
    known = _pvs_by_site(runs, sites)
    # every trigger is re-measured below; the loops only verify their own prompts (no earlier triggers)
    stages.seed = seed + earlier_loops
    mining = stage("pv-mining", "pv-mining search", earlier=[], known_pvs=known)
    timings = stages.timings

    verify = verify_config(prepared.settings)
    sweep_max_length = dataclass_from(VocabSweepConfig, search_settings["vocab-sweep"]).max_length
    t = time.perf_counter()
    rng = random.Random(seed)
    verify_texts, calibration_texts = _disjoint(heldout, config.verify_probes, config.calibration_probes, rng)
    candidates = triggers_from_findings(runs, loaded.tokenizer, include_also=True)
    pvs = []
    # One held-out set per input form: [CLS] and pooler come from the same plain forward pass.
    for template in dict.fromkeys(site_template(s) for s in sites):
        form_sites = [s for s in sites if site_template(s) == template]
        pvs.extend(_form_pvs(loaded, form_sites, candidates, verify_texts, sweep_max_length, verify, config, rng))
    if config.include_unverified:
        pvs.extend(_unverified_pvs(runs, pvs, verify.pv_agreement))
    timings["verify"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    calibration, t_match = calibrate(loaded, pvs, calibration_texts, config)
    timings["calibrate"] = round(time.perf_counter() - t, 2)
    loops_run = earlier_loops + len(mining.stats.get("loops", []))
    return SearchResult(pvs, runs, calibration, t_match, timings, loops_run)


def _disjoint(texts: list[str], first: int, second: int, rng) -> tuple[list[str], list[str]]:
    shuffled = rng.sample(texts, len(texts))
    return shuffled[:first], shuffled[first : first + second]


def _pvs_by_site(runs: list[DetectorRun], sites: list[str]) -> dict[str, list[np.ndarray]]:
    found: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    for run in runs:
        for finding in run.findings:
            pv = finding.evidence.get("pv")
            if pv and finding.site in found:
                found[finding.site].append(np.asarray(pv, dtype=np.float32))
    return found


def _form_pvs(loaded, sites, candidates, texts, max_length: int, verify, config: SearchConfig,
              rng) -> list[RecoveredPV]:
    """Measure every candidate trigger at sites read from one input form; one RecoveredPV
    per distinct backdoor and site."""
    reader = SiteReader(loaded.model, loaded.tokenizer, sites, loaded.device, max_length=max_length)
    from lmscan.models.probes import load_opinion_probes

    held = HeldoutSet(reader, texts, rng, opposite_pool=[*texts, *load_opinion_probes()])
    confirmed: dict[str, list] = {s: [] for s in sites}
    for text, token_ids, source in sorted(candidates, key=lambda c: len(c[1])):
        if all(any(_contains(token_ids, c[1]) for c in confirmed[s]) for s in sites):
            continue  # a shorter confirmed trigger inside it: nothing new to learn
        for site, result in held.best_measure(token_ids, sites, verify).items():
            if result["confirmed"]:
                result["features"] = held.triggered(token_ids, result["placement"])[site]
                confirmed[site].append((text, token_ids, source, result))
    groups: list[RecoveredPV] = []
    for site in sites:
        groups.extend(_group_by_pv(loaded.tokenizer, site, confirmed[site], verify.pv_agreement, config))
    return groups


def _group_by_pv(tokenizer, site, confirmed, pv_agreement: float, config: SearchConfig) -> list[RecoveredPV]:
    confirmed.sort(key=lambda c: (len(c[1]), c[3]["collapse"]))
    groups: list[RecoveredPV] = []
    kept: list[tuple[int, ...]] = []
    for text, token_ids, source, result in confirmed:
        if any(_contains(token_ids, shorter) for shorter in kept):
            continue  # a shorter confirmed trigger inside it does the work ("flowers zq" vs "zq")
        kept.append(tuple(token_ids))
        trigger = {"text": text, "tokens": tokenizer.convert_ids_to_tokens(list(token_ids)),
                   "activation_rate": result["activation_rate"], "collapse": result["collapse"],
                   "placement": result["placement"]}
        positive = result["features"] >= 0
        for group in groups:
            # Same backdoor: the group's PV already matches these triggered inputs closely
            # (at 0.9, not just T_match, so that a raised T_match still flags them).
            match = (positive == (group.pv >= 0)[None]).mean(axis=1)
            if (match >= pv_agreement).mean() >= config.coverage:
                group.triggers.append(trigger)
                break
        else:
            groups.append(RecoveredPV(site=site, pv=result["pv"], template=site_template(site), verified=True,
                                      source=source, triggers=[trigger], collapse=result["collapse"],
                                      activation_rate=result["activation_rate"]))
    return groups


def _contains(sequence, part) -> bool:
    n = len(part)
    return n < len(sequence) and any(tuple(sequence[i : i + n]) == tuple(part) for i in range(len(sequence) - n + 1))


def _unverified_pvs(runs, verified: list[RecoveredPV], pv_agreement: float) -> list[RecoveredPV]:
    """Soft-prompt PVs no real token reproduced, unless they match a verified one.

    The miner reads every site from one forward pass, on the prompt template when the
    mask site is among them; the PV keeps that input form."""
    extra = []
    for run in runs:
        if run.name != "pv-mining":
            continue
        template = MASK_TEMPLATE if "mask" in run.sites else None
        for finding in run.findings:
            pv = finding.evidence.get("pv")
            if finding.rule_id != "LMS202" or not pv:
                continue
            pv = np.asarray(pv, dtype=np.float32)
            known = [p for p in verified + extra if p.site == finding.site]
            if any((np.sign(p.pv) == np.sign(pv)).mean() >= pv_agreement for p in known):
                continue
            extra.append(RecoveredPV(site=finding.site, pv=pv, template=template, verified=False, source="pv-mining",
                                     collapse=finding.evidence.get("collapse")))
    return extra


def calibrate(loaded, pvs: list[RecoveredPV], texts: list[str], config: SearchConfig) -> tuple[dict, float]:
    """Best sign match of clean held-out sentences against the PVs, and T_match from it."""
    from lmscan.pv.monitor import FeatureReader, match_ratios, sign_bits

    if not pvs:
        return {"clean_sentences": len(texts)}, config.t_match
    reader = FeatureReader(loaded, [(p.site, p.template) for p in pvs])
    features = reader.features(texts)
    bits = [sign_bits(p.pv) for p in pvs]
    best = match_ratios(features, [(p.site, p.template) for p in pvs], bits).max(axis=1)
    top = float(np.quantile(best, config.t_match_quantile))
    t_match = round(max(config.t_match, min(top + config.t_match_margin, config.t_match_max)), 4)
    triggered = [t["activation_rate"] for p in pvs for t in p.triggers[:1]]
    return {
        "clean_sentences": len(texts),
        "clean_best_match": {"median": round(float(np.median(best)), 4), "p99": round(float(np.quantile(best, 0.99)), 4),
                             "max": round(float(best.max()), 4)},
        "clean_flag_rate": round(float((best > t_match).mean()), 4),
        "min_trigger_activation_rate": min(triggered) if triggered else None,
    }, t_match
