"""`lmscan check`: scan a model (or a fleet of them), write the report, exit by the fail-on policy."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from lmscan.cli.fleet import RAY_DEFAULT, check_fleet
from lmscan.cli.options import model_options, split_option, stderr
from lmscan.cli.output import check_writable, emit_report
from lmscan.errors import InputError, LmscanError


@click.command()
@click.argument("models", nargs=-1, metavar="MODEL...")
@click.option("--models-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="More models, one a line (ID, ID@REV or a path; # comments).")
@click.option("--profile", default=None, help="Scan profile from rules/profiles.toml: fast, standard, thorough.")
@click.option("--engine", default=None,
              help="How PV mining is scheduled (rules/engines.toml): fast (default) or reference (the paper's).")
@click.option("--detectors", default=None, help="Comma-separated detectors (default: the profile's).")
@click.option("--sites", default=None, help="Comma-separated feature sites (default: those an attacker targets).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here instead of stdout.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write one report per model into this folder (a fleet scan).")
@click.option("--fail-on", default=None, help="backdoored (default), suspicious, or a severity: low|medium|high|critical.")
@click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--probes", "probes_file", type=click.Path(path_type=Path), default=None,
              help="Probe sentences: .txt, .jsonl (text field) or .csv (--text-column).")
@click.option("--text-column", default=None, help="Column/field holding the text in --probes.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Config file (default: [tool.lmscan] in pyproject.toml or lmscan.toml, searched upwards).")
@click.option("--base", "base_model", default=None,
              help="The model MODEL was fine-tuned from, resolved like MODEL. For a LoRA/PEFT adapter folder, "
                   "what it is merged into (default: its base_model_name_or_path); for a full checkpoint, what "
                   "the base-diff detector compares it with (rebuilds triggers trained as a unit; default: the "
                   "model card's base_model, else a local model whose embeddings it kept; 'none': no base).")
@click.option("--no-cache", is_flag=True, help="Ignore and do not write the result cache.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Models scanned at once, each in a local worker process (with CUDA: GPU k mod the GPU count).")
@click.option("--ray", "ray_address", is_flag=False, flag_value=RAY_DEFAULT, default=None, metavar="[ADDRESS]",
              help="Run each model as a Ray task: bare --ray attaches to a running Ray or starts a local one; "
                   "or an address (auto, ray://head:10001). Needs: pip install 'lmscan-backdoor[ray]'.")
@model_options
def check(models, models_file, profile, engine, detectors, sites, fmt, output, out_dir, fail_on, device, seed,
          probes_file, text_column, rules_dir, config_file, base_model, no_cache, jobs, ray_address, revision, offline):
    """Scan MODEL for a task-agnostic backdoor; exit 1 when one is found.

    MODEL is a Hub id (org/name[@rev]), a local directory, a .gguf file, a
    LoRA/PEFT adapter folder (scanned merged into --base), or "minilm" for the
    bundled offline MiniLM. Exit codes: 0 clean, 1 finding at or above
    --fail-on, 2 error, 3 could not assess.

    Several MODELs (or --models-file, --jobs, --ray, --out-dir) make a fleet scan:
    one combined report, and the worst exit code over the models, an error (2)
    before a finding (1) before a model not assessed (3) before clean (0).
    """
    from lmscan.api import ScanConfig, check_request
    from lmscan.report.verdict import check_fail_on
    from lmscan.scan.cache import ResultCache
    from lmscan.scan.fleet import parse_models_file
    from lmscan.scan.project import load_project_config

    project = load_project_config(explicit=config_file)
    rules_dir = rules_dir or project.get("rules")
    refs = [*models, *(parse_models_file(models_file) if models_file else [])]
    if not refs:
        raise InputError("no model given: name one or more, or pass --models-file FILE")
    base = ScanConfig(
        model=refs[0], revision=revision, offline=offline, profile=profile or project.get("profile", "fast"),
        engine=engine or project.get("engine", "fast"), detectors=split_option(detectors) or project.get("detectors"),
        sites=split_option(sites), device=device or project.get("device", "auto"), seed=seed,
        rules_dir=str(rules_dir) if rules_dir else None,
        probes_file=str(probes_file) if probes_file else None, text_column=text_column, base=base_model,
    )
    # Everything that can be checked without the model is checked before it is touched.
    check_writable(output)
    request = check_request(base)
    policy = request.policy
    fail_on = check_fail_on(fail_on or project.get("fail_on") or policy["fail_on"]["default"], policy)
    cache = None if no_cache else ResultCache.from_config(project)
    if len(refs) > 1 or models_file or out_dir or jobs > 1 or ray_address is not None:
        configs = [dataclasses.replace(base, model=ref) for ref in refs]
        check_fleet(configs, project=project, policy=policy, fail_on=fail_on, fmt=fmt, output=output,
                    out_dir=out_dir, cache=cache, jobs=jobs, ray_address=ray_address,
                    threads=click.get_current_context().params.get("threads"))
    else:
        check_one(request, project=project, fail_on=fail_on, fmt=fmt, output=output, cache=cache)


def check_one(request, *, project: dict, fail_on: str, fmt: str, output: Path | None, cache) -> None:
    """One model: its report and its exit code. ``request`` is the checked request
    (lmscan.scan.plan.ScanRequest), bound here to the resolved model: one plan per check."""
    from lmscan.api import not_assessed_report, scan_cached
    from lmscan.models import resolve_model
    from lmscan.report.progress import detector_progress
    from lmscan.report.verdict import exit_code
    from lmscan.scan.interrupts import stop_exit_status, stop_name
    from lmscan.scan.project import allowlist_reason

    config, policy = request.config, request.policy
    resolved = None
    try:
        resolved = resolve_model(config.model, revision=config.revision, offline=config.offline,
                                 base=config.base)
        plan = request.plan(resolved)
        with detector_progress(stderr) as progress:
            report = scan_cached(plan, cache, progress=progress,
                                 warn=lambda message: stderr.print(f"[yellow]warning:[/] {message}"))
    except LmscanError as exc:
        if resolved is None:
            raise  # bad input: the model was never found, one line says why
        # The model was named and found: CI still gets a document saying why there is no verdict.
        emit_report(not_assessed_report(config, resolved, exc), fmt, output, config.rules_dir, quiet=True)
        raise
    except KeyboardInterrupt:
        # Stopped before the detectors ran (while hashing or loading): still a document, marked incomplete.
        report = not_assessed_report(config, resolved, f"stopped by {stop_name()} before any detector ran")
        report.incomplete = True
    if report.from_cache:
        stderr.print(f"using the cached result of an identical scan ({report.started_at}; --no-cache to rescan)")
    report.allowlisted = allowlist_reason(project, report.model.get("folder_sha256", ""))
    # Stopped: the partial document is written and one line says so (and where).
    emit_report(report, fmt, output, config.rules_dir, quiet=report.incomplete and output is not None)
    if report.incomplete:
        where = f"; wrote {output}" if output is not None else ""
        click.echo(f"lmscan: interrupted ({stop_name()}); the report holds the detectors that finished{where}",
                   err=True)
        sys.exit(stop_exit_status())
    sys.exit(exit_code(report, fail_on, policy))
