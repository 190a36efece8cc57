"""SARIF 2.1.0 output, shaped for GitHub code scanning.

One run; ``tool.driver.rules`` holds every rule id that occurs in the findings, with
its metadata from ``rules/rule_catalog.toml`` (unknown ids get an entry built from
the finding) and ``properties.security-severity`` from ``rules/policy.toml``. Every
result points at the model's weight file (``hf://org/name@commit/file`` for Hub
models, else a ``file://`` URI) and carries a ``partialFingerprints`` entry that is
stable for the same rule, weights, site and trigger. An allowlisted report marks
its results as externally suppressed, with the allowlist reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import quote

from lmscan import DISTRIBUTION, __version__
from lmscan.findings import Finding, Report, severity_rank
from lmscan.report.json_report import jsonable, summarize_evidence
from lmscan.report.verdict import load_policy
from lmscan.scan.rules import load_catalog

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
DEFAULT_INFORMATION_URI = "https://github.com/lmscan/lmscan"  # when policy.toml has no [sarif] information_uri
FINGERPRINT_KEY = "lmscan/v1"

# Evidence keys that identify *what* was found (tried in order) for the fingerprint.
# Numbers that vary from run to run (scores, rates) must never be part of it.
FINGERPRINT_EVIDENCE_KEYS = (
    "trigger", "triggers", "trigger_tokens", "trigger_words", "tokens", "token", "token_ids", "rows", "heads",
    "tensors", "tensor",
)


def to_sarif(report: Report, rules_dir: str | Path | None = None) -> dict:
    """The report as a SARIF 2.1.0 log (a dict ready for ``json.dumps``)."""
    policy = load_policy(rules_dir)
    catalog = load_catalog(rules_dir)
    findings = [finding for run in report.detectors for finding in run.findings]
    model_sha = str(report.model.get("model_sha256") or "")

    rule_ids: list[str] = []
    worst: dict[str, str] = {}
    first: dict[str, Finding] = {}
    for finding in findings:
        if finding.rule_id not in first:
            rule_ids.append(finding.rule_id)
            first[finding.rule_id] = finding
            worst[finding.rule_id] = finding.severity
        elif severity_rank(finding.severity) > severity_rank(worst[finding.rule_id]):
            worst[finding.rule_id] = finding.severity
    rule_ids.sort()
    rules = [_rule(rid, catalog.get(rid), first[rid], worst[rid], policy) for rid in rule_ids]
    index = {rid: i for i, rid in enumerate(rule_ids)}

    uri = artifact_uri(report)
    results = [_result(f, index[f.rule_id], uri, model_sha, report, policy) for f in findings]

    run = {
        "tool": {"driver": driver(str(report.tool.get("version") or __version__), rules, policy)},
        "invocations": [_invocation(report)],
        "artifacts": _artifacts(report),
        "results": results,
        "properties": jsonable({
            "verdict": report.verdict,
            "reason": report.reason,
            "incomplete": bool(report.incomplete),
            "skipped_sites": report.skipped_sites,
            "severity": report.severity,
            "model": report.model.get("ref"),
            "commit": report.model.get("commit"),
            "model_sha256": model_sha,
            "folder_sha256": report.model.get("folder_sha256"),
            "base": _base_identity(report.model),
            "architecture": report.model.get("architecture"),
            "allowlisted": report.allowlisted,
            "from_cache": bool(report.from_cache),
            "seed": report.seed,
            "device": report.device,
        }),
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def driver(version: str, rules: list[dict], policy: dict) -> dict:
    """``tool.driver``: lmscan at ``version`` with the rules its results refer to."""
    return {
        "name": "lmscan",
        "fullName": f"lmscan ({DISTRIBUTION} {version})",
        "version": version,
        "semanticVersion": version,
        "informationUri": str(policy["sarif"].get("information_uri") or DEFAULT_INFORMATION_URI),
        "rules": rules,
    }


def to_sarif_json(report: Report, rules_dir: str | Path | None = None) -> str:
    return json.dumps(to_sarif(report, rules_dir), indent=2, ensure_ascii=False, allow_nan=False)


def security_severity(severity: str, policy: dict) -> str:
    """GitHub's ``security-severity``: a number 0.0-10.0 written as a string."""
    return f"{float(policy['sarif']['security_severity'][severity]):.1f}"


def sarif_level(severity: str, policy: dict) -> str:
    return str(policy["sarif"]["level"][severity])


def _rule(rule_id: str, meta: dict | None, finding: Finding, severity: str, policy: dict) -> dict:
    if isinstance(meta, dict):
        name = str(meta.get("name") or finding.title or rule_id)
        short = str(meta.get("short") or name)
        full = str(meta.get("full") or short)
        help_text = str(meta.get("help") or full)
        tags = [str(t) for t in meta.get("tags", ["security", "backdoor"])]
        precision = meta.get("precision")
    else:  # a rule the catalogue does not know: describe it from the finding
        name = finding.title or rule_id
        short = finding.title or rule_id
        full = f"{finding.title or rule_id} (reported by the {finding.detector} detector)."
        help_text = f"See the finding message and evidence. Rule {rule_id} has no entry in rule_catalog.toml."
        tags = ["security", "backdoor"]
        precision = None
    properties = {"security-severity": security_severity(severity, policy), "tags": tags}
    if precision:
        properties["precision"] = str(precision)
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": sarif_level(severity, policy)},
        "properties": properties,
    }


def _result(finding: Finding, rule_index: int, uri: str, model_sha: str, report: Report, policy: dict) -> dict:
    summary = summarize_evidence(finding.evidence)
    message = finding.message or finding.title or finding.rule_id
    if finding.site and f"site {finding.site}" not in message:
        message = f"{message} (site {finding.site})"
    result = {
        "ruleId": finding.rule_id,
        "ruleIndex": rule_index,
        "level": sarif_level(finding.severity, policy),
        "message": {"text": message},
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": uri},
                    # A weight file has no lines; code scanning needs a start line to show an alert.
                    "region": {"startLine": 1},
                },
                "logicalLocations": [{"name": finding.site or "model"}],
            }
        ],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(finding, model_sha)},
        "properties": jsonable({
            "detector": finding.detector,
            "severity": finding.severity,
            "verdict": finding.verdict,
            "site": finding.site,
            "score": finding.score,
            "threshold": finding.threshold,
            "evidence": summary,
        }),
    }
    if report.allowlisted:
        result["suppressions"] = [{"kind": "external", "status": "accepted", "justification": report.allowlisted}]
    return result


def fingerprint(finding: Finding, model_sha256: str) -> str:
    """sha256 over rule id, model sha256, site and the stable evidence key (the trigger)."""
    key = ""
    evidence = jsonable(finding.evidence) if isinstance(finding.evidence, dict) else {}
    for name in FINGERPRINT_EVIDENCE_KEYS:
        if evidence.get(name) not in (None, "", [], {}):
            key = name + "=" + json.dumps(evidence[name], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            break
    parts = [finding.rule_id, model_sha256 or "", finding.site or "", key]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _weight_files(report: Report) -> list[tuple[str, str | None]]:
    weights = report.model.get("weight_sha256") or {}
    if isinstance(weights, dict):
        return [(str(name), str(sha) if sha else None) for name, sha in weights.items()]
    return []


def _file_uri(path: Path) -> str:
    return path.expanduser().absolute().as_uri()


def artifact_uri(report: Report, weight_file: str | None = None) -> str:
    """Where the findings are: ``hf://repo@commit/file`` for Hub models, else a ``file://`` URI."""
    model = report.model
    files = _weight_files(report)
    name = weight_file if weight_file is not None else (files[0][0] if files else "")
    repo_id = model.get("repo_id")
    if model.get("kind") == "hub" and repo_id:
        revision = model.get("commit") or model.get("revision")
        base = "hf://" + quote(str(repo_id), safe="/") + (f"@{quote(str(revision), safe='')}" if revision else "")
        return base + ("/" + quote(name, safe="/") if name else "")
    local_dir = model.get("local_dir")
    if local_dir:
        path = Path(str(local_dir))
        return _file_uri(path / name if name else path)
    ref = str(model.get("ref") or "")
    if name:
        return _file_uri(Path(name))
    if ref:
        return _file_uri(Path(ref))
    sha = model.get("model_sha256")
    return f"urn:lmscan:model:{sha}" if sha else "urn:lmscan:model:unknown"


def _artifacts(report: Report) -> list[dict]:
    artifacts = []
    for name, sha in _weight_files(report):
        artifact = {"location": {"uri": artifact_uri(report, name)}, "roles": ["analysisTarget"]}
        if sha:
            artifact["hashes"] = {"sha-256": sha}
        artifacts.append(artifact)
    base = report.model.get("base")
    if report.model.get("adapter") and isinstance(base, dict):
        # The adapter was scanned merged into its base: the base's weight files were analysed too.
        base_report = Report(**{**report.__dict__, "model": base})
        for name, sha in _weight_files(base_report):
            artifact = {"location": {"uri": artifact_uri(base_report, name)}, "roles": ["analysisTarget"],
                        "description": {"text": "base model of the LoRA/PEFT adapter"}}
            if sha:
                artifact["hashes"] = {"sha-256": sha}
            artifacts.append(artifact)
    return artifacts


def _base_identity(model: dict) -> dict | None:
    """An adapter's base model, as the report names it (None for any other model)."""
    base = model.get("base")
    if not model.get("adapter") or not isinstance(base, dict):
        return None
    return {key: base.get(key) for key in ("ref", "repo_id", "commit", "local_dir", "model_sha256", "folder_sha256")}


def _invocation(report: Report) -> dict:
    invocation: dict = {"executionSuccessful": True}
    notes = []
    for run in report.detectors:
        if run.status == "ok":
            continue
        level = "warning" if run.status == "error" else "note"
        text = f"detector {run.name} {run.status}" + (f": {run.note}" if run.note else "")
        notes.append({"level": level, "message": {"text": text}, "descriptor": {"id": run.name}})
    for site, why in report.skipped_sites.items():
        notes.append({"level": "warning", "message": {"text": f"site {site} not scanned: {why}"},
                      "descriptor": {"id": "site-not-scanned"}})
    if report.verdict == "not-assessed":
        notes.append({"level": "error", "message": {"text": f"the model was not assessed: {report.reason}"},
                      "descriptor": {"id": "not-assessed"}})
    if report.incomplete:
        invocation["executionSuccessful"] = False
        notes.append({"level": "error", "descriptor": {"id": "incomplete"},
                      "message": {"text": "the scan was stopped before it finished (a signal or Ctrl-C): this report "
                                          "holds only the detectors that finished"}})
    if notes:
        invocation["toolExecutionNotifications"] = notes
    return invocation
