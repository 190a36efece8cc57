"""PEFT primitives for `lmscan finetune` and `lmscan psim`: settings, the PEFT model, data
splits, the frozen base, training, attack success, saving and loading the adapter.

The base model stays frozen; only the PEFT weights (``peft`` LoRA by default: r = 16, α = 16
on the query and value projections, the Obliviate paper's setting) and a new classification
head train. Defences plug into the shared loop of ``lmscan.models.training.train_classifier``; the
run that picks one is ``lmscan.defenses.finetune`` (kept apart so this module imports no
defence).

``--peft adapter`` and ``--peft prefix`` are refused with one line: peft has no bottleneck
(Houlsby) adapter, and its prefix tuning needs an encoder that takes past key values, which
transformers 5's BERT-style encoders do not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmscan.errors import InputError
from lmscan.scan.rules import load_rules
from lmscan.models.training import (
    LabelledData,
    TrainResult,
    TrainSettings,
    build_classifier,
    infer_target,
    label_flip_rate,
    load_labelled,
    predict,
    split_indices,
    train_classifier,
    triggered_predictions,
)

PEFT_KINDS = ("lora", "adapter", "prefix")

Progress = Callable[[str, int, int, str], None]  # (phase, done, total, info)


@dataclass
class PeftSettings:
    """The PEFT module and the training schedule (``[peft]`` in rules/defenses.toml)."""

    kind: str = "lora"
    r: int = 16
    alpha: int = 16
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0
    prefix_tokens: int = 16  # --peft prefix (refused on BERT-style encoders, see the module doc)
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-4
    max_length: int = 48
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    eval_batch_size: int = 64

    def __post_init__(self):
        self.targets = tuple(self.targets)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                             max_length=self.max_length, eval_batch_size=self.eval_batch_size)


def settings_from_rules(cls, section: str, rules_dir: str | Path | None = None, **override):
    """A config dataclass from one table of rules/defenses.toml (unknown keys are a rules error)."""
    from lmscan.scan.rules import dataclass_from  # noqa: PLC0415

    rules = load_rules("defenses", rules_dir)
    if section not in rules:
        raise InputError(f"the defenses rules have no [{section}] table")
    config = dataclass_from(cls, dict(rules[section]))
    return dataclasses.replace(config, **{k: v for k, v in override.items() if v is not None})


def check_settings(settings: PeftSettings) -> None:
    if settings.kind not in PEFT_KINDS:
        raise InputError(f"--peft {settings.kind!r}: expected one of {', '.join(PEFT_KINDS)}")
    for name in ("r", "alpha", "epochs", "batch_size", "max_length", "eval_batch_size"):
        if getattr(settings, name) < 1:
            raise InputError(f"PEFT setting {name} must be >= 1, got {getattr(settings, name)}")
    if settings.learning_rate <= 0:
        raise InputError(f"PEFT learning_rate must be > 0, got {settings.learning_rate}")


# --- the PEFT model ---------------------------------------------------------------------------


def attach_peft(classifier, settings: PeftSettings, rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, int] | None = None):
    """Wrap a sequence classifier in a peft model; only the PEFT weights and the head train."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model  # noqa: PLC0415

    check_settings(settings)
    if settings.kind == "adapter":
        raise InputError("--peft adapter: the peft library has no bottleneck (Houlsby) adapter; use --peft lora")
    if settings.kind == "prefix":
        config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=settings.prefix_tokens,
                                    prefix_projection=True, encoder_hidden_size=classifier.config.hidden_size)
        model = get_peft_model(classifier, config)
        import inspect  # noqa: PLC0415

        backbone = model.base_model.get_submodule(model.transformer_backbone_name)
        if "past_key_values" not in inspect.signature(backbone.forward).parameters:
            raise InputError(f"--peft prefix: peft's prefix tuning needs an encoder that takes past key values, "
                             f"and this {classifier.config.model_type} encoder does not; use --peft lora")
        return model
    present = {name.rsplit(".", 1)[-1] for name, _ in classifier.named_modules()}
    missing = [t for t in settings.targets if t.rsplit(".", 1)[-1] not in present]
    if missing:
        raise InputError(f"LoRA target module(s) {', '.join(missing)} not found in this "
                         f"{classifier.config.model_type} model")
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=settings.r, lora_alpha=settings.alpha,
                        target_modules=list(settings.targets), lora_dropout=settings.dropout,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    return get_peft_model(classifier, config)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def peft_weight_matrices(model) -> list[torch.Tensor]:
    """The PEFT layers' own weight matrices: LoRA's A and B, the prefix re-parametrisation (no head)."""
    out = []
    for name, param in model.named_parameters():
        if param.dim() != 2:
            continue
        if ".lora_A." in name or ".lora_B." in name or "prompt_encoder" in name:
            out.append(param)
    return out


# --- data and model ---------------------------------------------------------------------------


@dataclass
class Splits:
    train: LabelledData
    validation: LabelledData
    test: LabelledData
    label_names: list[str]


def load_splits(train: str | Path, text_column: str, label_column: str, settings: PeftSettings, seed: int,
                validation: str | Path | None = None, test: str | Path | None = None) -> Splits:
    """--train split (seeded) into train / validation / test, unless --validation / --test give those."""
    data = load_labelled(train, text_column, label_column)
    names = data.label_names
    val_data = None if validation is None else load_labelled(validation, text_column, label_column, label_names=names)
    test_data = None if test is None else load_labelled(test, text_column, label_column, label_names=names)
    fractions = []
    if val_data is None:
        fractions.append(settings.validation_fraction)
    if test_data is None:
        fractions.append(settings.test_fraction)
    parts = split_indices(len(data), fractions, seed)
    train_part = data.subset(parts[-1])
    cut = iter(parts[:-1])
    val_data = val_data if val_data is not None else data.subset(next(cut))
    test_data = test_data if test_data is not None else data.subset(next(cut))
    for name, part in (("train", train_part), ("validation", val_data), ("test", test_data)):
        if len(part) < 2:
            raise InputError(f"too few rows for a {name} split ({len(part)}); give more data")
    if len(set(train_part.labels)) < 2:
        raise InputError("the train split holds a single class; give more data of each class")
    return Splits(train_part, val_data, test_data, names)


@dataclass
class Base:
    """The frozen encoder a PEFT classifier is built on."""

    loaded: object
    resolved: object
    device: torch.device
    ref: str

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def classifier(self, num_labels: int, label_names: Sequence[str], seed: int):
        torch.manual_seed(seed)  # the new head starts from the seed
        return build_classifier(self.loaded, num_labels, label_names)

    def identity(self) -> dict:
        ref = str(self.resolved.local_dir) if self.resolved.kind == "local" else self.ref
        return {"ref": ref, "kind": self.resolved.kind, "commit": self.resolved.commit,
                "model_sha256": self.resolved.model_sha256, "architecture": self.loaded.arch.model_type}


def load_base(model: str, device: str = "auto", seed: int = 0, revision: str | None = None,
              offline: bool | None = None, what: str = "finetune") -> Base:
    from lmscan.models.device import pick_device  # noqa: PLC0415
    from lmscan.models import load_model, resolve_model  # noqa: PLC0415

    torch_device = pick_device(device)
    torch.manual_seed(seed)  # a pooler the checkpoint lacks is initialised from the seed
    resolved = resolve_model(model, revision=revision, offline=offline)
    loaded = load_model(resolved, device=str(torch_device))
    if loaded.arch.family != "encoder":
        raise InputError(f"{what} needs an encoder classifier; {loaded.arch.model_type} is a decoder")
    return Base(loaded, resolved, torch_device, model)


def train_peft(model, base: Base, train: LabelledData, settings: PeftSettings, seed: int,
               validation: LabelledData | None = None, extra_loss=None, before_step=None,
               progress: Progress | None = None, phase: str = "train", stop=None) -> TrainResult:
    bar = None if progress is None else (lambda done, total, loss: progress(phase, done, total, f"loss {loss:.4f}"))
    parameters = trainable_parameters(model)
    result = train_classifier(model, base.tokenizer, train, settings.train_settings(), base.device, seed,
                              validation=validation, extra_loss=extra_loss, before_step=before_step, progress=bar,
                              parameters=parameters, stop=stop)
    for param in parameters:  # train_classifier freezes everything at the end; the adapter may train again
        param.requires_grad_(True)
    return result


# --- attack success ---------------------------------------------------------------------------


def attack_success(models: dict[str, object], tokenizer, test: LabelledData, triggers: Sequence[str], device,
                   max_length: int, seed: int, batch_size: int = 64, reference: str | None = None) -> dict:
    """Per trigger: the label it forces (inferred from ``reference``'s predictions, else from each
    model's own) and the share of correctly classified rows of other classes it flips there.

    A task-agnostic backdoor (POR) sends each trigger to a label of its own, so the target is
    inferred per trigger. ``any`` is the paper's ASR: the share of rows eligible for some trigger
    that at least one trigger flips to its label; ``mean`` averages the triggers (AASR), ``max``
    is the strongest trigger (MASR)."""
    num_labels = len(test.label_names)
    labels = np.asarray(test.labels)
    clean, hit, seen = {}, {}, {}
    for name, m in models.items():
        if id(m) in seen:  # the same model under two names (plain PEFT as its own "defence")
            clean[name], hit[name] = clean[seen[id(m)]], hit[seen[id(m)]]
            continue
        seen[id(m)] = name
        clean[name] = predict(m, tokenizer, test.texts, device, max_length, batch_size)
        hit[name] = triggered_predictions(m, tokenizer, test, list(triggers), device, max_length, seed, batch_size)
    out: dict = {}
    for name in models:
        source = hit[reference] if reference is not None else hit[name]
        per = {}
        eligible = np.zeros(len(labels), dtype=bool)
        flipped = np.zeros(len(labels), dtype=bool)
        for trigger in triggers:
            target = infer_target({trigger: source[trigger]}, num_labels)
            flips = label_flip_rate(clean[name], {trigger: hit[name][trigger]}, labels, target)
            per[trigger] = {"target": target, "target_name": test.label_names[target], "asr": flips["lfr"],
                            "rows": flips["rows"]}
            rows = (labels != target) & (clean[name] == labels)
            eligible |= rows
            flipped |= rows & (hit[name][trigger] == target)
        rates = [v["asr"] for v in per.values() if v["asr"] is not None]
        out[name] = {"any": round(float(flipped.sum() / eligible.sum()), 5) if eligible.any() else None,
                     "mean": round(float(np.mean(rates)), 5) if rates else None,
                     "max": round(float(np.max(rates)), 5) if rates else None, "per_trigger": per,
                     "accuracy": round(float((clean[name] == labels).mean()), 5)}
    return out


# --- output -----------------------------------------------------------------------------------


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"--out {out_dir}: directory exists and is not empty (use --force to replace it)")


def write_adapter(model, base: Base, out_dir: Path, report_name: str, report: dict) -> None:
    """Save the adapter in peft's format (head included), the tokenizer and the report, replacing OUT."""
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():  # peft looks for the base model's config.json on the Hub; irrelevant here
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out_dir))
    card = out_dir / "README.md"  # peft's placeholder model card; the report documents the run
    if card.is_file():
        card.unlink()
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base.identity()["ref"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    base.tokenizer.save_pretrained(str(out_dir))
    (out_dir / report_name).write_text(json.dumps(report, indent=2) + "\n")


def load_adapter(base: Base, adapter_dir: Path, num_labels: int, label_names: Sequence[str], seed: int):
    """A classifier on ``base`` with the saved adapter (and head) of ``adapter_dir``, in eval mode."""
    from peft import PeftModel  # noqa: PLC0415

    classifier = base.classifier(num_labels, label_names, seed)
    model = PeftModel.from_pretrained(classifier, str(adapter_dir))
    model.eval()
    return model
