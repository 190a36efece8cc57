"""Command-line interface: parse, call the Python API, render, exit.

One module per command (``lmscan/cli/COMMAND.py``); shared options live in
``lmscan/cli/options.py`` and the text tables in ``lmscan/report/``.

stdout carries only the final report (or machine output); progress, logs and
errors go to stderr. Exit codes: 0 clean, 1 finding / failed check, 2 error or
usage, 3 could not assess.
"""

from __future__ import annotations

import os
import sys

import click

from lmscan import __version__
from lmscan.errors import LmscanError


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


# Imported after `main` exists; each module only defines its command (none imports this one).
from lmscan.cli import (  # noqa: E402
    bench,
    cache,
    check,
    demo,
    export_pvs,
    finetune,
    heads,
    invert,
    monitor,
    plant,
    psim,
    purify,
)

for _command in (plant.plant, check.check, demo.demo, export_pvs.export_pvs_command, monitor.monitor, heads.heads,
                 invert.invert, purify.purify, bench.bench, cache.cache, finetune.finetune, psim.psim):
    main.add_command(_command)
del _command
