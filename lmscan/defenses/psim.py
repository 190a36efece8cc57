"""PSIM (seed 001): a Poisoned Sample Identification Module for inference time.

Train, on the defender's clean labelled data (the suspect encoder stays frozen):
1. the victim model: a PEFT classifier (LoRA + new head) fine-tuned on the true labels for
   ``task_epochs``. The paper starts from a poisoned *classifier*; a suspect encoder with a
   fresh head needs this step to have one (with a fresh head on reset labels alone, clean and
   triggered inputs both sat at 0.54 confidence on a BadNet-planted MiniLM);
2. PSIM: the adapter keeps training, head frozen, on the same rows with every label *randomly
   reset* (uniform over the classes, seeded). Shuffled labels unlearn the clean mapping, so
   clean confidence falls towards chance, while a trigger keeps pushing towards its target.
   Training stops as soon as the ``stop_quantile`` of the confidence on a clean calibration
   split is at or below the threshold (checked every ``check_every`` steps): trained on to
   the end, the reset labels erase the trigger's push as well (on the BadNet MiniLM, clean and
   triggered confidence both reached ≈ 0.51 within one epoch).

Filter: an input whose highest class probability exceeds the threshold is flagged as
poisoned. The paper's γ = 0.7 is for two classes; for K classes the same share of the
distance between chance and certainty is used: threshold = 1/K + (1 − 1/K)·(γ − ½)/½.

``psim train`` writes the adapter (peft format), the tokenizer and ``psim.json`` (base model,
classes, threshold, settings, and the flag rate on held-out clean rows); ``psim filter`` and
``PsimFilter`` read them back.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmscan import __version__
from lmscan.errors import InputError

MANIFEST_NAME = "psim.json"


@dataclass
class PsimConfig:
    gamma: float = 0.7  # confidence threshold for two classes (paper: 0.7)
    kind: str = "lora"
    r: int = 16
    alpha: int = 16
    targets: tuple[str, ...] = ("query", "value")
    task_epochs: int = 1  # first fine-tune on the true labels (the victim model), then:
    epochs: int = 1  # at most this many epochs on randomly reset labels (the adapter only)
    stop_quantile: float = 0.95  # stop once this quantile of clean calibration confidence <= threshold
    check_every: int = 2  # steps between calibration checks
    calibration_fraction: float = 0.1  # clean rows for the stopping rule (apart from the held-out rows)
    batch_size: int = 32
    learning_rate: float = 5e-4
    max_length: int = 48
    heldout_fraction: float = 0.15  # clean rows kept out of training to report the clean flag rate
    eval_batch_size: int = 64

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if not 0.5 <= self.gamma < 1.0:
            raise InputError(f"psim gamma must be in [0.5, 1), got {self.gamma}")

    def peft_settings(self):
        from lmscan.defenses.peft_train import PeftSettings  # noqa: PLC0415

        return PeftSettings(kind=self.kind, r=self.r, alpha=self.alpha, targets=self.targets, epochs=self.epochs,
                            batch_size=self.batch_size, learning_rate=self.learning_rate, max_length=self.max_length,
                            eval_batch_size=self.eval_batch_size)


def scaled_threshold(gamma: float, num_labels: int) -> float:
    """γ is for two classes; keep the same fraction of the way from chance (1/K) to certainty."""
    chance = 1.0 / num_labels
    return chance + (1.0 - chance) * (gamma - 0.5) / 0.5


def reset_labels(labels: Sequence[int], num_labels: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(num_labels) for _ in labels]


def confidences(model, tokenizer, texts: Sequence[str], device, max_length: int,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(highest class probability, its class) per text."""
    from lmscan.models.training import predict_logits  # noqa: PLC0415

    logits = predict_logits(model, tokenizer, texts, device, max_length, batch_size)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    return probs.max(axis=1), probs.argmax(axis=1)


@dataclass
class PsimResult:
    out_dir: Path
    manifest: dict


def train_psim(model: str, train: str | Path, out_dir: str | Path, config: PsimConfig | None = None, *,
               text_column: str = "text", label_column: str = "label", triggers: Sequence[str] | None = None,
               device: str = "auto", seed: int = 0, force: bool = False, revision: str | None = None,
               offline: bool | None = None, rules_dir: str | Path | None = None, progress=None) -> PsimResult:
    """Train a PSIM for ``model`` on clean labelled ``train`` data; write it to ``out_dir``."""
    from lmscan.defenses.peft_train import (  # noqa: PLC0415
        attach_peft,
        check_out_dir,
        load_base,
        settings_from_rules,
        train_peft,
        write_adapter,
    )
    from lmscan.models.probes import check_triggers, insert_words  # noqa: PLC0415
    from lmscan.models.training import LabelledData, load_labelled, split_indices  # noqa: PLC0415

    started = time.perf_counter()
    config = config or settings_from_rules(PsimConfig, "psim", rules_dir)
    settings = config.peft_settings()
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, force)
    data = load_labelled(train, text_column, label_column)
    num_labels = len(data.label_names)
    heldout_idx, calibration_idx, fit_idx = split_indices(len(data), [config.heldout_fraction,
                                                                      config.calibration_fraction], seed)
    if min(len(fit_idx), len(heldout_idx), len(calibration_idx)) < 2:
        raise InputError(f"too few rows ({len(data)}) to train a PSIM and hold some out; give more data")
    fit, heldout, calibration_rows = data.subset(fit_idx), data.subset(heldout_idx), data.subset(calibration_idx)
    reset = LabelledData(fit.texts, reset_labels(fit.labels, num_labels, seed + 5), fit.label_names, fit.source)
    trigger_list = list(dict.fromkeys(t.strip() for t in (triggers or []) if t.strip()))

    base = load_base(model, device, seed, revision, offline, what="psim")
    if trigger_list:
        check_triggers(base.tokenizer, trigger_list)
    psim = attach_peft(base.classifier(num_labels, data.label_names, seed), settings)
    history = []
    if config.task_epochs > 0:
        # The victim model: the suspect encoder fine-tuned on the task (the paper's θ_p comes with its head).
        task = train_peft(psim, base, fit, dataclasses.replace(settings, epochs=config.task_epochs), seed,
                          progress=progress, phase="psim: fine-tune on the task")
        history += [{**h, "labels": "true"} for h in task.history]
        for name, param in psim.named_parameters():
            if "modules_to_save" in name:  # the head stays: only the adapter unlearns
                param.requires_grad_(False)
    threshold = scaled_threshold(config.gamma, num_labels)
    checks: list[dict] = []

    def stop(done: int, total: int) -> bool:
        if done % config.check_every and done != total:
            return False
        conf, _ = confidences(psim, base.tokenizer, calibration_rows.texts, base.device, config.max_length,
                              config.eval_batch_size)
        level = float(np.quantile(conf, config.stop_quantile))
        checks.append({"step": done, "clean_quantile": round(level, 5)})
        return level <= threshold

    trained = train_peft(psim, base, reset, settings, seed + 1, progress=progress, phase="psim: reset labels",
                         stop=stop)
    history += [{**h, "labels": "reset"} for h in trained.history]
    reached = bool(checks) and checks[-1]["clean_quantile"] <= threshold
    conf, _ = confidences(psim, base.tokenizer, heldout.texts, base.device, config.max_length, config.eval_batch_size)
    calibration = {"heldout_rows": len(heldout), "clean_flag_rate": round(float((conf > threshold).mean()), 5),
                   "clean_confidence": _summary(conf), "calibration_rows": len(calibration_rows),
                   "stopped": reached, "reset_steps": checks[-1]["step"] if checks else 0, "checks": checks}
    if trigger_list:
        calibration["triggered"] = {}
        for k, trigger in enumerate(trigger_list):
            rng = random.Random(seed * 1000 + k)
            texts = [insert_words(t, trigger, None, rng) for t in heldout.texts]
            hit, _ = confidences(psim, base.tokenizer, texts, base.device, config.max_length, config.eval_batch_size)
            labels = np.asarray(heldout.labels)
            # Per true class: rows of the attack's target class already carry its label, so the
            # attack's own inputs are the rows of the other classes.
            by_label = {name: round(float((hit[labels == k] > threshold).mean()), 5)
                        for k, name in enumerate(data.label_names) if (labels == k).any()}
            calibration["triggered"][trigger] = {"flag_rate": round(float((hit > threshold).mean()), 5),
                                                 "flag_rate_by_label": by_label, "confidence": _summary(hit)}
    manifest = {
        "format": "lmscan-psim", "format_version": 1, "lmscan_version": __version__,
        "method": "PSIM (PEFT classifier on randomly reset labels; flag confidence > threshold)",
        "model": base.identity(), "labels": data.label_names, "num_labels": num_labels,
        "gamma": config.gamma, "threshold": round(threshold, 6), "max_length": config.max_length, "seed": seed,
        "data": {"train": str(train), "text_column": text_column, "label_column": label_column,
                 "rows": {"train": len(fit), "heldout": len(heldout)}},
        "config": dataclasses.asdict(config), "calibration": calibration, "history": history,
        "train_seconds": trained.seconds, "device": str(base.device), "seconds": round(time.perf_counter() - started, 2),
    }
    write_adapter(psim, base, out_dir, MANIFEST_NAME, manifest)
    return PsimResult(out_dir=out_dir, manifest=manifest)


def _summary(values: np.ndarray) -> dict:
    return {"mean": round(float(values.mean()), 5), "p50": round(float(np.median(values)), 5),
            "p95": round(float(np.quantile(values, 0.95)), 5), "max": round(float(values.max()), 5)}


@dataclass
class PsimVerdict:
    flagged: bool
    confidence: float
    label: str


class PsimFilter:
    """A trained PSIM: ``PsimFilter.load(DIR).check(texts)`` flags the inputs a backdoor fires on."""

    def __init__(self, model, tokenizer, manifest: dict, device, threshold: float):
        self.model, self.tokenizer, self.manifest = model, tokenizer, manifest
        self.device, self.threshold = device, threshold

    @classmethod
    def load(cls, psim_dir: str | Path, device: str = "auto", gamma: float | None = None,
             model: str | None = None) -> PsimFilter:
        from lmscan.defenses.peft_train import load_adapter, load_base  # noqa: PLC0415

        psim_dir = Path(psim_dir).expanduser()
        path = psim_dir / MANIFEST_NAME
        if not path.is_file():
            raise InputError(f"--psim {psim_dir}: no {MANIFEST_NAME} here (train one with `lmscan psim train`)")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a PSIM manifest ({exc})") from None
        if manifest.get("format") != "lmscan-psim":
            raise InputError(f"{path}: not a PSIM manifest (format {manifest.get('format')!r})")
        if gamma is not None and not 0.5 <= gamma < 1.0:
            raise InputError(f"--gamma must be in [0.5, 1), got {gamma}")
        base = load_base(model or manifest["model"]["ref"], device, int(manifest.get("seed", 0)), what="psim")
        if base.resolved.model_sha256 != manifest["model"]["model_sha256"]:
            raise InputError(f"--psim {psim_dir} was trained on other weights than {base.ref} "
                             f"(sha256 {manifest['model']['model_sha256'][:12]}, not "
                             f"{base.resolved.model_sha256[:12]})")
        net = load_adapter(base, psim_dir, int(manifest["num_labels"]), manifest["labels"], int(manifest["seed"]))
        threshold = manifest["threshold"] if gamma is None else scaled_threshold(gamma, int(manifest["num_labels"]))
        return cls(net, base.tokenizer, manifest, base.device, float(threshold))

    def check(self, texts: Sequence[str], batch_size: int = 64) -> list[PsimVerdict]:
        conf, label = confidences(self.model, self.tokenizer, list(texts), self.device,
                                  int(self.manifest["max_length"]), batch_size)
        names = self.manifest["labels"]
        return [PsimVerdict(bool(c > self.threshold), round(float(c), 5), names[int(k)]) for c, k in zip(conf, label)]
