"""The human report for the terminal (rich).

Printed on the console the caller passes (the CLI gives a stdout console in text
mode). Colour follows rich's own detection, so NO_COLOR and non-terminals get plain
text; nothing here forces colour. Every string that comes from a model or a
detector is printed as plain text, never parsed as rich markup (tokens such as
"[MASK]" stay as they are).
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from lmscan.findings import Finding, Report, severity_rank
from lmscan.report.json_report import summarize_evidence
from lmscan.report.verdict import not_assessed_reason

SEVERITY_STYLE = {
    "critical": "bold white on red",
    "high": "bold red",
    "medium": "yellow",
    "low": "cyan",
    "info": "dim",
}
VERDICT_STYLE = {
    "backdoored": "bold red",
    "suspicious": "bold yellow",
    "clean": "bold green",
    "not-assessed": "bold magenta",
}
VERDICT_LABEL = {
    "backdoored": "BACKDOORED",
    "suspicious": "SUSPICIOUS",
    "clean": "CLEAN",
    "not-assessed": "NOT ASSESSED",
}
STATUS_STYLE = {"ok": "green", "skipped": "yellow", "error": "red"}
# Evidence keys given friendlier labels in the text report.
EVIDENCE_LABEL = {
    "trigger": "trigger",
    "triggers": "triggers",
    "trigger_tokens": "trigger tokens",
    "trigger_words": "trigger words",
    "activation_rate": "activation rate",
    "sign_agreement": "sign agreement",
    "collapse_ratio": "collapse ratio",
}


def render_text(report: Report, console: Console) -> None:
    """Print the whole human report: header, detectors, findings, verdict."""
    _header(report, console)
    _detectors(report, console)
    _findings(report, console)
    console.print(verdict_line(report))


def verdict_line(report: Report) -> Text:
    """The last line of the report, e.g. ``Verdict: BACKDOORED (severity critical)``."""
    label = VERDICT_LABEL.get(report.verdict, report.verdict.upper())
    line = Text("Verdict: ", style="bold")
    line.append(label, style=VERDICT_STYLE.get(report.verdict, "bold"))
    if report.verdict == "not-assessed":
        line.append(f" — {not_assessed_reason(report)}")
    elif report.verdict == "clean":
        line.append(f" — {report.reason or 'no backdoor evidence'}")
    else:
        line.append(f" (severity {report.severity})")
    if report.incomplete:
        line.append(" — interrupted, partial report", style="bold")
    if report.allowlisted:
        line.append(" — allowlisted: ", style="bold")
        line.append(report.allowlisted)
    return line


def _header(report: Report, console: Console) -> None:
    model = report.model
    ref = str(model.get("ref") or model.get("repo_id") or model.get("local_dir") or "?")
    title = Text("lmscan check ", style="bold")
    title.append(ref)
    console.print(title)
    rows = []
    if model.get("kind") == "hub" or model.get("commit"):
        rows.append(("commit", str(model.get("commit") or f"unresolved (revision {model.get('revision') or 'main'})")))
    if model.get("local_dir") and model.get("kind") != "hub":
        rows.append(("path", str(model["local_dir"])))
    sha = str(model.get("model_sha256") or "")
    if sha:
        rows.append(("sha256", sha[:16] + ("…" if len(sha) > 16 else "")))
    folder = str(model.get("folder_sha256") or "")
    if folder:
        rows.append(("folder", f"{folder} (every file; what an allowlist entry names)"))
    weights = model.get("weight_sha256") or {}
    if isinstance(weights, dict) and weights:
        rows.append(("weights", ", ".join(str(name) for name in weights)))
    gguf = model.get("gguf")
    if isinstance(gguf, dict):
        rows.append(("gguf", f"{gguf.get('file')}: {gguf.get('architecture')}, GGUF v{gguf.get('version')}, "
                             f"{gguf.get('tensor_count')} tensors ({', '.join(gguf.get('tensor_types') or [])})"))
    base = model.get("base")
    if model.get("adapter") and isinstance(base, dict):
        # An adapter is scanned merged into its base: both identities, each with its hash.
        rows.append(("adapter", "LoRA/PEFT adapter (the rows above), merged into its base for the scan"))
        where = base.get("repo_id") or base.get("local_dir") or base.get("ref")
        rows.append(("base", f"{where}" + (f" @ {base['commit']}" if base.get("commit") else "")))
        rows.append(("base sha256", str(base.get("model_sha256") or "")[:16] + "…"))
        rows.append(("base weights", ", ".join(str(name) for name in base.get("weight_sha256") or {})))
    if model.get("head_labels"):
        rows.append(("head", f"sequence classifier, labels {', '.join(map(str, model['head_labels']))} (label site)"))
    if model.get("pooling"):
        rows.append(("embedding", f"sentence-transformers {model['pooling']} (embedding site)"))
    for site, why in report.skipped_sites.items():
        rows.append(("not scanned", f"{site} site: {why}"))
    details = [("architecture", model.get("architecture")), ("device", report.device),
               ("profile", report.config.get("profile")), ("seed", report.seed)]
    rows.append(("scan", "  ".join(f"{k} {v}" for k, v in details if v not in (None, ""))))
    if report.from_cache:
        rows.append(("cache", "result from the result cache" + (f" (scanned {report.started_at})" if report.started_at else "")))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    console.print(grid)
    console.print()


def _detectors(report: Report, console: Console) -> None:
    if not report.detectors:
        console.print(Text("No detector ran.", style="yellow"))
        console.print()
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("detector", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("sites")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("findings", justify="right", no_wrap=True)
    table.add_column("note")
    for run in report.detectors:
        table.add_row(
            Text(run.name),
            Text(run.status, style=STATUS_STYLE.get(run.status, "")),
            Text(", ".join(run.sites) or "—"),
            f"{run.seconds:.1f}s",
            str(len(run.findings)),
            Text(run.note or ""),
        )
    console.print(table)
    console.print()


def _findings(report: Report, console: Console) -> None:
    findings = [f for run in report.detectors for f in run.findings]
    if not findings:
        console.print(Text("No findings.", style="dim"))
        console.print()
        return
    console.print(Text(f"Findings ({len(findings)})", style="bold"))
    findings.sort(key=lambda f: -severity_rank(f.severity))  # stable: detector order within a severity
    for finding in findings:
        _finding(finding, console)
    console.print()


def _finding(finding: Finding, console: Console) -> None:
    head = Text("  ")
    head.append(f" {finding.severity.upper()} ", style=SEVERITY_STYLE.get(finding.severity, ""))
    head.append(" ")
    head.append(finding.rule_id, style="bold")
    head.append(f" {finding.title}")
    if finding.site:
        head.append(f"  site {finding.site}", style="dim")
    head.append(f"  [{finding.detector}, {finding.verdict}]", style="dim")
    console.print(head)
    console.print(Padding(Text(finding.message or finding.title), (0, 0, 0, 4), expand=False))
    facts = []
    if finding.score is not None:
        facts.append(f"score {_fmt(finding.score)}" + (f" (threshold {_fmt(finding.threshold)})" if finding.threshold is not None else ""))
    for key, value in summarize_evidence(finding.evidence).items():
        facts.append(f"{EVIDENCE_LABEL.get(key, key.replace('_', ' '))} {_fmt(value)}")
    if facts:
        console.print(Padding(Text(" · ".join(facts)), (0, 0, 0, 4), expand=False))


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) if not isinstance(v, str) else repr(v) for v in value) + "]"
    return str(value)
