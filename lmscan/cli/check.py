"""`lmscan check`: scan a model, write the report, exit by the fail-on policy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console

from lmscan.cli.options import model_options, split_option, stderr
from lmscan.errors import LmscanError


@click.command()
@click.argument("model")
@click.option("--profile", default=None, help="Scan profile from rules/profiles.toml: fast, standard, thorough.")
@click.option("--engine", default=None,
              help="How PV mining is scheduled (rules/engines.toml): fast (default) or reference (the paper's).")
@click.option("--detectors", default=None, help="Comma-separated detectors (default: the profile's).")
@click.option("--sites", default=None, help="Comma-separated feature sites (default: those an attacker targets).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here instead of stdout.")
@click.option("--fail-on", default=None, help="backdoored (default), suspicious, or a severity: low|medium|high|critical.")
@click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--probes", "probes_file", type=click.Path(path_type=Path), default=None,
              help="Probe sentences: .txt, .jsonl (text field) or .csv (--text-column).")
@click.option("--text-column", default=None, help="Column/field holding the text in --probes.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Config file (default: [tool.lmscan] in pyproject.toml or lmscan.toml, searched upwards).")
@click.option("--no-cache", is_flag=True, help="Ignore and do not write the result cache.")
@model_options
def check(model, profile, engine, detectors, sites, fmt, output, fail_on, device, seed, probes_file, text_column, rules_dir,
          config_file, no_cache, revision, offline):
    """Scan MODEL for a task-agnostic backdoor; exit 1 when one is found.

    MODEL is a Hub id (org/name[@rev]), a local directory, or "minilm" for the
    bundled offline MiniLM. Exit codes: 0 clean, 1 finding at or above
    --fail-on, 2 error, 3 could not assess.
    """
    from lmscan.api import ScanConfig, check_request, model_info, scan, scan_settings
    from lmscan.cache import ResultCache, scan_identity
    from lmscan.config import allowlist_reason, load_project_config
    from lmscan.loading import resolve_model
    from lmscan.report.progress import detector_progress
    from lmscan.report.verdict import check_fail_on, exit_code, load_policy

    project = load_project_config(explicit=config_file)
    rules_dir = rules_dir or project.get("rules")
    policy = load_policy(rules_dir)
    fail_on = check_fail_on(fail_on or project.get("fail_on") or policy["fail_on"]["default"], policy)
    config = ScanConfig(
        model=model, revision=revision, offline=offline, profile=profile or project.get("profile", "fast"),
        engine=engine or project.get("engine", "fast"), detectors=split_option(detectors) or project.get("detectors"),
        sites=split_option(sites), device=device or project.get("device", "auto"), seed=seed,
        rules_dir=str(rules_dir) if rules_dir else None,
        probes_file=str(probes_file) if probes_file else None, text_column=text_column,
    )
    # Everything that can be checked without the model is checked before it is touched.
    check_writable(output)
    check_request(config)
    resolved = resolve_model(model, revision=revision, offline=offline)  # once: the cache and the scan share it
    cache = None if no_cache else ResultCache.from_config(project)
    try:
        settings, names = scan_settings(config, resolved)
        key = cache.key(scan_identity(resolved, config, settings, names)) if cache is not None else None
        report = cache.get(key) if cache is not None else None
        if report is not None:
            # Same files, same settings, same code: the verdict holds, but the report names
            # the model just given (its path or Hub id may differ from the cached scan's).
            report.model.update(model_info(resolved))
            stderr.print(f"using the cached result of an identical scan ({report.started_at}; --no-cache to rescan)")
        else:
            with detector_progress(stderr) as progress:
                report = scan(config, progress=progress, resolved=resolved)
            if cache is not None and report.verdict != "not-assessed" and not cache.put(key, report):
                stderr.print("[yellow]warning:[/] could not write the result cache")
    except LmscanError as exc:
        # The model was named and found: CI still gets a document saying why there is no verdict.
        _emit(failed_report(config, resolved, exc), fmt, output, rules_dir, quiet=True)
        raise
    report.allowlisted = allowlist_reason(project, report.model["model_sha256"])
    _emit(report, fmt, output, rules_dir)
    if report.incomplete:
        click.echo("lmscan: interrupted; the report holds the detectors that finished", err=True)
        sys.exit(130)
    sys.exit(exit_code(report, fail_on, policy))


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


def failed_report(config, resolved, exc: LmscanError):
    """A not-assessed report for a scan that stopped after the model was resolved."""
    import dataclasses
    from datetime import datetime, timezone

    from lmscan.api import tool_info, model_info
    from lmscan.findings import Report

    return Report(schema_version="1.0", tool=tool_info(), model=model_info(resolved),
                  config=dataclasses.asdict(config), seed=config.seed, device=config.device, detectors=[],
                  verdict="not-assessed", severity="info", timings={},
                  started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  reason=f"{exc} (exit {exc.exit_code})")


def _emit(report, fmt: str, output: Path | None, rules_dir, quiet: bool = False) -> None:
    """Write the report: stdout holds only the report; -o writes a file atomically.
    ``quiet``: a failed scan's document, written beside the error line (text goes nowhere)."""
    from lmscan.report.json_report import to_json
    from lmscan.report.render import render_text
    from lmscan.report.sarif import to_sarif_json

    if fmt == "text" and output is None:
        if not quiet:
            render_text(report, Console())
        return
    if fmt == "text":
        console = Console(record=True, width=120, file=open(os.devnull, "w"))
        render_text(report, console)
        text = console.export_text()
    else:
        text = to_json(report) if fmt == "json" else to_sarif_json(report, rules_dir)
    if output is None:
        click.echo(text)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_text(text + "\n")
        os.replace(tmp, output)
    except OSError as exc:
        raise LmscanError(f"cannot write {output}: {exc.strerror or exc}") from None
    if not quiet:
        stderr.print(f"wrote {output} ({report.verdict})")
