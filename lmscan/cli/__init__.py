"""Command-line interface: parse, call the Python API, render, exit.

One module per command (``lmscan/cli/COMMAND.py``); shared options live in
``lmscan/cli/options.py`` and the text tables in ``lmscan/report/``.

stdout carries only the final report (or machine output); progress, logs and
errors go to stderr. Exit codes: 0 clean, 1 finding / failed check, 2 error or
usage, 3 could not assess.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from lmscan import DISTRIBUTION, __version__
from lmscan.errors import LmscanError


# What a bare command prints (its help) is not an error.
_HELP_REQUESTS = tuple(getattr(click.exceptions, name) for name in ("NoArgsIsHelpError",)
                       if hasattr(click.exceptions, name))


def usage_error(exc: click.UsageError):
    """A usage error as one line on stderr, with where to look, and its exit code (2).
    Click's own display takes four lines: usage, a help hint, a blank line, the error."""
    message = " ".join(exc.format_message().split())
    hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
    click.echo(f"lmscan: error: {message}{hint}", err=True)
    sys.exit(exc.exit_code)


class LmscanGroup(click.Group):
    """Turns expected failures into one line on stderr and the right exit code."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _HELP_REQUESTS:
            raise
        except click.UsageError as exc:  # an unknown option of lmscan itself
            usage_error(exc)

    def invoke(self, ctx):
        from lmscan.scan.interrupts import stop_exit_status, stop_name, stop_signals_handled

        try:
            with stop_signals_handled():
                return super().invoke(ctx)
        except _HELP_REQUESTS:
            raise
        except click.UsageError as exc:  # an unknown command, a bad option or value of any command
            usage_error(exc)
        except LmscanError as exc:
            click.echo(f"lmscan: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"lmscan: interrupted ({stop_name()})", err=True)
            sys.exit(stop_exit_status())
        except BrokenPipeError:
            # The reader went away (`lmscan detectors | head`): nothing left to tell it.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence against tracebacks
            if os.environ.get("LMSCAN_DEBUG"):
                raise
            click.echo(f"lmscan: internal error: {type(exc).__name__}: {exc} (set LMSCAN_DEBUG=1 for a traceback)", err=True)
            sys.exit(2)


@click.group(cls=LmscanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmscan", message=f"%(prog)s %(version)s (distribution {DISTRIBUTION})")
def main():
    """Scan pretrained language models for hidden task-agnostic backdoors."""


# Imported after `main` exists; each module only defines its command (none imports this one).
from lmscan.cli import (  # noqa: E402
    bench,
    cache,
    check,
    demo,
    detectors,
    export_pvs,
    finetune,
    heads,
    invert,
    monitor,
    plant,
    psim,
    purify,
)


def _with_threads(command: click.Command) -> click.Command:
    """Give a command ``--threads N``: the CPU threads torch computes with (default: all cores).
    bench has its own, passed to each scan it starts."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_threads(sub)
        return command
    if any(p.name == "threads" for p in command.params):
        return command
    command.params.append(click.Option(["--threads"], type=click.IntRange(min=1), default=None,
                                       help="CPU threads to compute with (default: all cores)."))
    callback = command.callback

    @functools.wraps(callback)
    def run(*args, threads=None, **kwargs):
        if threads:
            import torch

            torch.set_num_threads(threads)
        return callback(*args, **kwargs)

    command.callback = run
    return command


for _command in (plant.plant, check.check, demo.demo, detectors.detectors, export_pvs.export_pvs_command, monitor.monitor, heads.heads,
                 invert.invert, purify.purify, bench.bench, cache.cache, finetune.finetune, psim.psim):
    main.add_command(_with_threads(_command))
del _command
