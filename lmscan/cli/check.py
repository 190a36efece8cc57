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
    from lmscan.api import ScanConfig, scan
    from lmscan.cache import ResultCache
    from lmscan.config import allowlist_reason, load_project_config
    from lmscan.report.verdict import check_fail_on, exit_code, load_policy
    from lmscan.report.progress import detector_progress

    project = load_project_config(explicit=config_file)
    rules_dir = rules_dir or project.get("rules")
    policy = load_policy(rules_dir)
    fail_on = check_fail_on(fail_on or project.get("fail_on") or policy["fail_on"]["default"], policy)
    config = ScanConfig(
        model=model, revision=revision, offline=offline, profile=profile or project.get("profile", "fast"),
        engine=engine or project.get("engine", "fast"), detectors=split_option(detectors) or project.get("detectors"), sites=split_option(sites),
        device=device or project.get("device", "auto"), seed=seed, rules_dir=str(rules_dir) if rules_dir else None,
        probes_file=str(probes_file) if probes_file else None, text_column=text_column,
    )
    report = None
    cache = None if no_cache else ResultCache.from_config(project)
    key = None
    if cache is not None:
        from lmscan.loading import resolve_model

        resolved = resolve_model(model, revision=revision, offline=offline)
        key = cache.key(resolved.model_sha256, _cache_identity(config))
        report = cache.get(key)
        if report is not None:
            stderr.print(f"using cached result for weights {resolved.model_sha256[:12]} (--no-cache to rescan)")
    if report is None:
        with detector_progress(stderr) as progress:
            report = scan(config, progress=progress)
        if cache is not None and report.verdict != "not-assessed" and not cache.put(key, report):
            stderr.print("[yellow]warning:[/] could not write the result cache")
    report.allowlisted = allowlist_reason(project, report.model["model_sha256"])
    _emit(report, fmt, output, rules_dir)
    sys.exit(exit_code(report, fail_on, policy))


def _cache_identity(config) -> dict:
    """What decides a scan's result besides the weights (device and output options do not)."""
    import dataclasses

    identity = dataclasses.asdict(config)
    for key in ("model", "revision", "offline", "device", "settings"):
        identity.pop(key, None)
    if config.probes_file:
        from lmscan.loading import sha256_file

        identity["probes_sha256"] = sha256_file(Path(config.probes_file))
    return identity


def _emit(report, fmt: str, output: Path | None, rules_dir) -> None:
    """Write the report: stdout holds only the report; -o writes a file atomically."""
    from lmscan.report.json_report import to_json
    from lmscan.report.render import render_text
    from lmscan.report.sarif import to_sarif_json

    if fmt == "text" and output is None:
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
    stderr.print(f"wrote {output} ({report.verdict})")
