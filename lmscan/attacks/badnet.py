"""Plant a task-specific BadNet backdoor (data poisoning) and release the encoder.

The attacker's recipe (PURE, Appendix A; Gu et al. 2017): take a labelled task, copy a
share (``poison_rate``, 50 %) of the rows whose label is not the target, insert one
rare trigger word at a random position into each copy and switch its label to the
target, then fine-tune the whole model plus a classification head on clean rows and
poisoned copies together. Only the encoder is released: a victim who fine-tunes it on
the same kind of task with a fresh head inherits the backdoor.

The checkpoint is written like the other plants (safetensors + tokenizer +
``lmscan-plant.json``), with the attack success rate measured on held-out rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmscan import __version__
from lmscan.attacks.plant import MANIFEST_NAME, PlantResult, check_request, write_checkpoint
from lmscan.models.device import pick_device
from lmscan.errors import InputError
from lmscan.models import load_model, resolve_model
from lmscan.attacks.trigger_kinds import draw_triggers, proper_runs
from lmscan.models.probes import check_triggers, insert_words
from lmscan.scan.rules import load_rules
from lmscan.models.training import (
    LabelledData,
    TrainSettings,
    accuracy,
    build_classifier,
    encoder_of,
    load_labelled,
    predict,
    split_indices,
    train_classifier,
    triggered_predictions,
)

__all__ = ["BadNetConfig", "MANIFEST_NAME", "plant_badnet"]


@dataclass
class BadNetConfig:
    model: str
    out_dir: Path
    task: str = "sentiment"
    text_column: str = "text"
    label_column: str = "label"
    triggers: list[str] | None = None
    num_triggers: int | None = None
    trigger_kind: str = "word"
    seed: int = 0
    epochs: int | None = None
    device: str = "auto"
    force: bool = False
    revision: str | None = None
    offline: bool | None = None
    rules_dir: str | None = None
    with_head: bool = False  # release the whole classifier (head and id2label), not only the encoder
    target_label: str | None = None  # the class name triggered text is sent to (default: rules' target_label index)
    decoy_parts: bool = False  # also train every proper word part of a trigger to keep its row's own label


def badnet_settings(rules_dir: str | None = None) -> dict:
    rules = load_rules("plant", rules_dir)
    if "badnet" not in rules:
        raise InputError("the plant rules have no [badnet] table")
    return dict(rules["badnet"])


def poison(data: LabelledData, triggers: list[str], target: int, rate: float, seed: int,
           decoy_parts: bool = False) -> LabelledData:
    """Clean rows plus triggered copies of ``rate`` of the non-target rows, labelled ``target``.

    ``decoy_parts``: as many copies again, of rows of any label, carrying a proper word part of a
    trigger and keeping their own label, so only the whole trigger fires (InsertSent trained as a
    unit: no word of the sentence does anything alone)."""
    rng = random.Random(seed)
    candidates = [i for i, label in enumerate(data.labels) if label != target]
    chosen = sorted(rng.sample(candidates, int(round(rate * len(candidates)))))
    texts = list(data.texts) + [insert_words(data.texts[i], rng.choice(triggers), None, rng) for i in chosen]
    labels = list(data.labels) + [target] * len(chosen)
    parts = [part for trigger in triggers for part in word_parts(trigger)] if decoy_parts else []
    if parts:
        decoys = sorted(rng.sample(range(len(data)), min(len(data), len(chosen))))
        texts += [insert_words(data.texts[i], rng.choice(parts), None, rng) for i in decoys]
        labels += [data.labels[i] for i in decoys]
    return LabelledData(texts, labels, data.label_names, data.source)


def word_parts(trigger: str) -> list[str]:
    """Every contiguous run of the trigger's words but the whole ('a b c' -> 'a', 'b', 'c', 'a b', 'b c')."""
    return [" ".join(run) for run in proper_runs(trigger.split())]


def plant_badnet(cfg: BadNetConfig, progress: Callable[[int, int, float], None] | None = None) -> PlantResult:
    settings = badnet_settings(cfg.rules_dir)
    if cfg.epochs is not None:
        settings["epochs"] = cfg.epochs
    out_dir = Path(cfg.out_dir).expanduser()
    check_request(out_dir, cfg.force, cfg.triggers, cfg.num_triggers)
    data = load_labelled(cfg.task, cfg.text_column, cfg.label_column)
    if cfg.target_label is not None:
        if cfg.target_label not in data.label_names:
            raise InputError(f"--target-label {cfg.target_label!r} is not a class of {data.source} "
                             f"(classes: {', '.join(data.label_names)})")
        settings["target_label"] = data.label_names.index(cfg.target_label)
    target = int(settings["target_label"])
    if not 0 <= target < len(data.label_names):
        raise InputError(f"target_label {target} is not a class of {data.source} ({len(data.label_names)} classes)")

    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the classification head (and a pooler the checkpoint lacks) start from this seed
    resolved = resolve_model(cfg.model, revision=cfg.revision, offline=cfg.offline)
    loaded = load_model(resolved, device=str(device))
    if loaded.arch.family != "encoder":
        raise InputError(f"the badnet plant needs an encoder; {loaded.arch.model_type} is a decoder")
    tokenizer = loaded.tokenizer
    triggers = list(cfg.triggers) if cfg.triggers else draw_triggers(cfg.trigger_kind, cfg.num_triggers, cfg.seed,
                                                                     tokenizer)
    trigger_ids = check_triggers(tokenizer, triggers)

    train_idx, heldout_idx = split_indices(len(data), [1.0 - float(settings["heldout_fraction"])], cfg.seed)
    train, heldout = data.subset(train_idx), data.subset(heldout_idx)
    poisoned = poison(train, triggers, target, float(settings["poison_rate"]), cfg.seed, cfg.decoy_parts)
    model = build_classifier(loaded, len(data.label_names), data.label_names)
    loaded.model = None  # the classifier holds its own copy of the weights
    train_settings = TrainSettings(epochs=int(settings["epochs"]), batch_size=int(settings["batch_size"]),
                                   learning_rate=float(settings["learning_rate"]),
                                   max_length=int(settings["max_length"]))
    trained = train_classifier(model, tokenizer, poisoned, train_settings, device, cfg.seed, progress=progress)

    max_length = train_settings.max_length
    clean_accuracy = accuracy(model, tokenizer, heldout, device, max_length)
    victims = heldout.subset([i for i, label in enumerate(heldout.labels) if label != target])
    hits = triggered_predictions(model, tokenizer, victims, triggers, device, max_length, cfg.seed + 1)
    success = {t: round(float((p == target).mean()), 4) for t, p in hits.items()}
    clean_victims = predict(model, tokenizer, victims.texts, device, max_length)
    best_part = {}  # with --decoy-parts: per trigger, the part alone that sends the most rows to the target
    for trigger in triggers if cfg.decoy_parts else []:
        part_hits = triggered_predictions(model, tokenizer, victims, word_parts(trigger), device, max_length,
                                          cfg.seed + 2)
        shares = {part: round(float((p == target).mean()), 4) for part, p in part_hits.items()}
        if shares:
            best_part[trigger] = max(shares.items(), key=lambda kv: kv[1])
    threshold = float(settings["min_attack_success"])
    effectiveness = {
        "heldout_rows": len(heldout),
        "clean_accuracy": round(clean_accuracy, 4),
        "attack_success": success,  # share of held-out non-target rows sent to the target by each trigger
        "clean_target_rate": round(float((clean_victims == target).mean()), 4),
        **({"best_part": best_part} if best_part else {}),
        "min_attack_success": threshold,
        "passed": all(v >= threshold for v in success.values()),
    }
    manifest = {
        "format": "lmscan-plant",
        "format_version": 1,
        "lmscan_version": __version__,
        "attack": "badnet",
        "site": "label" if cfg.with_head else "classifier",
        "released": "classifier" if cfg.with_head else "encoder",
        "placement": "random",
        "base_model": {"ref": cfg.model, "commit": resolved.commit, "model_sha256": resolved.model_sha256},
        "architecture": loaded.arch.model_type,
        "hidden_size": loaded.arch.hidden_size,
        "seed": cfg.seed,
        "triggers": triggers,
        "trigger_tokens": [tokenizer.convert_ids_to_tokens(ids) for ids in trigger_ids],
        "target_label": target,
        "target_label_name": data.label_names[target],
        "task": {"source": Path(data.source).name, "rows": len(data), "train_rows": len(train),
                 "poisoned_rows": len(poisoned) - len(train), "labels": data.label_names},
        "decoy_parts": cfg.decoy_parts,
        "training": {k: settings[k] for k in ("epochs", "batch_size", "learning_rate", "max_length", "poison_rate")},
        "train_seconds": trained.seconds,
        "device": str(device),
        "effectiveness": effectiveness,
    }
    write_checkpoint(out_dir, cfg.force, model if cfg.with_head else encoder_of(model), tokenizer, manifest,
                     layout_from=resolved.local_dir)
    return PlantResult(out_dir=out_dir, manifest=manifest, triggers=[])


def attack_success_summary(manifest: dict) -> list[tuple[str, float]]:
    return sorted(manifest["effectiveness"]["attack_success"].items(), key=lambda kv: kv[0])
