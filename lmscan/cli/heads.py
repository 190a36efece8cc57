"""`lmscan heads`: which attention heads a candidate trigger hijacks (PURE's profile)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from lmscan.cli.options import model_options, split_option, stderr
from lmscan.errors import LmscanError


@click.command()
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
    from lmscan.api import ScanConfig, run_one
    from lmscan.detectors.attention import heatmap_svg
    from lmscan.models.probes import load_builtin_probes
    from lmscan.report.tables import print_heads

    if plot is not None and plot.suffix.lower() != ".svg":
        raise LmscanError(f"--plot writes SVG: give a file ending in .svg, not {plot.name}")
    candidates = split_option(triggers) or []
    if pvs_file is not None:
        from lmscan.pv.pvs_file import read_pvs

        candidates += [p.triggers[0]["text"] for p in read_pvs(pvs_file).pvs if p.triggers]
    candidates = list(dict.fromkeys(candidates))
    config = ScanConfig(model=model, revision=revision, offline=offline, device=device, seed=seed, rules_dir=rules_dir)
    # The whole built-in corpus: the detector samples its profiling sentences from it.
    run = run_one(config, "attention", fit=load_builtin_probes(), candidates=candidates)
    threshold = run.stats["z_threshold"]
    scores = {t: np.asarray(r) for t, r in run.stats["triggers"].items()}
    strongest = max(scores, key=lambda t: scores[t].max()) if scores else None
    if plot is not None:
        matrix = scores[strongest] if strongest else np.asarray(run.stats["clean_variance"])
        title = (f"{model}: drift of {strongest!r} per head, z-score against random words" if strongest
                 else f"{model}: clean [CLS] attention variance")
        plot.write_text(heatmap_svg(matrix, title), encoding="utf-8")
        stderr.print(f"wrote {plot}")
    if fmt == "json":
        click.echo(json.dumps({"model": model, "threshold": threshold, "stats": run.stats,
                               "findings": [f.message for f in run.findings],
                               "hijacked": [f.evidence for f in run.findings]}, indent=1))
    else:
        print_heads(run, scores, strongest, threshold)
    sys.exit(1 if run.findings else 0)
