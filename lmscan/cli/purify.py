"""`lmscan purify`: PURE head pruning plus attention normalisation on the defender's data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmscan.cli.options import emit_training_report, model_options, split_option, stderr, training_options


@click.command()
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
    from lmscan.scan.rules import dataclass_from
    from lmscan.defenses.purify import PurifyConfig, purify as run_purify
    from lmscan.report.progress import detector_progress
    from lmscan.report.tables import print_purify
    from lmscan.scan.rules import load_rules

    config = dataclass_from(PurifyConfig, load_rules("purify", rules_dir))
    if threshold is not None:
        config.threshold = threshold
    if relative:
        config.relative = True
    with detector_progress(stderr) as progress:
        result = run_purify(model, train_file, out_dir, config, text_column=text_column, label_column=label_column,
                            validation=validation_file, triggers=split_option(triggers), pvs=pvs_file, device=device,
                            seed=seed, force=force, revision=revision, offline=offline, progress=progress)
    report = emit_training_report(result, fmt, print_purify)
    utility = report["utility"]
    if not utility["ok"]:
        click.echo(f"lmscan: purify: the purified model's validation accuracy {utility['validation_accuracy']:.3f} "
                   f"is below the bar {utility['bar']:.3f}; try more purify_epochs, a smaller mu or a higher "
                   "--threshold (rules/purify.toml)", err=True)
        sys.exit(1)
