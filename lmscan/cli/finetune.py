"""`lmscan finetune`: PEFT fine-tuning, plain or defended (Obliviate, MuScleLoRA)."""

from __future__ import annotations

from pathlib import Path

import click

from lmscan.cli.options import emit_training_report, labelled_data_options, model_options, split_option, stderr, training_options
from lmscan.errors import InputError


@click.command()
@click.argument("model")
@labelled_data_options
@click.option("--peft", "peft_kind", type=click.Choice(["lora", "adapter", "prefix"]), default=None,
              help="PEFT module (default: lora, r 16, alpha 16 on query/value; see rules/defenses.toml).")
@click.option("--defense", type=click.Choice(["none", "obliviate", "muscle-lora"]), default="none",
              show_default=True, help="obliviate: suspect weights; muscle-lora: suspect training data.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for the adapter (peft format) and finetune-report.json.")
@click.option("--validation", "validation_file", default=None,
              help="Clean validation data (same columns; muscle-lora takes its clean set from it). "
                   "Default: a split of --train.")
@click.option("--test", "test_file", default=None, help="Clean test data for the report. Default: a split of --train.")
@click.option("--triggers", default=None, help="Comma-separated suspected triggers: report attack success against "
                                               "plain PEFT with the same seed.")
@click.option("--pvs", "pvs_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take suspected triggers from a .pvs file (the first trigger of each PV).")
@click.option("--select-lambdas", is_flag=True,
              help="obliviate: pick the largest lambdas within 2 points of plain PEFT's validation accuracy.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default from rules/defenses.toml).")
@training_options
@model_options
def finetune(model, train_file, text_column, label_column, peft_kind, defense, out_dir, validation_file, test_file,
             triggers, pvs_file, select_lambdas, epochs, fmt, device, seed, rules_dir, force, revision, offline):
    """Parameter-efficient fine-tuning of MODEL on --train, optionally with a backdoor defence.

    The encoder stays frozen; a PEFT adapter and a new classification head train. With
    --triggers or --pvs, plain PEFT is trained too (same seed) and the report gives the
    attack success of each trigger before (plain) and after (defended)."""
    import dataclasses

    from lmscan.defenses.finetune import finetune as run_finetune
    from lmscan.defenses.obliviate import ObliviateConfig
    from lmscan.defenses.peft_train import PeftSettings, settings_from_rules
    from lmscan.report.progress import detector_progress
    from lmscan.report.tables import print_finetune

    if select_lambdas and defense != "obliviate":
        raise InputError("--select-lambdas only applies to --defense obliviate")
    if defense == "muscle-lora" and peft_kind not in (None, "lora"):
        raise InputError(f"--defense muscle-lora is built on LoRA; it cannot run with --peft {peft_kind}")
    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    settings = settings_from_rules(PeftSettings, "peft", rules_dir, kind=peft_kind, epochs=epochs)
    obliviate = settings_from_rules(ObliviateConfig, "obliviate", rules_dir)
    if select_lambdas:
        obliviate = dataclasses.replace(obliviate, select=True)
    muscle = None
    if defense == "muscle-lora":
        from lmscan.defenses.muscle_lora import MuscleLoraConfig

        muscle = settings_from_rules(MuscleLoraConfig, "muscle_lora", rules_dir, epochs=epochs)
    with detector_progress(stderr) as progress:
        result = run_finetune(model, train_file, out_dir, defense=defense, text_column=text_column,
                              label_column=label_column, validation=validation_file, test=test_file,
                              triggers=split_option(triggers) or [], pvs=pvs_file, settings=settings,
                              obliviate=obliviate, muscle=muscle, device=device, seed=seed, force=force,
                              revision=revision, offline=offline, progress=progress)
    report = emit_training_report(result, fmt, print_finetune)
