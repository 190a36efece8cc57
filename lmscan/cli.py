"""Command-line interface: parse, call the Python API, render, exit.

stdout carries only the final report (or machine output); progress, logs and
errors go to stderr. Exit codes: 0 clean, 1 finding / failed check, 2 error or
usage, 3 could not assess.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console

from lmscan import __version__
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


def _model_options(func):
    func = click.option("--revision", default=None, help="Hub revision (branch, tag or commit); or use ID@REV.")(func)
    func = click.option("--offline", is_flag=True, default=None, help="Never touch the network; use the HF cache.")(func)
    return func


@main.command()
@click.argument("model")
@click.option("--attack", type=click.Choice(["por", "neuba", "btop"]), required=True, help="Backdoor style to plant.")
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
@_model_options
def plant(model, attack, triggers, num_triggers, out_dir, seed, scale_embeddings, pv_design, steps, device, force,
          rules_dir, revision, offline):
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


if __name__ == "__main__":  # pragma: no cover
    main()
