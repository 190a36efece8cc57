"""`lmscan demo`: the offline tour (plant into the bundled MiniLM, scan both)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmscan.cli.options import stderr


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("lmscan-demo"),
              show_default=True, help="Where the planted demo checkpoint is written (reused if present).")
@click.option("--profile", default="fast", show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo(workdir, profile, device):
    """Offline tour: plant a POR backdoor into the bundled MiniLM, then scan the
    original and the planted copy. Exit 0 when both verdicts come out right."""
    from lmscan.api import ScanConfig, scan
    from lmscan.attacks.plant import MANIFEST_NAME, PlantConfig, plant as run_plant
    from lmscan.report.json_report import to_dict
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
        if report.verdict != expected:  # say what led it astray
            for run in report.detectors:
                for finding in run.findings[:3]:
                    if finding.severity != "info":
                        click.echo(f"{'':>18}{finding.rule_id} [{finding.site}] {finding.message}")
        outcomes.append(report.verdict == expected)
    truth = json.loads((planted / MANIFEST_NAME).read_text())
    click.echo(f"{'':>18}{trigger_tally(to_dict(report), truth)}")  # report: the planted copy's, scanned last
    sys.exit(0 if all(outcomes) else 1)


def trigger_tally(report: dict, manifest: dict) -> str:
    """One line: which of a plant's triggers (its lmscan-plant.json ``manifest``) the backdoor
    findings of ``report`` (JSON) recovered, whole or by their first pieces, and which they missed."""
    from lmscan.bench.scoring import trigger_naming

    hits = [f for run in report["detectors"] for f in run["findings"] if f["verdict"] == "backdoored"]
    naming = trigger_naming(hits, manifest)
    recovered = [trigger if whole else f"{trigger} (by its first pieces)"
                 for trigger, (whole, start) in naming.items() if whole or start]
    missed = [trigger for trigger, (whole, start) in naming.items() if not (whole or start)]
    return (f"recovered {len(recovered)} of {len(naming)} planted triggers: {', '.join(recovered) or 'none'}; "
            f"missed: {', '.join(missed) or 'none'}")
