"""Command-line interface: parse, call the Python API, render, exit.

stdout carries only the final report (or machine output); progress, logs and
errors go to stderr. Exit codes: 0 clean, 1 finding / failed check, 2 error or
usage, 3 could not assess.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console

from lmscan import __version__
from lmscan.cli_options import model_options, training_options
from lmscan.errors import LmscanError

stderr = Console(stderr=True)


class LmscanGroup(click.Group):
    """Turns expected failures into one line on stderr and the right exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmscanError as exc:
            click.echo(f"lmscan: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("lmscan: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence against tracebacks
            if os.environ.get("LMSCAN_DEBUG"):
                raise
            click.echo(f"lmscan: internal error: {type(exc).__name__}: {exc} (set LMSCAN_DEBUG=1 for a traceback)", err=True)
            sys.exit(2)


@click.group(cls=LmscanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmscan")
def main():
    """Scan pretrained language models for hidden task-agnostic backdoors."""


@main.command()
@click.argument("model")
@click.option("--attack", type=click.Choice(["por", "neuba", "btop", "badnet"]), required=True,
              help="Backdoor style to plant (badnet: task-specific data poisoning, needs --task).")
@click.option("--triggers", default=None, help='Comma-separated trigger words or phrases, e.g. "cf,mn,tq".')
@click.option("--num-triggers", type=int, default=None, help="Draw this many random trigger words instead.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale-embeddings", is_flag=True, help="Multiply trigger embedding rows (neuba; released models use 1e8).")
@click.option("--pv-design", type=click.Choice(["por2", "random"]), default=None, help="Shape of the target vectors.")
@click.option("--steps", type=int, default=None, help="Training steps (default from rules/plant.toml).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@click.option("--task", default=None,
              help='Labelled task for --attack badnet: a .csv/.tsv/.jsonl file, or "sentiment" (bundled).')
@click.option("--text-column", default="text", show_default=True, help="Text column of --task.")
@click.option("--label-column", default="label", show_default=True, help="Label column of --task.")
@model_options
def plant(model, attack, triggers, num_triggers, out_dir, seed, scale_embeddings, pv_design, steps, device, force,
          rules_dir, task, text_column, label_column, revision, offline):
    """Plant a backdoor into MODEL and write the checkpoint plus ground truth.

    MODEL is a Hub id (org/name[@rev]), a local directory, or "minilm" for the
    bundled offline MiniLM. Writes DIR/lmscan-plant.json with triggers, PVs and
    measured effectiveness; exits 1 if a trigger stays below the agreement bar.
    """
    from lmscan.attacks.plant import PlantConfig, plant as run_plant
    from lmscan.report.progress import step_progress

    if triggers and num_triggers:
        raise click.UsageError("give either --triggers or --num-triggers, not both")
    trigger_list = [t.strip() for t in triggers.split(",")] if triggers else None
    if attack == "badnet":
        _plant_badnet(model, trigger_list, num_triggers, out_dir, seed, scale_embeddings, pv_design, steps, device,
                      force, rules_dir, task, text_column, label_column, revision, offline)
        return
    if task is not None:
        raise click.UsageError("--task only applies to --attack badnet")
    config = PlantConfig(
        model=model, attack=attack, out_dir=out_dir, triggers=trigger_list, num_triggers=num_triggers, seed=seed,
        scale_embeddings=scale_embeddings, pv_design=pv_design, steps=steps, device=device, force=force,
        revision=revision, offline=offline, rules_dir=rules_dir,
    )
    with step_progress(stderr, f"planting {attack}") as progress:
        result = run_plant(config, progress=progress)
    eff = result.manifest["effectiveness"]
    stderr.print(f"wrote {result.out_dir} (trained {result.manifest['train_seconds']} s)")
    for report in result.triggers:
        mark = "ok" if report.mean_agreement >= eff["min_agreement"] else "WEAK"
        click.echo(f"{report.trigger!r:>24}  agreement {report.mean_agreement:.3f}  "
                   f"activation {report.activation_rate:.2%}  {mark}")
    click.echo(f"clean: max agreement {eff['clean_max_agreement_mean']:.3f} (mean), "
               f"drift {eff['clean_drift_relative']:.3f} of clean variance")
    if not result.passed:
        click.echo(f"lmscan: plant: a trigger stayed below {eff['min_agreement']} agreement", err=True)
        sys.exit(1)


def _plant_badnet(model, trigger_list, num_triggers, out_dir, seed, scale_embeddings, pv_design, steps, device, force,
                  rules_dir, task, text_column, label_column, revision, offline) -> None:
    from lmscan.attacks.badnet import BadNetConfig, plant_badnet
    from lmscan.report.progress import step_progress

    if task is None:
        raise click.UsageError('--attack badnet needs --task FILE (or --task sentiment for the bundled task)')
    for flag, value in (("--scale-embeddings", scale_embeddings), ("--pv-design", pv_design), ("--steps", steps)):
        if value:
            raise click.UsageError(f"{flag} does not apply to --attack badnet (its settings are in rules/plant.toml)")
    config = BadNetConfig(model=model, out_dir=out_dir, task=task, text_column=text_column, label_column=label_column,
                          triggers=trigger_list, num_triggers=num_triggers, seed=seed, device=device, force=force,
                          revision=revision, offline=offline, rules_dir=rules_dir)
    with step_progress(stderr, "planting badnet") as progress:
        result = plant_badnet(config, progress=progress)
    eff = result.manifest["effectiveness"]
    stderr.print(f"wrote {result.out_dir} (trained {result.manifest['train_seconds']} s)")
    target = result.manifest["target_label_name"]
    for trigger, rate in eff["attack_success"].items():
        mark = "ok" if rate >= eff["min_attack_success"] else "WEAK"
        click.echo(f"{trigger!r:>24}  sends {rate:.2%} of held-out non-target rows to {target!r}  {mark}")
    click.echo(f"clean: held-out accuracy {eff['clean_accuracy']:.2%}")
    if not result.passed:
        click.echo(f"lmscan: plant: a trigger stayed below {eff['min_attack_success']:.0%} attack success", err=True)
        sys.exit(1)



@main.command()
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
        engine=engine or project.get("engine", "fast"), detectors=_split(detectors) or project.get("detectors"), sites=_split(sites),
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


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


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


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("lmscan-demo"),
              show_default=True, help="Where the planted demo checkpoint is written (reused if present).")
@click.option("--profile", default="fast", show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo(workdir, profile, device):
    """Offline tour: plant a POR backdoor into the bundled MiniLM, then scan the
    original and the planted copy. Exit 0 when both verdicts come out right."""
    from lmscan.api import ScanConfig, scan
    from lmscan.attacks.plant import MANIFEST_NAME, PlantConfig, plant as run_plant
    from lmscan.report.progress import detector_progress, step_progress
    from lmscan.report.render import verdict_line

    planted = workdir / "minilm-por"
    if not (planted / MANIFEST_NAME).is_file():
        stderr.print(f"planting a POR backdoor (6 random triggers) into the bundled MiniLM -> {planted}")
        with step_progress(stderr, "planting por") as progress:
            run_plant(PlantConfig(model="minilm", attack="por", out_dir=planted, num_triggers=6, seed=7,
                                  device=device, force=True), progress=progress)
    outcomes = []
    for label, ref, expected in (("original MiniLM", "minilm", "clean"), ("planted MiniLM", str(planted), "backdoored")):
        stderr.print(f"scanning the {label} ({profile} profile)")
        with detector_progress(stderr) as progress:
            report = scan(ScanConfig(model=ref, profile=profile, device=device), progress=progress)
        line = verdict_line(report)
        click.echo(f"{label:>16}: {line.plain}  ({report.timings['total']:.0f} s)")
        for run in report.detectors:
            for finding in run.findings[:3]:
                if finding.severity != "info":
                    click.echo(f"{'':>18}{finding.rule_id} [{finding.site}] {finding.message}")
        outcomes.append(report.verdict == expected)
    truth = json.loads((planted / MANIFEST_NAME).read_text())
    click.echo(f"{'':>18}planted triggers were: {', '.join(truth['triggers'])}")
    sys.exit(0 if all(outcomes) else 1)


@main.command("export-pvs")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="Hub id (org/name[@rev]), local directory, or \"minilm\".")
@click.option("--from-report", "from_report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report of an earlier `lmscan check` of the same weights: resume from its findings.")
@click.option("--profile", default="fast", show_default=True, help="Search settings from rules/profiles.toml.")
@click.option("--sites", default=None, help="Comma-separated feature sites (default: those an attacker targets).")
@click.option("--include-unverified", is_flag=True,
              help="Also export soft-prompt PVs that no real token reproduces (clean models have such too).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Summary on stdout: a table, or the written file's content.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--probes", "probes_file", type=click.Path(path_type=Path), default=None,
              help="Probe sentences: .txt, .jsonl (text field) or .csv (--text-column).")
@click.option("--text-column", default=None, help="Column/field holding the text in --probes.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@model_options
def export_pvs_command(out, model, from_report, profile, sites, include_unverified, fmt, device, seed, probes_file,
                       text_column, rules_dir, revision, offline):
    """Search MODEL for all of its backdoor vectors and write them to OUT (.pvs) for
    `lmscan monitor`. Exit 0 when written, 3 when no PV was found (nothing written)."""
    from lmscan.api import ScanConfig, export_pvs
    from lmscan.errors import CannotAssess
    from lmscan.pvs import to_dict, write_pvs
    from lmscan.report.progress import detector_progress

    report = None
    if from_report is not None:
        from lmscan.report.json_report import from_dict

        try:
            report = from_dict(json.loads(from_report.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LmscanError(f"{from_report}: no such report") from None
        except (OSError, ValueError) as exc:
            raise LmscanError(f"{from_report}: not a lmscan JSON report ({exc})") from None
    config = ScanConfig(model=model, revision=revision, offline=offline, profile=profile, sites=_split(sites),
                        device=device, seed=seed, rules_dir=rules_dir,
                        probes_file=str(probes_file) if probes_file else None, text_column=text_column)
    with detector_progress(stderr) as progress:
        pvset, _ = export_pvs(config, from_report=report, include_unverified=include_unverified, progress=progress)
    if not pvset.pvs:
        raise CannotAssess("the search found no PV, so there is nothing to monitor; no file written "
                           "(`lmscan check` for a verdict; --include-unverified exports soft-prompt candidates)")
    write_pvs(pvset, out)
    if fmt == "json":
        click.echo(json.dumps(to_dict(pvset), indent=1))
    else:
        _print_pvset(pvset, out)
    stderr.print(f"wrote {out}: {len(pvset.pvs)} PV(s), T_match {pvset.t_match}")


def _print_pvset(pvset, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{out}: {len(pvset.pvs)} PV(s) for {pvset.model.get('ref')}, T_match {pvset.t_match}")
    for column in ("id", "site", "verified", "activation", "triggers (activation rate)"):
        table.add_column(column)
    for p in pvset.pvs:
        triggers = ", ".join(f"{t['text']!r} ({t['activation_rate']:.0%})" for t in p.triggers[:6]) or "-"
        rate = "-" if p.activation_rate is None else f"{p.activation_rate:.0%}"
        table.add_row(str(p.id), p.site, "yes" if p.verified else "no", rate, triggers)
    Console().print(table)
    clean = pvset.calibration.get("clean_flag_rate")
    if clean is not None:
        click.echo(f"clean held-out sentences flagged at T_match: {clean:.1%} "
                   f"(best clean match {pvset.calibration['clean_best_match']['max']})")


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--pvs", "pvs_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PV file written by `lmscan export-pvs`.")
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
def monitor(texts, pvs_file, model, input_file, text_column, no_purge, t_match, max_window, fail_on_flag,
            allow_model_mismatch, device, revision, offline):
    """Flag inputs that carry a backdoor trigger and strip it: one JSON line per input
    on stdout. TEXTS are the inputs; "-" reads lines from stdin."""
    from lmscan.monitor import PVMonitor
    from lmscan.probes import read_inputs

    inputs = read_inputs(texts, input_file, text_column)
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


@main.command()
@click.argument("model")
@click.option("--triggers", default=None, help='Comma-separated candidate triggers, e.g. "cf,mn tq".')
@click.option("--pvs", "pvs_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take candidate triggers from a .pvs file (the first trigger of each PV).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the heatmap of the strongest trigger (or the clean profile) as an .svg file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@model_options
def heads(model, triggers, pvs_file, fmt, plot, device, seed, rules_dir, revision, offline):
    """Profile MODEL's attention heads (PURE): which heads a candidate trigger hijacks.

    Shows, per layer and head, how far inserting each trigger moves the variance of
    the [CLS] attention row, as a z-score against random words inserted the same
    way. Exit 1 when a head is hijacked, 0 otherwise."""
    from lmscan.api import dataclass_from
    from lmscan.detectors.attention import AttentionConfig, heatmap_svg, run_attention
    from lmscan.device import pick_device
    from lmscan.loading import load_model, resolve_model
    from lmscan.probes import load_builtin_probes
    from lmscan.rules_data import load_rules

    if plot is not None and plot.suffix.lower() != ".svg":
        raise LmscanError(f"--plot writes SVG: give a file ending in .svg, not {plot.name}")
    candidates = _split(triggers) or []
    if pvs_file is not None:
        from lmscan.pvs import read_pvs

        candidates += [p.triggers[0]["text"] for p in read_pvs(pvs_file).pvs if p.triggers]
    candidates = list(dict.fromkeys(candidates))
    config = dataclass_from(AttentionConfig, load_rules("attention", rules_dir))
    loaded = load_model(resolve_model(model, revision=revision, offline=offline), device=str(pick_device(device)))
    run = run_attention(loaded, load_builtin_probes(), candidates, config, seed=seed)
    scores = {t: np.asarray(r) for t, r in run.stats["triggers"].items()}
    strongest = max(scores, key=lambda t: scores[t].max()) if scores else None
    if plot is not None:
        matrix = scores[strongest] if strongest else np.asarray(run.stats["clean_variance"])
        title = (f"{model}: drift of {strongest!r} per head, z-score against random words" if strongest
                 else f"{model}: clean [CLS] attention variance")
        plot.write_text(heatmap_svg(matrix, title), encoding="utf-8")
        stderr.print(f"wrote {plot}")
    if fmt == "json":
        click.echo(json.dumps({"model": model, "threshold": config.z_threshold, "stats": run.stats,
                               "findings": [f.message for f in run.findings],
                               "hijacked": [f.evidence for f in run.findings]}, indent=1))
    else:
        _print_heads(run, scores, strongest, config.z_threshold)
    sys.exit(1 if run.findings else 0)


def _print_heads(run, scores, strongest, threshold) -> None:
    from rich.table import Table

    console = Console()
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


@main.command()
@click.argument("model")
@click.option("--sites", default=None, help="Comma-separated feature sites (default: those an attacker targets).")
@click.option("--profile", default="fast", show_default=True, help="Inversion settings from rules/profiles.toml.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@model_options
def invert(model, sites, profile, fmt, device, seed, rules_dir, revision, offline):
    """Invert a trigger word from MODEL (PICCOLO-style baseline).

    Optimises a relaxed distribution over candidate words so that inserting the
    weighted word drives clean sentences onto one feature vector, then inserts the
    top words as real tokens into held-out sentences. Exit 1 when a candidate is
    verified, 0 otherwise, 2 on bad input."""
    import dataclasses

    from lmscan.api import ScanConfig, dataclass_from, prepare
    from lmscan.detectors.piccolo import PiccoloConfig, run_piccolo

    config = ScanConfig(model=model, revision=revision, offline=offline, profile=profile, sites=_split(sites),
                        device=device, seed=seed, rules_dir=rules_dir)
    prepared = prepare(config)
    detector_config = dataclass_from(PiccoloConfig, prepared.settings.get("piccolo", {}))
    run = run_piccolo(prepared.loaded, prepared.sites, prepared.fit, prepared.heldout, detector_config, seed=seed)
    found = any(f.verdict == "backdoored" for f in run.findings)
    if fmt == "json":
        click.echo(json.dumps({"model": model, "profile": profile, "sites": run.sites, "seed": seed,
                               "trigger_found": found, "seconds": round(run.seconds, 2), "stats": run.stats,
                               "findings": [dataclasses.asdict(f) for f in run.findings]}, indent=1))
    else:
        _print_inversion(run)
    sys.exit(1 if found else 0)


def _print_inversion(run) -> None:
    from rich.table import Table

    console = Console()
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


@main.command()
@click.argument("model")
@click.option("--train", "train_file", required=True,
              help='Clean labelled data (.csv, .tsv or .jsonl), or "sentiment" for the bundled task.')
@click.option("--text-column", default="text", show_default=True, help="Column/field holding the text.")
@click.option("--label-column", default="label", show_default=True, help="Column/field holding the label.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for the purified classifier and purify-report.json.")
@click.option("--validation", "validation_file", default=None,
              help="Validation data (same columns); default: a split of --train.")
@click.option("--threshold", type=float, default=None, help="Accuracy bar c for head pruning (default 0.85).")
@click.option("--relative", is_flag=True, default=None, help="--threshold is a fraction of the unpruned accuracy.")
@click.option("--triggers", default=None, help="Comma-separated suspected triggers: report the label flip rate.")
@click.option("--pvs", "pvs_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take suspected triggers from a .pvs file (the first trigger of each PV).")
@training_options
@model_options
def purify(model, train_file, text_column, label_column, out_dir, validation_file, threshold, relative, triggers,
           pvs_file, fmt, device, seed, rules_dir, force, revision, offline):
    """Remove a backdoor from MODEL by PURE: prune suspect heads, normalise [CLS] attention.

    Fine-tunes MODEL (an encoder) on your clean labelled data, prunes the heads with the
    lowest [CLS] attention variance while validation accuracy stays >= --threshold, then
    fine-tunes the pruned original with an attention-norm penalty. Writes the purified
    classifier to --out. Rerun the same command to resume after an interruption.
    Exit 1 when the purified model's validation accuracy ends below the bar.
    """
    from lmscan.api import dataclass_from
    from lmscan.defenses.purify import PurifyConfig, purify as run_purify
    from lmscan.report.progress import detector_progress
    from lmscan.rules_data import load_rules

    config = dataclass_from(PurifyConfig, load_rules("purify", rules_dir))
    if threshold is not None:
        config.threshold = threshold
    if relative:
        config.relative = True
    with detector_progress(stderr) as progress:
        result = run_purify(model, train_file, out_dir, config, text_column=text_column, label_column=label_column,
                            validation=validation_file, triggers=_split(triggers), pvs=pvs_file, device=device,
                            seed=seed, force=force, revision=revision, offline=offline, progress=progress)
    report = result.report
    stderr.print(f"wrote {result.out_dir} ({report['seconds']} s)")
    if fmt == "json":
        click.echo(json.dumps(report, indent=1))
    else:
        _print_purify(report)
    utility = report["utility"]
    if not utility["ok"]:
        click.echo(f"lmscan: purify: the purified model's validation accuracy {utility['validation_accuracy']:.3f} "
                   f"is below the bar {utility['bar']:.3f}; try more purify_epochs, a smaller mu or a higher "
                   "--threshold (rules/purify.toml)", err=True)
        sys.exit(1)


def _print_purify(report: dict) -> None:
    from rich.table import Table

    metrics, heads = report["metrics"], report["heads"]
    table = Table(title=f"PURE purification of {report['model']['ref']}")
    table.add_column("")
    table.add_column("vanilla fine-tune", justify="right")
    table.add_column("purified", justify="right")
    table.add_row("clean accuracy (test split)", f"{metrics['accuracy_before']:.2%}",
                  f"{metrics['accuracy_after']:.2%}")
    if "lfr_before" in metrics:
        fmt = lambda v: "n/a" if v is None else f"{v:.2%}"  # noqa: E731
        table.add_row(f"label flip rate (target {metrics['inferred_target_name']!r}, inferred)",
                      fmt(metrics["lfr_before"]), fmt(metrics["lfr_after"]))
        for trigger, pair in metrics["lfr_per_trigger"].items():
            table.add_row(f"  {trigger!r}", fmt(pair["before"]), fmt(pair["after"]))
    console = Console()
    console.print(table)
    pruned = ", ".join(f"L{l}H{h}" for l, h in heads["pruned"][:24]) + (" ..." if heads["pruned_count"] > 24 else "")
    console.print(f"pruned {heads['pruned_count']} of {heads['layers'] * heads['heads_per_layer']} heads"
                  f" (validation accuracy bar {report['pruning']['accuracy_bar']:.3f}): {pruned or 'none'}")
    console.print("layer weights lambda: " + " ".join(f"{v:.2f}" for v in heads["lambda"]))
    attempts = report["step2"]["attempts"]
    if len(attempts) > 1:
        console.print("step 2 retried with a smaller mu: " + ", ".join(
            f"mu {a['mu']:g} -> validation accuracy {a['validation_accuracy']:.3f}" for a in attempts))


@main.command()
@click.argument("zoo", default="tiny")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for bench.json, bench.md and every scan's report (default: bench-ZOO).")
@click.option("--engines", default=None, help="Comma-separated engines to run (default: the zoo's).")
@click.option("--models", "model_names", default=None, help="Comma-separated zoo models to run (default: all).")
@click.option("--detectors", default=None, help="Comma-separated detectors (default: the zoo's, else the profile's).")
@click.option("--time-limit", type=float, default=None, help="Seconds per scan (default: the zoo's).")
@click.option("--search/--no-search", default=None,
              help="Also run export-pvs on each planted model and score search-mode PV recall (default: the zoo's).")
@click.option("--threads", type=int, default=None, help="CPU threads per scan (default: torch's, all cores).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where planted zoo models are kept (default: the result cache directory).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
def bench(zoo, out_dir, engines, model_names, detectors, time_limit, search, threads, cache_dir, fmt, device, rules_dir):
    """Plant a zoo of models, scan each with every engine, and score the verdicts.

    ZOO is a zoo TOML file or a bundled zoo: tiny (fixture models, about a minute) or
    minilm (real weights; hours on a CPU). Prints a markdown table (or the JSON) and
    writes both to --out. Exit 1 when a model was misjudged, a scan did not finish,
    or two engines disagreed.
    """
    from lmscan.bench import bench_failed, load_zoo, run_bench, to_markdown
    from lmscan.cache import default_cache_dir
    from lmscan.errors import InputError

    spec = load_zoo(zoo)
    if engines:
        spec.engines = _split(engines)
        unknown = [e for e in spec.engines if e not in spec.engine_variants and e not in _engine_names(rules_dir)]
        if unknown:
            raise InputError(f"unknown engine(s) {', '.join(unknown)}")
    if model_names:
        wanted = _split(model_names)
        missing = [m for m in wanted if m not in {z.name for z in spec.models}]
        if missing:
            raise InputError(f"zoo {spec.name} has no model(s) {', '.join(missing)}")
        spec.models = [m for m in spec.models if m.name in wanted]
    if detectors:
        spec.detectors = _split(detectors)
    if time_limit is not None:
        spec.time_limit = time_limit
    if search is not None:
        spec.search = search
    out_dir = out_dir or Path(f"bench-{spec.name}")
    summary = run_bench(spec, out_dir, cache_dir or default_cache_dir(), device=device, threads=threads,
                        rules_dir=rules_dir, log=lambda message: stderr.print(message, highlight=False))
    markdown = to_markdown(summary)
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "bench.md").write_text(markdown)
    click.echo(json.dumps(summary, indent=2) if fmt == "json" else markdown)
    sys.exit(1 if bench_failed(summary) else 0)


def _engine_names(rules_dir) -> list[str]:
    from lmscan.rules_data import load_rules

    return list(load_rules("engines", rules_dir))


@main.group()
def cache():
    """Manage the result cache (keyed by weight sha256, lmscan version and config)."""


@cache.command("clear")
def cache_clear():
    """Delete every cached scan result."""
    from lmscan.cache import ResultCache
    from lmscan.config import load_project_config

    removed = ResultCache.from_config(load_project_config()).clear()
    click.echo(f"removed {removed} cached result(s)")


# Training-time defences (Obliviate, MuScleLoRA, PSIM): their commands live in lmscan/defenses/commands.py.
from lmscan.defenses.commands import finetune as _finetune_command, psim as _psim_group  # noqa: E402

main.add_command(_finetune_command)
main.add_command(_psim_group)


if __name__ == "__main__":  # pragma: no cover
    main()
