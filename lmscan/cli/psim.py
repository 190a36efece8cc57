"""`lmscan psim train|filter`: PSIM, flag poisoned inputs by a reset-label classifier's confidence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmscan.cli.options import labelled_data_options, model_options, split_option, stderr, training_options
from lmscan.errors import InputError


@click.group()
def psim():
    """PSIM: flag poisoned inputs by the confidence of a PEFT classifier trained on reset labels."""


@psim.command("train")
@click.argument("model")
@labelled_data_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for the PSIM (adapter in peft format + psim.json).")
@click.option("--gamma", type=float, default=None, help="Confidence threshold for two classes (default 0.7).")
@click.option("--triggers", default=None, help="Comma-separated suspected triggers: report their flag rate.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default from rules/defenses.toml).")
@training_options
@model_options
def psim_train(model, train_file, text_column, label_column, out_dir, gamma, triggers, epochs, fmt, device, seed,
               rules_dir, force, revision, offline):
    """Train a PSIM for MODEL on clean labelled data whose labels are randomly reset."""
    from lmscan.defenses.peft_train import settings_from_rules
    from lmscan.defenses.psim import PsimConfig, train_psim
    from lmscan.report.progress import detector_progress

    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    config = settings_from_rules(PsimConfig, "psim", rules_dir, gamma=gamma, epochs=epochs)
    with detector_progress(stderr) as progress:
        result = train_psim(model, train_file, out_dir, config, text_column=text_column, label_column=label_column,
                            triggers=split_option(triggers) or [], device=device, seed=seed, force=force,
                            revision=revision, offline=offline, progress=progress)
    manifest = result.manifest
    stderr.print(f"wrote {result.out_dir} ({manifest['seconds']} s)")
    if fmt == "json":
        click.echo(json.dumps(manifest, indent=1))
        return
    cal = manifest["calibration"]
    click.echo(f"threshold {manifest['threshold']:.3f} (gamma {manifest['gamma']}, {manifest['num_labels']} classes): "
               f"{cal['clean_flag_rate']:.1%} of {cal['heldout_rows']} held-out clean rows flagged "
               f"(median confidence {cal['clean_confidence']['p50']:.3f})")
    for trigger, entry in cal.get("triggered", {}).items():
        click.echo(f"  {trigger!r}: {entry['flag_rate']:.1%} of the same rows flagged with the trigger inserted")


@psim.command("filter")
@click.argument("texts", nargs=-1)
@click.option("--psim", "psim_dir", type=click.Path(path_type=Path), required=True,
              help="Directory written by `lmscan psim train`.")
@click.option("--input", "input_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inputs: .txt (one per line), .jsonl or .csv (--text-column).")
@click.option("--text-column", default=None, help="Field/column holding the text in --input (default: text).")
@click.option("--gamma", type=float, default=None, help="Override the trained threshold (two-class scale).")
@click.option("--model", default=None, help="Base model to load (default: the one psim.json names).")
@click.option("--fail-on-flag", is_flag=True, help="Exit 1 when any input was flagged.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def psim_filter(texts, psim_dir, input_file, text_column, gamma, model, fail_on_flag, device):
    """Flag poisoned inputs: one JSON line per input on stdout. TEXTS are the inputs; "-" reads stdin."""
    from lmscan.defenses.psim import PsimFilter
    from lmscan.models.probes import read_inputs

    inputs = read_inputs(texts, input_file, text_column)
    flt = PsimFilter.load(psim_dir, device=device, gamma=gamma, model=model)
    flagged = 0
    for start in range(0, len(inputs), 64):
        batch = inputs[start : start + 64]
        for offset, (text, verdict) in enumerate(zip(batch, flt.check(batch))):
            flagged += verdict.flagged
            click.echo(json.dumps({"index": start + offset, "flagged": verdict.flagged,
                                   "confidence": verdict.confidence, "label": verdict.label, "text": text},
                                  ensure_ascii=False))
    stderr.print(f"{len(inputs)} input(s), {flagged} flagged (confidence > {flt.threshold:.3f})")
    sys.exit(1 if fail_on_flag and flagged else 0)
