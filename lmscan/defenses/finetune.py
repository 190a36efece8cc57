"""`lmscan finetune`: PEFT fine-tuning of a suspect encoder, plain or with a backdoor defence.

The run on top of the primitives in ``lmscan.defenses.peft_train``; it lives apart from them
so that obliviate and muscle_lora can build on peft_train without importing each other in a
circle. Defences:

* ``none``         plain PEFT;
* ``obliviate``    (seed 000) an extra loss that amplifies the PEFT weights and shrinks the
                   [CLS] attention rows (``lmscan.defenses.obliviate``);
* ``muscle-lora``  (seed 003) LoRA on every attention projection, multi-scale LoRA in the
                   penultimate layer and gradients aligned to a small clean set
                   (``lmscan.defenses.muscle_lora``), for training on data that may be poisoned.

With suspected triggers the run also trains plain PEFT with the same seed and reports the
attack success before (plain) and after (defended). Output: the adapter in peft's own format
(``adapter_config.json`` + ``adapter_model.safetensors``, the classification head included),
the tokenizer, and ``finetune-report.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmscan import __version__
from lmscan.defenses.muscle_lora import MuscleLoraConfig, fold_scales, train_muscle_lora
from lmscan.defenses.obliviate import ObliviateConfig, train_obliviate
from lmscan.defenses.peft_train import (
    Base,
    PeftSettings,
    Progress,
    Splits,
    attach_peft,
    attack_success,
    check_out_dir,
    check_settings,
    load_base,
    load_splits,
    settings_from_rules,
    train_peft,
    write_adapter,
)
from lmscan.errors import InputError
from lmscan.models.probes import check_triggers
from lmscan.pv.pvs_file import trigger_words
from lmscan.models.training import TrainResult, accuracy

REPORT_NAME = "finetune-report.json"
DEFENSES = ("none", "obliviate", "muscle-lora")


def triggers_from(triggers: Sequence[str] | None, pvs: str | Path | None) -> list[str]:
    words = [t.strip() for t in (triggers or []) if t.strip()]
    if pvs is not None:
        words += trigger_words(pvs)
    return list(dict.fromkeys(words))


@dataclass
class FinetuneResult:
    out_dir: Path
    report: dict
    model: object = None  # the defended peft model (for the Python API)


def finetune(model: str, train: str | Path, out_dir: str | Path, *, defense: str = "none",
             peft: str | None = None, text_column: str = "text", label_column: str = "label",
             validation: str | Path | None = None, test: str | Path | None = None,
             triggers: Sequence[str] | None = None, pvs: str | Path | None = None, settings: PeftSettings | None = None,
             obliviate=None, muscle=None, rules_dir: str | Path | None = None, device: str = "auto", seed: int = 0,
             force: bool = False, revision: str | None = None, offline: bool | None = None,
             progress: Progress | None = None) -> FinetuneResult:
    """PEFT-fine-tune ``model`` on ``train`` with ``defense``; write the adapter and a report to ``out_dir``."""
    started = time.perf_counter()
    if defense not in DEFENSES:
        raise InputError(f"--defense {defense!r}: expected one of {', '.join(DEFENSES)}")
    settings = settings or settings_from_rules(PeftSettings, "peft", rules_dir)
    if peft is not None:
        settings = dataclasses.replace(settings, kind=peft)
    check_settings(settings)
    if defense == "muscle-lora" and settings.kind != "lora":
        raise InputError(f"--defense muscle-lora is built on LoRA; it cannot run with --peft {settings.kind}")
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, force)
    trigger_list = triggers_from(triggers, pvs)
    splits = load_splits(train, text_column, label_column, settings, seed, validation, test)
    base = load_base(model, device, seed, revision, offline)
    if trigger_list:
        check_triggers(base.tokenizer, trigger_list)
    num_labels = len(splits.label_names)
    # Fail on a PEFT kind that cannot work before anything trains.
    attach_peft(base.classifier(num_labels, splits.label_names, seed), settings)

    runs: dict[str, dict] = {}
    models: dict[str, object] = {}

    def plain():
        if "plain" not in models:
            m = attach_peft(base.classifier(num_labels, splits.label_names, seed), settings)
            trained = train_peft(m, base, splits.train, settings, seed, splits.validation, progress=progress,
                                 phase=f"plain {settings.kind}")
            models["plain"] = m
            runs["plain"] = _run_entry(m, base, splits, settings, trained)
        return models["plain"]

    defense_info: dict = {}
    if defense == "none":
        defended = plain()
    elif defense == "obliviate":
        obliviate = obliviate or settings_from_rules(ObliviateConfig, "obliviate", rules_dir)
        defended, trained, defense_info = train_obliviate(base, splits, settings, obliviate, seed, plain,
                                                          progress=progress)
        runs["defended"] = _run_entry(defended, base, splits, settings, trained)
    else:
        muscle = muscle or settings_from_rules(MuscleLoraConfig, "muscle_lora", rules_dir)
        defended, trained, defense_info = train_muscle_lora(base, splits, settings, muscle, seed, progress=progress)
        runs["defended"] = _run_entry(defended, base, splits, settings, trained)
    if defense == "none":
        runs["defended"] = runs["plain"]

    metrics = {"accuracy": runs["defended"]["test_accuracy"]}
    if trigger_list:
        compare = {"plain": plain(), "defended": defended}
        success = attack_success(compare, base.tokenizer, splits.test, trigger_list, base.device, settings.max_length,
                                 seed + 3, settings.eval_batch_size, reference="plain")
        metrics.update({
            "accuracy_plain": success["plain"]["accuracy"],
            "attack_success_plain": success["plain"]["any"], "attack_success": success["defended"]["any"],
            "attack_success_mean_plain": success["plain"]["mean"], "attack_success_mean": success["defended"]["mean"],
            "attack_success_max_plain": success["plain"]["max"], "attack_success_max": success["defended"]["max"],
            "per_trigger": {t: {"target": success["plain"]["per_trigger"][t]["target_name"],
                                "plain": success["plain"]["per_trigger"][t]["asr"],
                                "defended": success["defended"]["per_trigger"][t]["asr"]} for t in trigger_list},
        })
    if defense == "muscle-lora":
        fold_scales(defended)  # the saved adapter is an ordinary LoRA adapter
    report = {
        "format": "lmscan-finetune", "format_version": 1, "lmscan_version": __version__,
        "defense": defense, "peft": settings.kind, "model": base.identity(),
        "data": {"train": str(train), "validation": None if validation is None else str(validation),
                 "test": None if test is None else str(test), "text_column": text_column,
                 "label_column": label_column, "labels": splits.label_names,
                 "rows": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)}},
        "settings": dataclasses.asdict(settings), "defense_settings": defense_info, "seed": seed,
        "device": str(base.device), "triggers": trigger_list, "metrics": metrics, "runs": runs,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_adapter(defended, base, out_dir, REPORT_NAME, report)
    return FinetuneResult(out_dir=out_dir, report=report, model=defended)


def _run_entry(model, base: Base, splits: Splits, settings: PeftSettings, trained: TrainResult) -> dict:
    return {"test_accuracy": round(accuracy(model, base.tokenizer, splits.test, base.device, settings.max_length,
                                            settings.eval_batch_size), 5),
            "history": trained.history, "best_epoch": trained.best_epoch, "seconds": trained.seconds}
