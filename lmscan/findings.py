"""The data every detector returns and every reporter reads.

Detectors never print; they return a DetectorRun with Findings. The verdict is
aggregated from findings (lmscan/report/verdict.py), and reporters render a Report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEVERITIES = ("info", "low", "medium", "high", "critical")
VERDICTS = ("clean", "suspicious", "backdoored", "not-assessed")
FINDING_VERDICTS = ("backdoored", "suspicious", "info")  # what one finding can say


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass
class Finding:
    detector: str  # "static", "vocab-sweep", "pv-mining", ...
    rule_id: str  # stable id, e.g. "LMS101"; SARIF ruleId
    message: str  # one sentence a user can act on
    # title, severity and verdict come from rules/rule_catalog.toml (filled in by the
    # scan after the detector ran), so a user's --rules can re-rate a rule.
    title: str = ""  # short rule name, e.g. "trigger-token-collapses-features"
    severity: str = ""  # one of SEVERITIES
    verdict: str = ""  # "backdoored" (evidence of a backdoor), "suspicious" or "info"
    site: str | None = None
    score: float | None = None
    threshold: float | None = None
    evidence: dict = field(default_factory=dict)  # JSON-serialisable: triggers, PVs, statistics


@dataclass
class DetectorRun:
    name: str
    status: str  # "ok" | "skipped" | "error"
    seconds: float = 0.0
    sites: list[str] = field(default_factory=list)  # what the detector looked at
    stats: dict = field(default_factory=dict)  # calibration numbers, per-site statistics
    findings: list[Finding] = field(default_factory=list)
    note: str = ""  # why skipped / what failed
    # Sites this run searched to its budget, so that finding nothing there means
    # something. Only detectors that can clear a model fill it (static rules and
    # baselines only flag); a clean verdict needs every scanned site in some run's list.
    cleared_sites: list[str] = field(default_factory=list)
    uncleared_reason: str = ""
    can_clear: bool = False  # the detector's declaration (lmscan.detectors.base.Detector.can_clear)  # why a site it looked at is not cleared (e.g. "no loop converged at pooler")


@dataclass
class Report:
    schema_version: str
    tool: dict  # name, version, torch, transformers, python
    model: dict  # ref, kind, repo_id, revision, commit, local_dir, weight_sha256, model_sha256, architecture, sites
    config: dict  # the full resolved scan configuration (profile, detectors, thresholds)
    seed: int
    device: str
    detectors: list[DetectorRun]
    verdict: str  # one of VERDICTS
    severity: str  # highest finding severity, "info" when none
    timings: dict  # seconds: load, per detector, total
    allowlisted: str | None = None  # reason, when the weights' sha256 is allowlisted
    started_at: str = ""
    from_cache: bool = False
    reason: str = ""  # one line: why this verdict (always set for not-assessed)
    incomplete: bool = False  # interrupted: the detectors after the interruption did not run
    # Sites the model should have been scanned at but was not: site -> why (e.g. the
    # embedding of a sentence-transformers folder whose pooling config is unreadable).
    skipped_sites: dict = field(default_factory=dict)
