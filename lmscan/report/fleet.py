"""Combined reports of a fleet scan (lmscan.scan.fleet): JSON, SARIF and the summary table.

JSON: one document, ``kind: lmscan-fleet``, with a ``models`` array in the order the
models were given. Each entry has the model as given (``ref``), its ``verdict``
(``error`` when it could not be scanned), ``cached``, ``exit_code``, when it started
and finished, where it ran, and either ``report`` (the usual per-model report) or
``error`` (one line).

SARIF: one run; the artifacts and results of every model (each result points at its
own model's weight file), the rules of all of them, and one invocation whose
notifications name the model they are about.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmscan import __version__
from lmscan.findings import Finding, severity_rank
from lmscan.report.json_report import SCHEMA_VERSION, jsonable, to_dict
from lmscan.report.render import VERDICT_LABEL, VERDICT_STYLE
from lmscan.report.sarif import SARIF_SCHEMA, SARIF_VERSION, driver, to_sarif
from lmscan.report.verdict import exit_code, fleet_exit_code, load_policy

ERROR_STYLE = "bold red"


def model_exit_code(result, fail_on: str, policy: dict) -> int:
    """One model's exit code, as a single ``lmscan check`` of it would give."""
    return exit_code(result.report, fail_on, policy) if result.report is not None else result.error_code


def fleet_dict(results: list, codes: list[int]) -> dict:
    """The combined JSON document of ``results`` (in fleet order) with their exit ``codes``."""
    from lmscan.api import tool_info

    counts: dict[str, int] = {}
    for result in results:
        counts[result.verdict] = counts.get(result.verdict, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "lmscan-fleet",
        "tool": jsonable(tool_info()),
        "exit_code": fleet_exit_code(codes),
        "counts": counts,
        "models": [_entry(result, code) for result, code in zip(results, codes)],
    }


def _entry(result, code: int) -> dict:
    entry = {"ref": result.ref, "verdict": result.verdict, "cached": result.cached, "exit_code": code,
             "started_at": result.started_at, "finished_at": result.finished_at, "seconds": result.seconds,
             "host": result.host}
    if result.report is not None:
        entry["report"] = to_dict(result.report)
    else:
        entry["error"] = result.error
    return entry


def to_fleet_json(results: list, codes: list[int]) -> str:
    return json.dumps(fleet_dict(results, codes), indent=2, ensure_ascii=False, allow_nan=False)


def to_fleet_sarif(results: list, rules_dir: str | Path | None = None) -> dict:
    """One SARIF run for the whole fleet (see the module docstring)."""
    policy = load_policy(rules_dir)
    scanned = [(result, to_sarif(result.report, rules_dir)["runs"][0]) for result in results
               if result.report is not None]
    rules = _merged_rules(run for _, run in scanned)
    index = {rule["id"]: i for i, rule in enumerate(rules)}
    sarif_results = []
    for result, run in scanned:
        for item in run["results"]:
            item["ruleIndex"] = index[item["ruleId"]]
            item["properties"]["model"] = result.ref
            sarif_results.append(item)
    run = {
        "tool": {"driver": driver(__version__, rules, policy)},
        "invocations": [_invocation(results, scanned)],
        "artifacts": [artifact for _, run in scanned for artifact in run["artifacts"]],
        "results": sarif_results,
        "properties": {"models": [{"model": r.ref, "verdict": r.verdict, "cached": r.cached} for r in results]},
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def to_fleet_sarif_json(results: list, rules_dir: str | Path | None = None) -> str:
    return json.dumps(to_fleet_sarif(results, rules_dir), indent=2, ensure_ascii=False, allow_nan=False)


def _merged_rules(runs) -> list[dict]:
    """Every rule once, sorted by id; where models rate a rule differently (its worst finding
    differs), the most severe rating stands."""
    rules: dict[str, dict] = {}
    for run in runs:
        for rule in run["tool"]["driver"]["rules"]:
            kept = rules.get(rule["id"])
            if kept is None or _security_severity(rule) > _security_severity(kept):
                rules[rule["id"]] = rule
    return [rules[rule_id] for rule_id in sorted(rules)]


def _security_severity(rule: dict) -> float:
    return float(rule["properties"]["security-severity"])


def _invocation(results: list, scanned: list) -> dict:
    notes = []
    successful = True
    for result, run in scanned:
        invocation = run["invocations"][0]
        successful = successful and invocation["executionSuccessful"]
        for note in invocation.get("toolExecutionNotifications", []):
            notes.append({**note, "message": {"text": _about(result.ref, note["message"]["text"])}})
    for result in results:
        if result.report is None:
            successful = False
            notes.append({"level": "error", "message": {"text": _about(result.ref, result.error)},
                          "descriptor": {"id": "error"}})
    invocation = {"executionSuccessful": successful}
    if notes:
        invocation["toolExecutionNotifications"] = notes
    return invocation


def _about(ref: str, text: str) -> str:
    """``text`` naming the model it is about (many messages already start with it)."""
    return text if text.startswith(ref) else f"{ref}: {text}"


def top_finding(result) -> Finding | None:
    """The model's most severe finding above info (the first of equals), if any."""
    findings = [f for run in result.report.detectors for f in run.findings if f.severity != "info"]
    return max(findings, key=lambda f: severity_rank(f.severity), default=None)


def render_summary(results: list, console: Console) -> None:
    """The fleet's table: model, verdict, top finding (or the error), time, cached."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("model", overflow="fold")
    table.add_column("verdict", no_wrap=True)
    table.add_column("top finding")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("cached", no_wrap=True)
    for result in results:
        table.add_row(Text(result.ref), _verdict(result), _finding_text(result), f"{result.seconds:.1f}s",
                      "yes" if result.cached else "no")
    console.print(table)
    verdicts = sorted({result.verdict for result in results})
    console.print(Text(f"{len(results)} models: " + ", ".join(
        f"{sum(r.verdict == v for r in results)} {v}" for v in verdicts)))


def _verdict(result) -> Text:
    if result.report is None:
        return Text("ERROR", style=ERROR_STYLE)
    return Text(VERDICT_LABEL.get(result.verdict, result.verdict.upper()), style=VERDICT_STYLE.get(result.verdict, ""))


def _finding_text(result) -> Text:
    if result.report is None:
        return Text(result.error, style="red")
    finding = top_finding(result)
    if finding is None:
        if result.verdict == "not-assessed":
            return Text(result.report.reason, style="dim")
        not_scanned = "; ".join(f"{site} not scanned: {why}" for site, why in result.report.skipped_sites.items())
        return Text(not_scanned or "—", style="dim")
    trigger = finding.evidence.get("trigger") if isinstance(finding.evidence, dict) else None
    text = f"{finding.rule_id} {finding.severity}" + (f" {trigger!r}" if trigger else f" {finding.title}")
    return Text(text + (f" at {finding.site}" if finding.site else ""))

