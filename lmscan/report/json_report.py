"""The JSON report: ``to_dict`` / ``to_json`` and back with ``from_dict``.

The layout is the Report dataclass (lmscan/findings.py) with a ``schema_version``.
Values are made JSON-safe on the way out: numpy scalars and arrays (and anything
with ``tolist()``, such as torch tensors) become plain numbers and lists, NaN and
infinities become null, paths become strings. ``from_dict`` checks the layout and
raises InputError on anything it cannot read (it also reads cached results and
``--from-report`` files).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import PurePath

from lmscan.errors import InputError
from lmscan.findings import FINDING_VERDICTS, SEVERITIES, VERDICTS, DetectorRun, Finding, Report

SCHEMA_VERSION = "1.0"
DETECTOR_STATUSES = ("ok", "skipped", "error")


# --------------------------------------------------------------------------- out


def jsonable(value):
    """Return ``value`` as plain JSON data (dict/list/str/int/float/bool/None).

    Non-finite floats become None; numpy scalars, numpy arrays and other objects
    with ``tolist()``/``item()`` are converted; dataclasses become dicts; dict keys
    become strings; sets become sorted lists; anything else becomes ``str(value)``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    # numpy (np.generic, np.ndarray), torch tensors and friends, without importing them.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return jsonable(tolist())
        except (TypeError, ValueError):
            pass
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def to_dict(report: Report) -> dict:
    """The report as plain JSON data, ``schema_version`` first."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": jsonable(report.tool),
        "model": jsonable(report.model),
        "config": jsonable(report.config),
        "seed": jsonable(report.seed),
        "device": jsonable(report.device),
        "started_at": report.started_at,
        "verdict": report.verdict,
        "reason": report.reason,
        "incomplete": bool(report.incomplete),
        "skipped_sites": jsonable(report.skipped_sites),
        "severity": report.severity,
        "allowlisted": report.allowlisted,
        "from_cache": bool(report.from_cache),
        "timings": jsonable(report.timings),
        "detectors": [_run_dict(run) for run in report.detectors],
    }


def _run_dict(run: DetectorRun) -> dict:
    return {
        "name": run.name,
        "status": run.status,
        "seconds": jsonable(run.seconds),
        "sites": jsonable(run.sites),
        "can_clear": bool(run.can_clear),
        "cleared_sites": jsonable(run.cleared_sites),
        "uncleared_reason": run.uncleared_reason,
        "note": run.note,
        "stats": jsonable(run.stats),
        "findings": [_finding_dict(f) for f in run.findings],
    }


def _finding_dict(finding: Finding) -> dict:
    return {
        "detector": finding.detector,
        "rule_id": finding.rule_id,
        "title": finding.title,
        "severity": finding.severity,
        "verdict": finding.verdict,
        "message": finding.message,
        "site": finding.site,
        "score": jsonable(finding.score),
        "threshold": jsonable(finding.threshold),
        "evidence": jsonable(finding.evidence),
    }


def to_json(report: Report) -> str:
    """The JSON report text (indent 2, strict JSON: no NaN/Infinity, no trailing newline)."""
    return json.dumps(to_dict(report), indent=2, ensure_ascii=False, allow_nan=False)


# Keys shown first (in this order) when evidence is summarised for people and SARIF.
KEY_EVIDENCE = (
    "trigger", "triggers", "trigger_tokens", "trigger_words", "tokens", "token", "activation_rate",
    "sign_agreement", "collapse_ratio", "collapse", "shift", "shift_ratio", "rows", "heads", "tensors",
)


def summarize_evidence(evidence: dict, max_items: int = 8, max_list: int = 10, max_chars: int = 120) -> dict:
    """A short, JSON-safe view of a finding's evidence: key items first, long vectors left out.

    Scalars are kept; lists of scalars are kept up to ``max_list`` items (longer ones
    are cut, with "…" marking the cut, or left out when they are numeric vectors such
    as PVs); nested tables are left out. At most ``max_items`` keys.
    """
    data = jsonable(evidence) if isinstance(evidence, dict) else {}
    ordered = [k for k in KEY_EVIDENCE if k in data] + [k for k in data if k not in KEY_EVIDENCE]
    summary: dict = {}
    for key in ordered:
        if len(summary) >= max_items:
            break
        value = data[key]
        if isinstance(value, str):
            summary[key] = value if len(value) <= max_chars else value[: max_chars - 1] + "…"
        elif value is None or isinstance(value, (bool, int, float)):
            summary[key] = value
        elif isinstance(value, list) and all(v is None or isinstance(v, (str, int, float, bool)) for v in value):
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            if len(value) <= max_list:
                summary[key] = value
            elif not numeric:
                summary[key] = [*value[:max_list], "…"]
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value) and len(value) <= max_list:
            # short lists of short lists: e.g. multi-token triggers [["zq"], ["vx", "##q"]]
            if all(len(v) <= max_list and all(isinstance(x, (str, int)) for x in v) for v in value):
                summary[key] = value
    return summary


# ---------------------------------------------------------------------------- in


def from_dict(d: dict) -> Report:
    """Rebuild a Report from ``to_dict`` output; InputError names the first problem found."""
    if not isinstance(d, dict):
        raise InputError("report: expected a JSON object")
    version = d.get("schema_version")
    if version is None:
        raise InputError("report: no schema_version (not an lmscan JSON report?)")
    if version != SCHEMA_VERSION:
        raise InputError(f"report: schema_version {version!r} is not supported (this lmscan reads {SCHEMA_VERSION!r})")
    verdict = _get(d, "verdict", str, "report")
    if verdict not in VERDICTS:
        raise InputError(f"report: verdict {verdict!r} is not one of {list(VERDICTS)}")
    severity = _get(d, "severity", str, "report")
    if severity not in SEVERITIES:
        raise InputError(f"report: severity {severity!r} is not one of {list(SEVERITIES)}")
    detectors = _get(d, "detectors", list, "report")
    seed = d.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InputError("report: seed must be an integer or null")
    skipped_sites = _get(d, "skipped_sites", dict, "report", default={})
    if not all(isinstance(why, str) for why in skipped_sites.values()):
        raise InputError("report: skipped_sites must map each site to a reason (a string)")
    allowlisted = d.get("allowlisted")
    if allowlisted is not None and not isinstance(allowlisted, str):
        raise InputError("report: allowlisted must be a string or null")
    return Report(
        schema_version=version,
        tool=_get(d, "tool", dict, "report"),
        model=_get(d, "model", dict, "report"),
        config=_get(d, "config", dict, "report"),
        seed=seed,
        device=_get(d, "device", str, "report"),
        detectors=[_run_from(r, i) for i, r in enumerate(detectors)],
        verdict=verdict,
        severity=severity,
        timings=_get(d, "timings", dict, "report"),
        allowlisted=allowlisted,
        started_at=_get(d, "started_at", str, "report", default=""),
        from_cache=bool(d.get("from_cache", False)),
        reason=_get(d, "reason", str, "report", default=""),
        incomplete=bool(d.get("incomplete", False)),
        skipped_sites=dict(skipped_sites),
    )


_MISSING = object()


def _get(d: dict, key: str, kind, where: str, default=_MISSING, nullable: bool = False):
    if key not in d:
        if default is not _MISSING:
            return default
        raise InputError(f"{where}: missing {key!r}")
    value = d[key]
    if value is None and nullable:
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InputError(f"{where}: {key!r} must be {kind.__name__}" + (" or null" if nullable else ""))
    return float(value) if kind is float else value


def _run_from(r, index: int) -> DetectorRun:
    where = f"report: detectors[{index}]"
    if not isinstance(r, dict):
        raise InputError(f"{where}: expected an object")
    status = _get(r, "status", str, where)
    if status not in DETECTOR_STATUSES:
        raise InputError(f"{where}: status {status!r} is not one of {list(DETECTOR_STATUSES)}")
    sites = _get(r, "sites", list, where, default=[])
    if not all(isinstance(s, str) for s in sites):
        raise InputError(f"{where}: sites must be strings")
    findings = _get(r, "findings", list, where, default=[])
    return DetectorRun(
        name=_get(r, "name", str, where),
        status=status,
        seconds=_get(r, "seconds", float, where, default=0.0, nullable=True) or 0.0,
        sites=list(sites),
        stats=_get(r, "stats", dict, where, default={}),
        findings=[_finding_from(f, f"{where}.findings[{j}]") for j, f in enumerate(findings)],
        note=_get(r, "note", str, where, default=""),
        cleared_sites=[str(x) for x in _get(r, "cleared_sites", list, where, default=[])],
        uncleared_reason=_get(r, "uncleared_reason", str, where, default=""),
        can_clear=bool(r.get("can_clear", False)),
    )


def _finding_from(f, where: str) -> Finding:
    if not isinstance(f, dict):
        raise InputError(f"{where}: expected an object")
    severity = _get(f, "severity", str, where)
    if severity not in SEVERITIES:
        raise InputError(f"{where}: severity {severity!r} is not one of {list(SEVERITIES)}")
    verdict = _get(f, "verdict", str, where)
    if verdict not in FINDING_VERDICTS:
        raise InputError(f"{where}: verdict {verdict!r} is not one of {list(FINDING_VERDICTS)}")
    return Finding(
        detector=_get(f, "detector", str, where),
        rule_id=_get(f, "rule_id", str, where),
        title=_get(f, "title", str, where),
        severity=severity,
        verdict=verdict,
        message=_get(f, "message", str, where),
        site=_get(f, "site", str, where, default=None, nullable=True),
        score=_get(f, "score", float, where, default=None, nullable=True),
        threshold=_get(f, "threshold", float, where, default=None, nullable=True),
        evidence=_get(f, "evidence", dict, where, default={}),
    )
