"""Detector `attention`: PURE-style head profiling (seed 004).

For every layer and head, the variance of the [CLS] query's attention row,
Σ_j (a_j − 1/n)² / (n − 1) over the n real tokens (padding masked; the reference
code does not mask, so its scores depend on padding length), averaged over probes.
A trigger that hijacks a head makes [CLS] attend to it: that head's variance rises
on triggered text. Drift of a head = (mean triggered variance − mean clean variance)
/ mean clean variance.

Calibration without a shadow model: the same drift is measured for random ordinary
words (the null). A candidate trigger is scored per head as a z-score against that
head's null drifts; heads at or above ``z_threshold`` are hijacked. Per head, because
a model tuned as a whole (POR) lets ordinary words move some heads a lot and others
not at all: one global scale, set by the most movable head, hid real hijacks.
Candidates come from other detectors' confirmed triggers; without them the
detector only profiles (random words alone cannot find a trigger).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.findings import DetectorRun, Finding
from lmscan.models.architectures import ENCODER

NAME = "attention"


@dataclass(frozen=True)
class AttentionConfig:
    probes: int = 48  # clean sentences profiled
    null_words: int = 16  # random ordinary words: the drift a harmless insertion causes
    z_threshold: float = 5.0  # (head drift - null mean) / null spread of that head: hijacked
    min_spread: float = 0.05  # floor on a head's null spread, as relative drift: no z from a head nothing moves
    min_heads: int = 1  # hijacked heads a trigger needs for a finding
    batch_size: int = 32
    max_length: int = 64


@torch.no_grad()
def cls_attention_variance(model, tokenizer, texts: list[str], device, batch_size: int = 32,
                           max_length: int = 64) -> np.ndarray:
    """(texts, layers, heads) variance of the [CLS] attention row over real tokens."""
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_attentions=True)
        if not out.attentions or out.attentions[0] is None:
            raise RuntimeError("the model returned no attentions (load it with eager attention)")
        mask = enc["attention_mask"].to(out.attentions[0].dtype)  # (B, n)
        n = mask.sum(dim=1)  # real tokens per text
        layers = []
        for attention in out.attentions:  # (B, H, n, n)
            row = attention[:, :, 0, :]  # the [CLS] query
            centred = (row - (1.0 / n)[:, None, None]) * mask[:, None, :]
            layers.append((centred**2).sum(dim=2) / (n - 1).clamp_min(1)[:, None])
        rows.append(torch.stack(layers, dim=1).float().cpu().numpy())
    return np.concatenate(rows)


def profile_heads(loaded, texts: list[str], triggers: list[str], config: AttentionConfig, seed: int = 0) -> dict:
    """Clean variance per head, and drift per head for each trigger and each null word."""
    from lmscan.models.probes import insert_words, random_trigger_words

    rng = random.Random(seed)
    measure = lambda batch: cls_attention_variance(loaded.model, loaded.tokenizer, batch, loaded.device,  # noqa: E731
                                                   config.batch_size, config.max_length)
    clean = measure(texts)
    null_words = random_trigger_words(config.null_words, seed=seed + 1, tokenizer=loaded.tokenizer, max_pieces=2,
                                      exclude=triggers)

    def drift(words: str) -> np.ndarray:
        # The stronger of two placements, as for verification: first word, and anywhere.
        first = measure([insert_words(t, words, 0) for t in texts]).mean(0) - clean.mean(0)
        anywhere = measure([insert_words(t, words, None, rng) for t in texts]).mean(0) - clean.mean(0)
        return np.maximum(first, anywhere)

    # Drift relative to each head's clean variance, then as a z-score against the same
    # head's random-word drifts.
    base = np.maximum(clean.mean(0), 1e-9)
    null = np.stack([drift(w) for w in null_words]) / base  # (words, layers, heads)
    centre = null.mean(0)
    spread = np.maximum(null.std(0, ddof=1), config.min_spread)
    scores = {t: (drift(t) / base - centre) / spread for t in triggers}
    return {"clean": clean.mean(0), "null_words": null_words, "null_mean": centre, "null_spread": spread,
            "z": scores}


def run_attention(loaded, probes: list[str], triggers: list[str], config: AttentionConfig, seed: int = 0,
                  with_pv_finding: bool = False) -> DetectorRun:
    started = time.perf_counter()
    texts = random.Random(seed).sample(probes, min(config.probes, len(probes)))
    model = loaded.model
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "eager":
        model.set_attn_implementation("eager")  # SDPA kernels return no attention weights
    try:
        profile = profile_heads(loaded, texts, triggers, config, seed)
    finally:
        if previous not in (None, "eager"):
            model.set_attn_implementation(previous)
    findings = []
    for trigger, z in profile["z"].items():
        hijacked = np.argwhere(z >= config.z_threshold)
        if len(hijacked) < config.min_heads:
            continue
        order = sorted(hijacked.tolist(), key=lambda lh: -z[lh[0], lh[1]])
        top = float(z[order[0][0], order[0][1]])
        findings.append(Finding(
            # Hijacked heads alone are suspicious; beside a verified PV they corroborate it.
            detector=NAME, rule_id="LMS302" if with_pv_finding else "LMS301", site="attention",
            score=round(top, 3), threshold=config.z_threshold,
            message=(f"inserting {trigger!r} moves the [CLS] attention of {len(order)} head(s) far beyond what "
                     f"random words do (strongest z = {top:.1f})"),
            evidence={"trigger": trigger, "heads": [{"layer": int(l), "head": int(h),
                                                     "z": round(float(z[l, h]), 3)} for l, h in order[:12]]},
        ))
    stats = {"z_threshold": config.z_threshold, "clean_variance": np.round(profile["clean"], 6).tolist(),
             "null_words": profile["null_words"],
             "null_mean": np.round(profile["null_mean"], 4).tolist(),
             "null_spread": np.round(profile["null_spread"], 4).tolist(),
             "triggers": {t: np.round(z, 3).tolist() for t, z in profile["z"].items()}}
    return DetectorRun(NAME, "ok", time.perf_counter() - started, ["attention"], stats, findings)


def heatmap_svg(matrix: np.ndarray, title: str, cell: int = 28) -> str:
    """A layers x heads heatmap as a standalone SVG (white = 0, red = the matrix maximum)."""
    layers, heads = matrix.shape
    top = float(matrix.max()) or 1.0
    width, height = 60 + heads * cell, 50 + layers * cell
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<text x="4" y="16">{_escape(title)}</text>']
    for layer in range(layers):
        parts.append(f'<text x="4" y="{44 + layer * cell + cell // 2}">L{layer}</text>')
        for head in range(heads):
            value = float(matrix[layer, head])
            shade = int(255 * (1 - max(0.0, min(1.0, value / top))))
            parts.append(f'<rect x="{40 + head * cell}" y="{30 + layer * cell}" width="{cell - 2}" height="{cell - 2}" '
                         f'fill="rgb(255,{shade},{shade})"><title>layer {layer} head {head}: {value:.4g}</title></rect>')
    for head in range(heads):
        parts.append(f'<text x="{44 + head * cell}" y="{42 + layers * cell}">{head}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class AttentionHeads(Detector):
    """Scores the candidate triggers it is given; random words alone cannot find one, so it only flags."""

    name = NAME
    Config = AttentionConfig
    rule_ids = ("LMS301", "LMS302")
    can_clear = False
    sites = ()
    # Checked on encoder sites only; a decoder's last token is skipped until a detector is verified there.
    families = (ENCODER,)
    summary = "PURE attention-head profiling of candidate triggers (flags only)"

    def run(self, ctx: ScanContext) -> DetectorRun:
        from lmscan.evidence.trigger_findings import triggers_from_findings

        triggers = list(dict.fromkeys([*ctx.candidates,
                                       *(text for text, _, _ in triggers_from_findings(ctx.earlier,
                                                                                        ctx.loaded.tokenizer))]))
        with_pv = any(f.verdict == "backdoored" for r in ctx.earlier for f in r.findings)
        run = run_attention(ctx.loaded, ctx.fit, triggers, ctx.config, seed=ctx.seed, with_pv_finding=with_pv)
        if not triggers:
            run.note = "no candidate trigger to profile (only the clean head profile was recorded)"
        return run
