"""Writing a report: stdout carries only the report; -o and --out-dir files are written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import click

from lmscan.cli.options import stderr
from lmscan.errors import LmscanError
from lmscan.report.console import OutputConsole


def check_writable(output: Path | None) -> None:
    """-o must be writable before a scan of minutes starts."""
    if output is None:
        return
    parent = output.expanduser().absolute().parent
    if not parent.is_dir():
        raise LmscanError(f"cannot write {output}: no such directory {parent}")
    if not os.access(parent, os.W_OK):
        raise LmscanError(f"cannot write {output}: {parent} is not writable")
    if output.is_dir():
        raise LmscanError(f"cannot write {output}: it is a directory")


def emit_report(report, fmt: str, output: Path | None, rules_dir, quiet: bool = False) -> None:
    """Write the report: stdout holds only the report; -o writes a file atomically.
    ``quiet``: a failed scan's document, written beside the error line (text goes nowhere)."""
    from lmscan.report.json_report import to_json
    from lmscan.report.render import render_text
    from lmscan.report.sarif import to_sarif_json

    if fmt == "text" and output is None:
        if not quiet:
            render_text(report, OutputConsole())
        return
    if fmt == "text":
        text = plain_text(lambda console: render_text(report, console))
    else:
        text = to_json(report) if fmt == "json" else to_sarif_json(report, rules_dir)
    if output is None:
        click.echo(text)
        return
    write_text(output, text)
    if not quiet:
        stderr.print(f"wrote {output} ({report.verdict})")


def plain_text(draw) -> str:
    """What ``draw(console)`` prints, as plain text with whole lines (for a file)."""
    with open(os.devnull, "w") as sink:
        console = OutputConsole(record=True, file=sink)
        draw(console)
    return console.export_text()


def write_text(output: Path, text: str) -> None:
    """Write ``text`` to ``output`` atomically (a reader never sees half a report)."""
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_text(text + "\n")
        os.replace(tmp, output)
    except OSError as exc:
        raise LmscanError(f"cannot write {output}: {exc.strerror or exc}") from None
