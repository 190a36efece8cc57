"""`lmscan detectors`: what each detector is, read from its declaration and the profiles."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
def detectors(fmt, rules_dir):
    """List the detectors: what each does, whether it can clear a site, the sites it reads,
    its rules, and the profiles that run it by default."""
    from lmscan import detectors as registry
    from lmscan.scan.rules import load_rules

    profiles = load_rules("profiles", rules_dir)
    rows = []
    for name in registry.names():
        cls = registry.get(name)
        rows.append({"name": name, "summary": cls.summary, "can_clear": cls.can_clear, "sites": list(cls.sites),
                     "families": list(cls.families), "rules": list(cls.rule_ids),
                     # the file inventory runs in every scan, whatever the profile lists
                     "profiles": list(profiles) if name == "files" else
                     [p for p, table in profiles.items() if name in table.get("detectors", [])]})
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        clears = "clears sites" if row["can_clear"] else "flags only"
        click.echo(f"{row['name']}: {row['summary']}")
        click.echo(f"    {clears}; rules {', '.join(row['rules'])}; sites {', '.join(row['sites']) or 'none (reads the checkpoint)'};"
                   f" {' and '.join(f'{f}s' for f in row['families'])};"
                   f" default in {', '.join(row['profiles']) or 'no profile'}")
