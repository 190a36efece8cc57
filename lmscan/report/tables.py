"""Terminal tables of the commands other than `check` (heads, invert, purify, export-pvs, finetune).

Each takes what the command's Python API returned and prints it to stdout; the JSON
form of the same result is written by the command itself.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from rich.table import Table

from lmscan.report.console import OutputConsole


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def print_heads(run, scores, strongest, threshold) -> None:
    console = OutputConsole()
    if strongest is None:
        matrix, title = np.asarray(run.stats["clean_variance"]), "clean [CLS] attention variance (no trigger given)"
    else:
        matrix, title = scores[strongest], f"drift of {strongest!r} per head, z-score against random words"
    table = Table(title=title)
    table.add_column("layer")
    for head in range(matrix.shape[1]):
        table.add_column(str(head), justify="right")
    top = float(matrix.max()) or 1.0
    for layer, row in enumerate(matrix):
        cells = []
        for value in row:
            hot = strongest is not None and value >= threshold
            style = "bold white on red" if hot else ("yellow" if value >= 0.5 * top else "")
            cells.append(f"[{style}]{value:.2f}[/]" if style else f"{value:.2f}")
        table.add_row(str(layer), *cells)
    console.print(table)
    for finding in run.findings:
        console.print(f"{finding.rule_id} {finding.message}")
    if strongest is not None and not run.findings:
        console.print(f"no head reaches z = {threshold} against the random-word drift")


def print_inversion(run) -> None:
    console = OutputConsole()
    for entry in run.stats["runs"]:
        if not entry.get("candidates"):
            continue
        loss = entry["loss"]
        title = (f"{entry['slots']} slot(s), {entry['word_pieces']}-piece words ({entry['candidates']} candidates): "
                 f"loss {loss['first']:.3f} -> {loss['last']:.3f}, "
                 f"{'concentrated' if entry['concentrated'] else 'did not concentrate'} "
                 f"(top weight {', '.join(f'{p:.2f}' for p in entry['slot_peak_weight'])})")
        table = Table(title=title)
        for column in ("candidate", "relaxed weight", "site", "placement", "collapse", "activation", "verified"):
            table.add_column(column, justify="left" if column in ("candidate", "site", "placement") else "right")
        for c in entry.get("verified", []):
            mark = "[bold white on red]yes[/]" if c["confirmed"] else "no"
            table.add_row(c["text"], f"{c['relaxed_weight']:.3f}", c["site"], c["placement"], f"{c['collapse']:.3f}",
                          f"{c['activation_rate']:.0%}", mark)
        console.print(table)
    for finding in run.findings:
        console.print(f"{finding.rule_id} {finding.message}")
    if not any(f.verdict == "backdoored" for f in run.findings):
        console.print("no inverted candidate verified with real tokens (a baseline: this is not a clean verdict)")


def print_purify(report: dict) -> None:
    metrics, heads = report["metrics"], report["heads"]
    table = Table(title=f"PURE purification of {report['model']['ref']}")
    table.add_column("")
    table.add_column("vanilla fine-tune", justify="right")
    table.add_column("purified", justify="right")
    table.add_row("clean accuracy (test split)", f"{metrics['accuracy_before']:.2%}",
                  f"{metrics['accuracy_after']:.2%}")
    if "lfr_before" in metrics:
        table.add_row(f"label flip rate (target {metrics['inferred_target_name']!r}, inferred)",
                      _pct(metrics["lfr_before"]), _pct(metrics["lfr_after"]))
        for trigger, pair in metrics["lfr_per_trigger"].items():
            table.add_row(f"  {trigger!r}", _pct(pair["before"]), _pct(pair["after"]))
    console = OutputConsole()
    console.print(table)
    pruned = ", ".join(f"L{l}H{h}" for l, h in heads["pruned"][:24]) + (" ..." if heads["pruned_count"] > 24 else "")
    console.print(f"pruned {heads['pruned_count']} of {heads['layers'] * heads['heads_per_layer']} heads"
                  f" (validation accuracy bar {report['pruning']['accuracy_bar']:.3f}): {pruned or 'none'}")
    console.print("layer weights lambda: " + " ".join(f"{v:.2f}" for v in heads["lambda"]))
    attempts = report["step2"]["attempts"]
    if len(attempts) > 1:
        console.print("step 2 retried with a smaller mu: " + ", ".join(
            f"mu {a['mu']:g} -> validation accuracy {a['validation_accuracy']:.3f}" for a in attempts))


def print_pvset(pvset, out: Path) -> None:
    table = Table(title=f"{out}: {len(pvset.pvs)} PV(s) for {pvset.model.get('ref')}, T_match {pvset.t_match}")
    for column in ("id", "site", "verified", "activation", "triggers (activation rate)"):
        table.add_column(column)
    for p in pvset.pvs:
        triggers = ", ".join(f"{t['text']!r} ({t['activation_rate']:.0%})" for t in p.triggers[:6]) or "-"
        rate = "-" if p.activation_rate is None else f"{p.activation_rate:.0%}"
        table.add_row(str(p.id), p.site, "yes" if p.verified else "no", rate, triggers)
    OutputConsole().print(table)
    clean = pvset.calibration.get("clean_flag_rate")
    if clean is not None:
        click.echo(f"clean held-out sentences flagged at T_match: {clean:.1%} "
                   f"(best clean match {pvset.calibration['clean_best_match']['max']})")


def print_finetune(report: dict) -> None:
    metrics = report["metrics"]
    console = OutputConsole()
    if "attack_success" not in metrics:
        console.print(f"{report['peft']} fine-tune ({report['defense']}) of {report['model']['ref']}: "
                      f"clean accuracy {_pct(metrics['accuracy'])} on {report['data']['rows']['test']} test rows")
        return
    table = Table(title=f"{report['peft']} fine-tune of {report['model']['ref']}: plain vs {report['defense']}")
    table.add_column("")
    table.add_column(f"plain {report['peft']}", justify="right")
    table.add_column(report["defense"], justify="right")
    table.add_row("clean accuracy (test)", _pct(metrics["accuracy_plain"]), _pct(metrics["accuracy"]))
    table.add_row("attack success (any trigger)", _pct(metrics["attack_success_plain"]),
                  _pct(metrics["attack_success"]))
    for trigger, entry in metrics["per_trigger"].items():
        table.add_row(f"  {trigger!r} -> {entry['target']!r}", _pct(entry["plain"]), _pct(entry["defended"]))
    console.print(table)
    settings = report.get("defense_settings") or {}
    if "lambda_amp" in settings:
        console.print(f"lambda_amp {settings['lambda_amp']:g}, lambda_reg {settings['lambda_reg']:g}"
                      + ("" if not settings.get("select") else
                         f" (chosen from {len(settings['tried'])} tried, validation bar {settings['accuracy_bar']:.3f})"))
