"""Detector `static`: weight checks that need no optimisation, run before anything else.

- embedding rows with an extreme norm (the released NeuBA models multiply each trigger
  token's row by 1e8, so the trigger dominates the embedding sum after LayerNorm);
- NaN / Inf anywhere in the weights.
Static rules can only flag: finding nothing here clears nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lmscan.detectors.base import Detector, ScanContext
from lmscan.findings import DetectorRun, Finding

NAME = "static"


@dataclass(frozen=True)
class StaticConfig:
    # A row whose norm exceeds this many times the median row norm is an outlier. The
    # released NeuBA models scale trigger rows by 1e8; the largest row of the clean
    # all-MiniLM-L6-v2 is 2.5x its median.
    embedding_norm_ratio: float = 50.0
    max_reported: int = 20


def run_static(loaded, config: StaticConfig) -> DetectorRun:
    started = time.perf_counter()
    findings: list[Finding] = []
    tokenizer = loaded.tokenizer
    weight = loaded.model.get_input_embeddings().weight.detach().float()
    norms = weight.norm(dim=1)
    median = float(norms.median())
    ratios = norms / max(median, 1e-12)
    outliers = torch.nonzero(ratios > config.embedding_norm_ratio).flatten().tolist()
    stats = {"embedding_norm_median": median, "embedding_norm_max_ratio": float(ratios.max())}
    if outliers:
        outliers.sort(key=lambda i: -float(ratios[i]))
        shown = outliers[: config.max_reported]
        tokens = tokenizer.convert_ids_to_tokens(shown)
        findings.append(Finding(
            detector=NAME, rule_id="LMS001", score=float(ratios[outliers[0]]),
            threshold=float(config.embedding_norm_ratio),
            message=(f"{len(outliers)} embedding row(s) have a norm over {config.embedding_norm_ratio:g}x the median "
                     f"(largest {float(ratios[outliers[0]]):.3g}x): {', '.join(map(repr, tokens[:8]))}"),
            evidence={"trigger_tokens": tokens, "token_ids": shown,
                      "norm_ratios": [round(float(ratios[i]), 2) for i in shown]},
        ))
    bad = [name for name, p in loaded.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        findings.append(Finding(
            detector=NAME, rule_id="LMS002",
            message=f"{len(bad)} weight tensor(s) contain NaN or Inf: {', '.join(bad[:5])}",
            evidence={"tensors": bad},
        ))
    return DetectorRun(NAME, "ok", time.perf_counter() - started, ["weights"], stats, findings)


class StaticRules(Detector):
    name = NAME
    Config = StaticConfig
    rule_ids = ("LMS001", "LMS002")
    can_clear = False
    sites = ()
    summary = "embedding-row norm outliers and non-finite weights (flags only)"

    def run(self, ctx: ScanContext) -> DetectorRun:
        return run_static(ctx.loaded, ctx.config)
