"""The data every detector returns and every reporter reads.

Detectors never print; they return a DetectorRun with Findings. The verdict is
aggregated from findings (lmscan/report/verdict.py), and reporters render a Report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEVERITIES = ("info", "low", "medium", "high", "critical")
VERDICTS = ("clean", "suspicious", "backdoored", "not-assessed")


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass
class Finding:
    detector: str  # "static", "vocab-sweep", "pv-mining", ...
    rule_id: str  # stable id, e.g. "LMS101"; SARIF ruleId
    title: str  # short rule name, e.g. "trigger-collapses-features"
    severity: str  # one of SEVERITIES
    verdict: str  # "backdoored" (evidence of a backdoor), "suspicious" or "info"
    message: str  # one sentence a user can act on
    site: str | None = None
    score: float | None = None
    threshold: float | None = None
    evidence: dict = field(default_factory=dict)  # JSON-serialisable: triggers, PVs, statistics


@dataclass
class DetectorRun:
    name: str
    status: str  # "ok" | "skipped" | "error"
    seconds: float = 0.0
    sites: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # calibration numbers, per-site statistics
    findings: list[Finding] = field(default_factory=list)
    note: str = ""  # why skipped / what failed


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
