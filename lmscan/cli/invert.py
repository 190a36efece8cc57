"""`lmscan invert`: PICCOLO-style trigger inversion (a baseline, not a verdict)."""

from __future__ import annotations

import json
import sys

import click

from lmscan.cli.options import model_options, split_option


@click.command()
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

    from lmscan.api import ScanConfig, run_one
    from lmscan.report.tables import print_inversion

    config = ScanConfig(model=model, revision=revision, offline=offline, profile=profile, sites=split_option(sites),
                        device=device, seed=seed, rules_dir=rules_dir)
    run = run_one(config, "piccolo")
    found = any(f.verdict == "backdoored" for f in run.findings)
    if fmt == "json":
        click.echo(json.dumps({"model": model, "profile": profile, "sites": run.sites, "seed": seed,
                               "trigger_found": found, "seconds": round(run.seconds, 2), "stats": run.stats,
                               "findings": [dataclasses.asdict(f) for f in run.findings]}, indent=1))
    else:
        print_inversion(run)
    sys.exit(1 if found else 0)
