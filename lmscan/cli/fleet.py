"""`lmscan check` on a fleet: scan every model (lmscan.scan.fleet.scan_many), write the combined
report and the per-model ones, exit with the worst model's code."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click
from rich.console import Console

from lmscan.cli.options import stderr
from lmscan.cli.output import emit_report, plain_text, write_text
from lmscan.errors import InputError
from lmscan.report.console import OutputConsole

RAY_DEFAULT = ""  # what a bare --ray gives: the Ray that ray.init() finds, or a local one
REPORT_SUFFIX = {"json": "json", "sarif": "sarif", "text": "txt"}


def check_fleet(configs: list, *, project: dict, policy: dict, fail_on: str, fmt: str, output: Path | None,
                out_dir: Path | None, cache, jobs: int, ray_address: str | None, threads: int | None) -> None:
    """Scan ``configs`` (one per model, same settings), write the reports, exit with the worst code."""
    from lmscan.scan.fleet import import_ray, scan_many
    from lmscan.report.fleet import model_exit_code
    from lmscan.report.verdict import fleet_exit_code

    if ray_address is not None:
        if jobs > 1:
            raise InputError("--jobs and --ray do not combine: Ray places the tasks itself")
        import_ray()
    if out_dir is not None:
        check_out_dir(out_dir)
    parallel = jobs > 1 or ray_address is not None
    # Worker processes cannot draw under this process's bars: on a terminal they stay quiet.
    progress = "auto" if not parallel else "off" if stderr.is_terminal else "lines"
    results = []
    with fleet_progress(stderr, len(configs), bars=parallel) as finished:
        for result in scan_many(configs, jobs=jobs, ray_address=_ray_target(ray_address), cache=cache,
                                threads=threads, progress=progress):
            _allowlist(result, project)
            results.append(result)
            finished(result)
    results.sort(key=lambda r: r.index)
    codes = [model_exit_code(result, fail_on, policy) for result in results]
    rules_dir = configs[0].rules_dir
    if out_dir is not None:
        write_model_reports(results, out_dir, fmt, rules_dir)
    emit_fleet(results, codes, fmt, output, rules_dir)
    if any(result.report is not None and result.report.incomplete for result in results):
        from lmscan.scan.interrupts import stop_exit_status, stop_name

        click.echo(f"lmscan: interrupted ({stop_name()}); the report holds the models and detectors that finished",
                   err=True)
        sys.exit(stop_exit_status())
    sys.exit(fleet_exit_code(codes))


def _ray_target(ray_address: str | None) -> str | bool | None:
    return True if ray_address == RAY_DEFAULT else ray_address


def _allowlist(result, project: dict) -> None:
    from lmscan.scan.project import allowlist_reason

    if result.report is not None:
        result.report.allowlisted = allowlist_reason(project, result.report.model.get("folder_sha256", ""))


def check_out_dir(out_dir: Path) -> None:
    """--out-dir is created (with its parents) and must be writable before any scan starts."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out-dir {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"--out-dir {out_dir}: not writable")


def report_file_name(result, fmt: str) -> str:
    """``03-org_name@v2.json``: the fleet position keeps two models with one name apart."""
    name = re.sub(r"[^A-Za-z0-9._@-]+", "_", result.ref).strip("._") or "model"
    return f"{result.index + 1:02d}-{name}.{REPORT_SUFFIX[fmt]}"


def write_model_reports(results: list, out_dir: Path, fmt: str, rules_dir) -> None:
    """Each scanned model's usual report (a model that failed is only in the combined report)."""
    for result in results:
        if result.report is not None:
            emit_report(result.report, fmt, out_dir / report_file_name(result, fmt), rules_dir)


def emit_fleet(results: list, codes: list[int], fmt: str, output: Path | None, rules_dir) -> None:
    """The combined report on stdout (or -o); the summary table goes to stderr whenever stdout
    does not carry it, so a log shows it either way."""
    from lmscan.report.fleet import render_summary, to_fleet_json, to_fleet_sarif_json

    if fmt == "text" and output is None:
        render_summary(results, OutputConsole())
        return
    if fmt == "text":
        text = plain_text(lambda console: render_summary(results, console))
    else:
        text = to_fleet_json(results, codes) if fmt == "json" else to_fleet_sarif_json(results, rules_dir)
    render_summary(results, stderr)
    if output is None:
        click.echo(text)
        return
    write_text(output, text)
    stderr.print(f"wrote {output} ({len(results)} models)")


def fleet_progress(console: Console, total: int, bars: bool):
    """A ``finished(result)`` callback counting models done: a bar on a terminal when the scans
    run elsewhere, else a line per model."""
    from lmscan.report.progress import count_progress

    def summary(result) -> str:
        if result.report is None:
            return f"error: {result.error}"
        return f"{result.verdict}" + (" (cached)" if result.cached else f" in {result.seconds:.1f} s")

    return count_progress(console, "models", total, describe=lambda r: f"{r.ref}: {summary(r)}",
                          plain=None if bars else True)
