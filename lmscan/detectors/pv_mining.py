"""Detector `pv-mining`: LMSanitizer-style predefined-vector mining with a soft prompt.

For each fuzz loop (seed s) a soft prompt of ``prompt_length`` vectors, initialised
from vocabulary rows 70*s, 70*s+10, ..., is written into the embedding sequence of
clean sentences at a random word position, and optimised with the model frozen:
  L_D   = -MSE(F_prompted, F_clean)         distance from the sentence's clean feature
  L_div = -mean_units Entropy_batch(softmax)  outputs that stop depending on the input
  L_P   = -lambda_P * max_i MSE(F, PV_i)    push away from PVs already found (search)
Adam, adaptive learning rate (x100 while every gradient stays below T_grad), and a
loop is abandoned when its distance has not grown past the model's own clean spread
by ``abandon_after`` steps.

Acceptance is calibrated on the model itself instead of the paper's absolute
thresholds (which call the unmodified MiniLM backdoored): the prompted outputs of
held-out sentences must collapse (pairwise MSE / the same sentences' clean pairwise
MSE <= ``collapse_threshold``) and move far (distance >= ``distance_ratio`` x the
clean spread). A continuous prompt can do that on a clean model too, so a candidate
becomes a finding only when real tokens reproduce it: the prompt's nearest
vocabulary tokens (and triggers confirmed by other detectors) are inserted into
held-out sentences and must drive them onto a vector that agrees in sign >= 0.9
with the mined PV. Unverified candidates are reported as info.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.errors import InputError
from lmscan.evidence.heldout import verify_token_sequences
from lmscan.evidence.site_reader import SiteReader, pairwise_mse, word_starts
from lmscan.evidence.soft_prompt import batch_entropy, prompted_embeds
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.findings import DetectorRun, Finding
from lmscan.models.architectures import ENCODER
from lmscan.models.sites import SITES

NAME = "pv-mining"


@dataclass(frozen=True)
class PVMiningConfig:
    prompt_length: int = 7
    loops: int = 3  # fuzz loops (detection stops at the first verified PV); fast only runs them when asked
    steps_per_loop: int = 30
    batch_size: int = 32
    max_length: int = 48
    max_insert_position: int = 32
    learning_rate: float = 2e-4
    lr_boost: float = 100.0  # factor while gradients are tiny (adaptive learning rate)
    grad_threshold: float = 5e-3
    lambda_distance: float = 1.0
    lambda_diversity: float = 1.0
    lambda_path: float = 0.5
    abandon_after: int = 15  # steps; abandon a loop whose distance stays below the clean spread
    collapse_threshold: float = 0.25  # a prompt is a PV candidate when held-out prompted outputs collapse this far ...
    distance_ratio: float = 1.0  # ... and move at least this many clean spreads
    # Legitimate prompt range: per-dimension quantiles of the embedding rows, widened by a margin
    # (robust to a handful of x1e8 rows, unlike the paper's global max/min).
    prompt_range_quantile: float = 0.001
    prompt_range_margin: float = 1.2
    prompt_in_range_share: float = 0.9  # share of prompt values that must lie in that range
    nearest_tokens: int = 4  # vocabulary neighbours tried per prompt vector
    stop_at_first: bool = True  # detection mode; search mode keeps going
    patience: int = 0  # search mode: stop after this many loops without a new PV (0: run every loop)
    first_loop: int = 0  # seed of the first loop (a resumed search continues where it stopped)
    # Schedule knobs the `reference` engine (rules/engines.toml) sets to the paper's values:
    epochs: int = 0  # >0: each loop is this many shuffled passes over the fit sentences (steps_per_loop ignored)
    fit_sentences: int = 0  # >0: train on this many sentences (the profile's fit set, topped up from spares)
    pad_to_max_length: bool = False  # pad every batch to max_length instead of its longest row


def run_pv_mining(loaded, sites: list[str], probes: list[str], heldout: list[str], config: PVMiningConfig,
                  verify: VerifyConfig, seed: int = 0, progress=None, known_triggers: list[tuple] = (),
                  known_pvs: dict[str, list[np.ndarray]] | None = None) -> DetectorRun:
    """Run the fuzz loops. ``known_pvs`` (per site) are PVs found before, e.g. by the
    vocabulary sweep or a previous search: the path loss steers away from them and a
    candidate that agrees with one of them is not new."""
    started = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    reader = SiteReader(model, tokenizer, sites, loaded.device, max_length=config.max_length)
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight.detach()
    q = config.prompt_range_quantile
    low = torch.quantile(weight.float(), q, dim=0) * config.prompt_range_margin
    high = torch.quantile(weight.float(), 1.0 - q, dim=0) * config.prompt_range_margin
    rng = random.Random(seed)
    rows = [reader.encode(t) for t in probes]
    clean = reader.features(rows)
    spread = {s: pairwise_mse(clean[s]) or 1e-12 for s in sites}
    pad_id = tokenizer.pad_token_id or 0

    found: dict[str, list[np.ndarray]] = {s: list((known_pvs or {}).get(s, [])) for s in sites}
    loops_log, findings = [], []
    steps_per_loop = config.epochs * math.ceil(len(rows) / config.batch_size) if config.epochs else config.steps_per_loop
    total_steps = config.loops * steps_per_loop
    pad_to = config.max_length if config.pad_to_max_length else 0
    since_new = 0
    for index in range(config.loops):
        if config.patience and since_new >= config.patience:
            break
        since_new += 1
        loop = config.first_loop + index
        site = sites[loop % len(sites)]
        init_rows = [min(70 * loop + 10 * j, weight.shape[0] - 1) for j in range(config.prompt_length)]
        prompt = weight[init_rows].clone().float().requires_grad_(True)
        optimizer = torch.optim.Adam([prompt], lr=config.learning_rate * config.lr_boost)
        boosted, distance_log, abandoned = True, [], False
        order: list[int] = []
        for step in range(steps_per_loop):
            if config.epochs:  # full passes in shuffled order, the last batch of a pass may be short
                if not order:
                    order = rng.sample(range(len(rows)), len(rows))
                batch, order = order[: config.batch_size], order[config.batch_size :]
            else:
                batch = rng.sample(range(len(rows)), min(config.batch_size, len(rows)))
            batch_rows = [rows[i] for i in batch]
            positions = [rng.choice([p for p in word_starts(tokenizer, r) if p <= config.max_insert_position] or [1])
                         for r in batch_rows]
            embeds, attention, ids = prompted_embeds(embeddings, batch_rows, prompt, positions, pad_id, pad_to)
            out = model(inputs_embeds=embeds, attention_mask=attention)
            feature = reader.read(out, site, ids, attention)
            target = torch.as_tensor(clean[site][batch], device=feature.device)
            distance = torch.nn.functional.mse_loss(feature, target)
            diversity = batch_entropy(feature)  # max ln(len(batch)): a short last batch has a lower ceiling
            loss = -config.lambda_distance * distance - config.lambda_diversity * diversity
            if found[site]:
                stacked = torch.as_tensor(np.stack(found[site]), device=feature.device)
                with torch.no_grad():
                    nearest = int(((feature.mean(0, keepdim=True) - stacked) ** 2).mean(1).argmin())
                loss = loss - config.lambda_path * torch.nn.functional.mse_loss(feature.mean(0), stacked[nearest])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if boosted and float(prompt.grad.abs().max()) > config.grad_threshold:
                boosted = False  # gradients got large: drop to the base rate for the rest of the loop
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate
            optimizer.step()
            distance_log.append(float(distance.detach()) / spread[site])
            if progress is not None:
                progress(index * steps_per_loop + step + 1, total_steps, float(loss.detach()),
                         sum(len(v) for v in found.values()))
            if step + 1 == config.abandon_after and np.mean(distance_log[-5:]) < config.distance_ratio:
                abandoned = True
                break
        in_range = bool(((prompt.detach() >= low) & (prompt.detach() <= high)).float().mean()
                        >= config.prompt_in_range_share)
        entry = {"loop": loop, "site": site, "steps": step + 1, "abandoned": abandoned,
                 "distance_ratio": round(distance_log[-1], 4), "diversity_gap": round(math.log(len(batch)) - float(diversity.detach()), 4),
                 "prompt_in_range": in_range}
        loops_log.append(entry)
        if abandoned:
            continue
        candidate = _evaluate_prompt(reader, embeddings, prompt.detach(), heldout, site, verify.probes, rng, pad_id)
        entry.update({k: v for k, v in candidate.items() if k != "pv"})
        if candidate["collapse"] > config.collapse_threshold or candidate["distance_ratio"] < config.distance_ratio:
            continue
        pv_sign = np.sign(candidate["pv"])
        if any((np.sign(known) == pv_sign).mean() >= verify.pv_agreement for known in found[site]):
            entry["duplicate"] = True
            continue
        found[site].append(candidate["pv"])
        since_new = 0
        neighbours = _nearest_tokens(weight, prompt.detach(), tokenizer, config.nearest_tokens)
        sequences = [(tokenizer.decode([t]), (t,)) for t in neighbours] + [(text, ids) for text, ids, *_ in known_triggers]
        verified = verify_token_sequences(reader, tokenizer, sequences, heldout, site, verify, rng)
        match = [v for v in verified if v["confirmed"] and (np.sign(v["pv"]) == pv_sign).mean() >= verify.pv_agreement]
        entry["verified_tokens"] = [v["text"] for v in match][:5]
        if match:
            best = match[0]
            findings.append(Finding(
                detector=NAME, rule_id="LMS201", site=site, score=candidate["collapse"],
                threshold=config.collapse_threshold,
                message=(f"fuzz loop {loop} found a {site} vector that real tokens reproduce: {best['text']!r} drives "
                         f"{best['activation_rate']:.0%} of held-out sentences onto it"),
                evidence={"pv": [round(float(x), 5) for x in candidate["pv"]], "loop": loop,
                          "collapse": candidate["collapse"], "distance_ratio": candidate["distance_ratio"],
                          "trigger": best["text"], "trigger_tokens": best["tokens"],
                          "activation_rate": best["activation_rate"],
                          "pv_sign_agreement": round(float((np.sign(best["pv"]) == pv_sign).mean()), 4),
                          "nearest_tokens": [tokenizer.decode([t]) for t in neighbours[:10]]},
            ))
            if config.stop_at_first:
                break
        else:
            findings.append(Finding(
                detector=NAME, rule_id="LMS202", site=site, score=candidate["collapse"],
                threshold=config.collapse_threshold,
                message=(f"fuzz loop {loop}: a soft prompt collapses {site} outputs (collapse "
                         f"{candidate['collapse']:.3f}) but no real token reproduces it; clean models show this too"),
                evidence={"loop": loop, "collapse": candidate["collapse"],
                          "pv": [round(float(x), 5) for x in candidate["pv"]],
                          "nearest_tokens": [tokenizer.decode([t]) for t in neighbours[:10]]},
            ))
    stats = {"loops": loops_log, "clean_spread": {s: round(v, 6) for s, v in spread.items()},
             "fit_sentences": len(rows), "steps_per_loop": steps_per_loop,
             "steps_run": sum(entry["steps"] for entry in loops_log)}
    # A site is searched to budget when one of its loops ran all its steps; an abandoned
    # loop (the prompt never moved past the clean spread) clears nothing.
    cleared = [s for s in sites if any(e["site"] == s and not e["abandoned"] for e in loops_log)]
    reasons = [f"no loop {'ran' if not any(e['site'] == s for e in loops_log) else 'converged'} at {s}"
               for s in sites if s not in cleared]
    return DetectorRun(NAME, "ok", time.perf_counter() - started, list(sites), stats, findings,
                       cleared_sites=cleared, uncleared_reason="; ".join(reasons))


@torch.no_grad()
def _evaluate_prompt(reader, embeddings, prompt, heldout, site, probes: int, rng, pad_id) -> dict:
    texts = rng.sample(heldout, min(probes, len(heldout)))
    rows = [reader.encode(t) for t in texts]
    positions = [rng.choice(word_starts(reader.tokenizer, r)) for r in rows]
    embeds, attention, ids = prompted_embeds(embeddings, rows, prompt, positions, pad_id)
    out = reader.model(inputs_embeds=embeds, attention_mask=attention)
    prompted = reader.read(out, site, ids, attention)
    prompted = prompted.float().cpu().numpy()
    clean = reader.features(rows)[site]
    spread = pairwise_mse(clean) or 1e-12
    return {
        "collapse": round(pairwise_mse(prompted) / spread, 4),
        "distance_ratio": round(float(((prompted - clean) ** 2).mean()) / spread, 4),
        "pv": prompted.mean(axis=0),
    }


def _nearest_tokens(weight: torch.Tensor, prompt: torch.Tensor, tokenizer, per_vector: int) -> list[int]:
    """Vocabulary rows closest (cosine) to each prompt vector, specials excluded, in prompt order."""
    normed = torch.nn.functional.normalize(weight.float(), dim=1)
    sims = torch.nn.functional.normalize(prompt.float(), dim=1) @ normed.T
    special = set(tokenizer.all_special_ids)
    chosen: list[int] = []
    for row in sims:
        taken = 0
        for index in torch.argsort(row, descending=True).tolist():
            if index in special or index in chosen or tokenizer.convert_ids_to_tokens(index).startswith("[unused"):
                continue
            chosen.append(index)
            taken += 1
            if taken == per_vector:
                break
    return chosen


class PVMining(Detector):
    name = NAME
    Config = PVMiningConfig
    rule_ids = ("LMS201", "LMS202")
    can_clear = True
    sites = SITES
    # Checked on encoder sites only; a decoder's last token is skipped until a detector is verified there.
    families = (ENCODER,)
    summary = "LMSanitizer soft-prompt PV mining; mined vectors count only when real tokens reproduce them"

    def run(self, ctx: ScanContext) -> DetectorRun:
        from lmscan.evidence.trigger_findings import triggers_from_findings

        config, fit = ctx.config, ctx.fit
        if config.fit_sentences:
            available = len(ctx.fit) + len(ctx.spare)
            if config.fit_sentences > available:
                raise InputError(f"pv-mining wants {config.fit_sentences} fit sentences but only {available} probe "
                                 "sentences are left after the held-out set")
            fit = (ctx.fit + ctx.spare)[: config.fit_sentences]
        return run_pv_mining(ctx.loaded, ctx.sites, fit, ctx.heldout, config, ctx.verify, seed=ctx.seed,
                             progress=lambda done, total, _loss=0.0, found=0: ctx.progress(
                                 done, total, f"{found} PV(s) so far" if found else ""),
                             known_triggers=triggers_from_findings(ctx.earlier, ctx.loaded.tokenizer),
                             known_pvs=ctx.known_pvs)
