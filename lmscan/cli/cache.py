"""`lmscan cache`: manage the result cache."""

from __future__ import annotations

import click


@click.group()
def cache():
    """Manage the result cache (keyed by weight sha256, lmscan version and config)."""


@cache.command("clear")
def cache_clear():
    """Delete every cached scan result."""
    from lmscan.scan.cache import ResultCache
    from lmscan.scan.project import load_project_config

    removed = ResultCache.from_config(load_project_config()).clear()
    click.echo(f"removed {removed} cached result(s)")
