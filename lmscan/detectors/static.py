"""Detector `static`: weight checks that need no optimisation, run before anything else.

- embedding rows with an extreme norm (the released NeuBA models multiply each trigger
  token's row by 1e8, so the trigger dominates the embedding sum after LayerNorm);
- NaN / Inf anywhere in the weights.
Thresholds come from rules/static.toml.
"""

from __future__ import annotations

import time

import torch

from lmscan.findings import DetectorRun, Finding

NAME = "static"


def run_static(loaded, rules: dict) -> DetectorRun:
    started = time.perf_counter()
    findings: list[Finding] = []
    tokenizer = loaded.tokenizer
    weight = loaded.model.get_input_embeddings().weight.detach().float()
    norms = weight.norm(dim=1)
    median = float(norms.median())
    rule = rules["embedding_norm"]
    ratios = norms / max(median, 1e-12)
    outliers = torch.nonzero(ratios > rule["ratio"]).flatten().tolist()
    stats = {"embedding_norm_median": median, "embedding_norm_max_ratio": float(ratios.max())}
    if outliers:
        outliers.sort(key=lambda i: -float(ratios[i]))
        shown = outliers[: rule["max_reported"]]
        tokens = tokenizer.convert_ids_to_tokens(shown)
        findings.append(Finding(
            detector=NAME, rule_id="LMS001", title="embedding-row-norm-outlier", severity=rule["severity"],
            verdict=rule["verdict"], score=float(ratios[outliers[0]]), threshold=float(rule["ratio"]),
            message=(f"{len(outliers)} embedding row(s) have a norm over {rule['ratio']:g}x the median "
                     f"(largest {float(ratios[outliers[0]]):.3g}x): {', '.join(map(repr, tokens[:8]))}"),
            evidence={"trigger_tokens": tokens, "token_ids": shown,
                      "norm_ratios": [round(float(ratios[i]), 2) for i in shown]},
        ))
    bad = [name for name, p in loaded.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        rule = rules["non_finite"]
        findings.append(Finding(
            detector=NAME, rule_id="LMS002", title="non-finite-weights", severity=rule["severity"],
            verdict=rule["verdict"], message=f"{len(bad)} weight tensor(s) contain NaN or Inf: {', '.join(bad[:5])}",
            evidence={"tensors": bad},
        ))
    return DetectorRun(NAME, "ok", time.perf_counter() - started, ["weights"], stats, findings)
