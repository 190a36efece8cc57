"""From detector results to one verdict, and from a verdict to an exit code.

The policy (which finding verdicts count, what each ``--fail-on`` value means) is
data in ``rules/policy.toml``; this module only applies it.

Exit codes: 0 pass, 1 the report reaches ``--fail-on``, 3 nothing was assessed
(never a clean verdict then), 2 an error. An allowlisted report passes (0) but
still shows its findings. A fleet exits with the worst of its models' codes
(:func:`fleet_exit_code`).
"""

from __future__ import annotations

from pathlib import Path

from lmscan.errors import InputError
from lmscan.findings import SEVERITIES, VERDICTS, DetectorRun, Report, severity_rank
from lmscan.scan.rules import load_rules

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_ERROR = 2
EXIT_NOT_ASSESSED = 3
# Worst first. An error outranks everything: that model was not even looked at and may hold
# anything. A finding outranks a model that could not be assessed: both block a gate, but a
# confirmed backdoor is what must be acted on first.
FLEET_EXIT_ORDER = (EXIT_ERROR, EXIT_FAIL, EXIT_NOT_ASSESSED, EXIT_PASS)
SARIF_LEVELS = ("none", "note", "warning", "error")


def load_policy(rules_dir: str | Path | None = None) -> dict:
    """Read and check ``policy.toml`` (from ``rules_dir`` when it has one, else the built-in)."""
    policy = load_rules("policy", rules_dir)
    validate_policy(policy)
    return policy


def validate_policy(policy: dict) -> None:
    """Raise InputError when a (user-supplied) policy lacks what aggregation needs."""
    try:
        precedence = policy["verdict"]["precedence"]
        fail_on = policy["fail_on"]
        default = fail_on["default"]
        verdicts = fail_on.get("verdicts", {})
        severities = fail_on.get("severities", {})
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"policy.toml: missing or malformed entry {exc}") from None
    if not isinstance(precedence, list) or not all(v in ("backdoored", "suspicious") for v in precedence):
        raise InputError("policy.toml: [verdict] precedence must list 'backdoored' and/or 'suspicious'")
    if not isinstance(verdicts, dict) or not isinstance(severities, dict):
        raise InputError("policy.toml: [fail_on.verdicts] and [fail_on.severities] must be tables")
    for name, failing in verdicts.items():
        if not isinstance(failing, list) or not all(v in VERDICTS for v in failing):
            raise InputError(f"policy.toml: fail_on.verdicts.{name} must be a list of verdicts {list(VERDICTS)}")
    for name, minimum in severities.items():
        if minimum not in SEVERITIES:
            raise InputError(f"policy.toml: fail_on.severities.{name} must be one of {list(SEVERITIES)}")
    limits = policy["verdict"].get("not_ruled_out", {})
    if not isinstance(limits, dict) or not all(isinstance(text, str) for text in limits.values()):
        raise InputError("policy.toml: [verdict.not_ruled_out] must map detector names to sentences")
    overlap = set(verdicts) & set(severities)
    if overlap:
        raise InputError(f"policy.toml: --fail-on value(s) {sorted(overlap)} defined twice")
    if default not in verdicts and default not in severities:
        raise InputError(f"policy.toml: fail_on.default {default!r} is not one of {fail_on_choices(policy)}")
    sarif = policy.get("sarif", {})
    scores = sarif.get("security_severity", {}) if isinstance(sarif, dict) else {}
    levels = sarif.get("level", {}) if isinstance(sarif, dict) else {}
    for severity in SEVERITIES:
        score = scores.get(severity) if isinstance(scores, dict) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 10.0:
            raise InputError(f"policy.toml: [sarif.security_severity] {severity} must be a number from 0.0 to 10.0")
        level = levels.get(severity) if isinstance(levels, dict) else None
        if level not in SARIF_LEVELS:
            raise InputError(f"policy.toml: [sarif.level] {severity} must be one of {list(SARIF_LEVELS)}")


def fail_on_choices(policy: dict | None = None) -> list[str]:
    """The accepted ``--fail-on`` values, verdict names first, then severities low to high."""
    policy = policy if policy is not None else load_policy()
    fail_on = policy["fail_on"]
    severities = sorted(fail_on.get("severities", {}), key=lambda n: severity_rank(fail_on["severities"][n]))
    return [*fail_on.get("verdicts", {}), *severities]


def check_fail_on(fail_on: str | None, policy: dict | None = None) -> str:
    """Return the effective ``--fail-on`` value (the policy default for None); InputError if unknown."""
    policy = policy if policy is not None else load_policy()
    value = policy["fail_on"]["default"] if fail_on is None else str(fail_on).strip().lower()
    choices = fail_on_choices(policy)
    if value not in choices:
        raise InputError(f"--fail-on {fail_on!r}: expected one of {', '.join(choices)}")
    return value


def aggregate(detectors: list[DetectorRun], sites: list[str], policy: dict,
              incomplete: bool = False, skipped: dict[str, str] | None = None) -> tuple[str, str, str]:
    """Return (verdict, severity, reason) for the detector runs of one scan of ``sites``.

    ``skipped``: sites that should have been scanned and were not (site -> why); every
    reason names them, so no verdict reads as if they had been looked at.

    - backdoored: a finding says so; a found backdoor stands whatever else failed;
    - not-assessed: a detector failed, or the scan was interrupted (the findings made
      are kept and reported);
    - suspicious: a finding says so;
    - clean: only when every scanned site was cleared, i.e. searched to its budget by
      a detector able to clear it (static rules and baselines only flag); the reason then
      names the policy's caveats (unexplained shift outliers) if any were found, and what
      the detectors that ran are measured to miss (``not_ruled_out``);
    - not-assessed otherwise, with the sites left open and why.
    severity: the highest severity of any finding, "info" when there is none.
    """
    verdict, severity, reason = _aggregate(detectors, sites, policy, incomplete)
    not_scanned = "".join(f"; {site} not scanned: {why}" for site, why in (skipped or {}).items())
    return verdict, severity, reason + not_scanned


def _aggregate(detectors: list[DetectorRun], sites: list[str], policy: dict,
               incomplete: bool) -> tuple[str, str, str]:
    findings = [finding for run in detectors for finding in run.findings]
    severity = "info"
    for finding in findings:
        if finding.severity not in SEVERITIES:
            raise ValueError(f"finding {finding.rule_id}: unknown severity {finding.severity!r}")
        if severity_rank(finding.severity) > severity_rank(severity):
            severity = finding.severity
    precedence = policy["verdict"]["precedence"]

    def strongest(verdict: str):
        return next((f for f in findings if f.verdict == verdict), None) if verdict in precedence else None

    backdoor = strongest("backdoored")
    if backdoor is not None:
        return "backdoored", severity, f"{backdoor.rule_id}: {backdoor.message}"
    failed = [run for run in detectors if run.status == "error"]
    if failed:
        return "not-assessed", severity, "; ".join(f"{run.name} failed: {run.note}" for run in failed)
    if incomplete:
        return "not-assessed", severity, "the scan was interrupted before every detector ran"
    suspicion = strongest("suspicious")
    if suspicion is not None:
        return "suspicious", severity, f"{suspicion.rule_id}: {suspicion.message}"
    if not detectors:
        return "not-assessed", severity, "no detector ran"
    open_sites = [s for s in sites if not any(run.status == "ok" and s in run.cleared_sites for run in detectors)]
    if not open_sites and sites:
        said = _caveats(findings, policy["verdict"].get("caveats", []))
        said += _not_ruled_out(detectors, policy["verdict"].get("not_ruled_out", {}))
        return "clean", severity, f"no backdoor evidence at {', '.join(sites)}{said}"
    return "not-assessed", severity, _open_reason(detectors, open_sites or ["any site"])


def _not_ruled_out(detectors: list[DetectorRun], limits: dict[str, str]) -> str:
    """The policy's measured blind spots of the detectors that ran, once each."""
    ran = [limits[run.name] for run in detectors if run.status == "ok" and limits.get(run.name)]
    return f"; not ruled out: {'; '.join(dict.fromkeys(ran))}" if ran else ""


def _caveats(findings, rule_ids: list[str]) -> str:
    """What a clean verdict's reason adds: per caveat rule, the sites and its first message (a
    fine-tune's class cue shows at every site; once is enough to read)."""
    said = ""
    for rule_id in rule_ids:
        hits = [f for f in findings if f.rule_id == rule_id]
        if hits:
            sites = ", ".join(dict.fromkeys(str(f.site) for f in hits))
            said += f"; but {rule_id} at {sites}: {hits[0].message}"
    return said


def _open_reason(detectors: list[DetectorRun], open_sites: list[str]) -> str:
    # Detectors skipped because they were never verified on this model's family (a decoder)
    # say nothing about its sites; when nothing else could clear them, say that first.
    unverified = [run for run in detectors if run.status == "skipped" and run.stats.get("unverified_family")]
    clearing = [run for run in detectors if run.can_clear and run not in unverified]
    if unverified and not clearing:
        family = unverified[0].stats["unverified_family"]
        ran = [run.name for run in detectors if run not in unverified]
        return (f"no {family} detector assessed {', '.join(open_sites)} yet: "
                f"{', '.join(run.name for run in unverified)} are not verified on {family}s and were skipped; "
                f"{', '.join(ran) or 'nothing else'} ran, which can flag a model but not clear it")
    if not clearing:
        names = [run.name for run in detectors if run.name != "files"]  # the inventory always runs
        what = "static checks only" if names == ["static"] else f"only flag-only detectors ran ({', '.join(names)})"
        return f"{what}: they can flag a model but not clear it; nothing searched {', '.join(open_sites)}"
    why = "; ".join(f"{run.name} {run.status}: {run.note}" if run.status != "ok" else f"{run.name}: {run.uncleared_reason}"
                    for run in clearing if run.status != "ok" or run.uncleared_reason)
    return f"{', '.join(open_sites)} not searched to budget" + (f" ({why})" if why else "")


def fails(report: Report, fail_on: str, policy: dict) -> bool:
    """Whether the report reaches ``fail_on`` (ignoring allowlist and not-assessed)."""
    value = check_fail_on(fail_on, policy)
    table = policy["fail_on"]
    if value in table.get("verdicts", {}):
        return report.verdict in table["verdicts"][value]
    minimum = table["severities"][value]
    return severity_rank(report.severity) >= severity_rank(minimum)


def exit_code(report: Report, fail_on: str | None = None, policy: dict | None = None) -> int:
    """Exit code of ``lmscan check`` for a finished report.

    3 when nothing was assessed (always, allowlisted or not); 0 for an allowlisted
    report; 1 when the report reaches ``fail_on`` (a verdict name: ``backdoored``,
    ``suspicious``; or a severity: ``low|medium|high|critical`` compared with the
    report severity); else 0. ``fail_on`` None means the policy default.
    """
    policy = policy if policy is not None else load_policy()
    value = check_fail_on(fail_on, policy)  # a bad value is an error even when it would not matter
    if report.verdict == "not-assessed":
        return EXIT_NOT_ASSESSED
    if report.allowlisted:
        return EXIT_PASS
    return EXIT_FAIL if fails(report, value, policy) else EXIT_PASS


def not_assessed_reason(report: Report) -> str:
    """One line saying why a report has no verdict (for the text report and logs)."""
    return report.reason or "no detector assessed the model"


def fleet_exit_code(codes: list[int]) -> int:
    """The exit code of a fleet scan: the worst of its models' (FLEET_EXIT_ORDER); 0 for none."""
    return min(codes, key=FLEET_EXIT_ORDER.index, default=EXIT_PASS)
