"""`lmscan export-pvs`: search a model for all its PVs and write the .pvs file monitor reads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmscan.cli.options import model_options, split_option, stderr
from lmscan.errors import LmscanError


@click.command("export-pvs")
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
    from lmscan.pv.pvs_file import to_dict, write_pvs
    from lmscan.report.progress import detector_progress
    from lmscan.report.tables import print_pvset

    report = None
    if from_report is not None:
        from lmscan.report.json_report import from_dict

        try:
            report = from_dict(json.loads(from_report.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LmscanError(f"{from_report}: no such report") from None
        except (OSError, ValueError) as exc:
            raise LmscanError(f"{from_report}: not a lmscan JSON report ({exc})") from None
    config = ScanConfig(model=model, revision=revision, offline=offline, profile=profile, sites=split_option(sites),
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
        print_pvset(pvset, out)
    stderr.print(f"wrote {out}: {len(pvset.pvs)} PV(s), T_match {pvset.t_match}")
