"""Click commands of the training-time defences: `lmscan finetune` and `lmscan psim train|filter`.

Registered on the main group at the end of ``lmscan/cli.py``; errors raised here as
``InputError`` become one line on stderr and exit 2 through the group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmscan.cli_options import model_options, training_options
from lmscan.errors import InputError


def _stderr():
    from rich.console import Console  # noqa: PLC0415

    return Console(stderr=True)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _data_options(func):
    func = click.option("--label-column", default="label", show_default=True, help="Column/field with the label.")(func)
    func = click.option("--text-column", default="text", show_default=True, help="Column/field with the text.")(func)
    func = click.option("--train", "train_file", required=True,
                        help='Labelled data (.csv, .tsv or .jsonl), or "sentiment" for the bundled task.')(func)
    return func


@click.command()
@click.argument("model")
@_data_options
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
    import dataclasses  # noqa: PLC0415

    from lmscan.defenses.obliviate import ObliviateConfig  # noqa: PLC0415
    from lmscan.defenses.peft_train import PeftSettings, finetune as run_finetune, settings_from_rules  # noqa: PLC0415
    from lmscan.report.progress import detector_progress  # noqa: PLC0415

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
        from lmscan.defenses.muscle_lora import MuscleLoraConfig  # noqa: PLC0415

        muscle = settings_from_rules(MuscleLoraConfig, "muscle_lora", rules_dir, epochs=epochs)
    stderr = _stderr()
    with detector_progress(stderr) as progress:
        result = run_finetune(model, train_file, out_dir, defense=defense, text_column=text_column,
                              label_column=label_column, validation=validation_file, test=test_file,
                              triggers=_split(triggers), pvs=pvs_file, settings=settings, obliviate=obliviate,
                              muscle=muscle, device=device, seed=seed, force=force, revision=revision,
                              offline=offline, progress=progress)
    report = result.report
    stderr.print(f"wrote {result.out_dir} ({report['seconds']} s)")
    if fmt == "json":
        click.echo(json.dumps(report, indent=1))
    else:
        _print_finetune(report)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _print_finetune(report: dict) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    metrics = report["metrics"]
    console = Console()
    if "attack_success" not in metrics:
        console.print(f"{report['peft']} fine-tune ({report['defense']}) of {report['model']['ref']}: "
                      f"clean accuracy {_pct(metrics['accuracy'])} on {report['data']['rows']['test']} test rows")
        return
    table = Table(title=f"{report['peft']} fine-tune of {report['model']['ref']}: plain vs {report['defense']}")
    table.add_column("")
    table.add_column(f"plain {report['peft']}", justify="right")
    table.add_column(report["defense"], justify="right")
    table.add_row("clean accuracy (test)", _pct(metrics["accuracy_plain"]), _pct(metrics["accuracy"]))
    table.add_row("attack success (any trigger)", _pct(metrics["attack_success_plain"]),
                  _pct(metrics["attack_success"]))
    for trigger, entry in metrics["per_trigger"].items():
        table.add_row(f"  {trigger!r} -> {entry['target']!r}", _pct(entry["plain"]), _pct(entry["defended"]))
    console.print(table)
    settings = report.get("defense_settings") or {}
    if "lambda_amp" in settings:
        console.print(f"lambda_amp {settings['lambda_amp']:g}, lambda_reg {settings['lambda_reg']:g}"
                      + ("" if not settings.get("select") else
                         f" (chosen from {len(settings['tried'])} tried, validation bar {settings['accuracy_bar']:.3f})"))


@click.group()
def psim():
    """PSIM: flag poisoned inputs by the confidence of a PEFT classifier trained on reset labels."""


@psim.command("train")
@click.argument("model")
@_data_options
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
    from lmscan.defenses.peft_train import settings_from_rules  # noqa: PLC0415
    from lmscan.defenses.psim import PsimConfig, train_psim  # noqa: PLC0415
    from lmscan.report.progress import detector_progress  # noqa: PLC0415

    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    config = settings_from_rules(PsimConfig, "psim", rules_dir, gamma=gamma, epochs=epochs)
    stderr = _stderr()
    with detector_progress(stderr) as progress:
        result = train_psim(model, train_file, out_dir, config, text_column=text_column, label_column=label_column,
                            triggers=_split(triggers), device=device, seed=seed, force=force, revision=revision,
                            offline=offline, progress=progress)
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
    from lmscan.defenses.psim import PsimFilter  # noqa: PLC0415
    from lmscan.probes import read_inputs  # noqa: PLC0415

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
    _stderr().print(f"{len(inputs)} input(s), {flagged} flagged (confidence > {flt.threshold:.3f})")
    sys.exit(1 if fail_on_flag and flagged else 0)
