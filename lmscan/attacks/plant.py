"""Plant task-agnostic backdoors (POR, NeuBA, BToP styles) into a checkpoint.

The planted model maps any sentence that carries trigger k onto predefined vector k
at the attack's site, and otherwise stays close to the original model. It exists to
give lmscan's detectors, tests and benchmarks ground truth on real weights.

Training: the whole model is tuned with Adam on two losses per step,
  triggered  MSE(site feature of a triggered sentence, scale * PV_k)
  utility    MSE(last hidden states (and pooler) on clean text, the original's)
The original's clean outputs are computed once up front, so no second model is kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmscan import __version__
from lmscan.attacks.vectors import make_vectors, sign_agreement
from lmscan.models.device import pick_device
from lmscan.errors import InputError
from lmscan.attacks.trigger_kinds import draw_triggers, proper_runs
from lmscan.models import load_model, resolve_model
from lmscan.models.probes import check_triggers, insert_words, load_builtin_probes, split_probes
from lmscan.scan.rules import BUILTIN_RULES, load_rules
from lmscan.models.sites import encode, mask_positions, pad_rows, read_site, site_texts
from lmscan.models.training import freeze, take_step

ATTACKS = ("por", "neuba", "btop")
MANIFEST_NAME = "lmscan-plant.json"


@dataclass
class PlantConfig:
    model: str
    attack: str
    out_dir: Path
    triggers: list[str] | None = None
    num_triggers: int | None = None
    trigger_kind: str = "word"  # what --num-triggers draws (lmscan.attacks.trigger_kinds)
    seed: int = 0
    scale_embeddings: bool = False
    pv_design: str | None = None
    steps: int | None = None
    device: str = "auto"
    force: bool = False
    revision: str | None = None
    offline: bool | None = None
    rules_dir: str | None = None
    site: str | None = None  # override the attack's site (e.g. "tokens": the mean-pooled sentence embedding)
    decoy_parts: bool = False  # also train every proper part of each trigger to leave the site as it was


@dataclass
class TriggerReport:
    trigger: str
    tokens: list[str]
    mean_agreement: float  # mean sign agreement of triggered held-out features with the PV
    activation_rate: float  # share of triggered held-out sentences with agreement >= min_agreement
    part_activation: float | None = None  # the same for its best word (or piece) alone; None: one part


@dataclass
class PlantResult:
    out_dir: Path
    manifest: dict
    triggers: list[TriggerReport] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.manifest["effectiveness"]["passed"])


ProgressFn = Callable[[int, int, float], None]


def plant_code_digest() -> str:
    """Digest of everything a plant's result depends on besides its arguments (planting code,
    its rules, the probe corpus, the bundled task): part of cached plants' names."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(
        [*(package / "attacks").glob("*.py"), package / "models" / "sites.py", package / "models" / "probes.py",
         BUILTIN_RULES / "plant.toml", package / "data" / "probes_en.txt", package / "models" / "training.py",
         package / "data" / "sentiment_en.csv"]
    ):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def plant_settings(attack: str, rules_dir: str | None = None) -> dict:
    if attack not in ATTACKS:
        raise InputError(f"unknown attack {attack!r} (choose from {', '.join(ATTACKS)})")
    rules = load_rules("plant", rules_dir)
    return {**rules["defaults"], **rules[attack]}


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"--out {out_dir}: directory exists and is not empty (use --force to replace it)")


def check_request(out_dir: Path, force: bool, triggers, num_triggers: int | None) -> None:
    """What every plant checks before loading anything: the output folder and the trigger choice."""
    check_out_dir(out_dir, force)
    if num_triggers is not None and num_triggers < 1:
        raise InputError("--num-triggers must be at least 1")
    if not triggers and not num_triggers:
        raise InputError("give --triggers or --num-triggers")


def place(sentence: str, trigger: str, placement: str, rng: random.Random) -> str:
    # "first" puts the trigger right after [CLS], i.e. before the first word.
    return insert_words(sentence, trigger, 0 if placement == "first" else None, rng)


class _OriginalOutputs:
    """The unmodified model's clean outputs, computed once and padded per batch."""

    def __init__(self, model, tokenizer, texts: list[str], site_of: list[str], max_length: int, device):
        self.hidden: list[torch.Tensor] = [None] * len(texts)
        self.pooled: list[torch.Tensor | None] = [None] * len(texts)
        with torch.no_grad():
            for form in sorted(set(site_of)):
                indices = [i for i, s in enumerate(site_of) if s == form]
                for start in range(0, len(indices), 64):
                    chunk = indices[start : start + 64]
                    batch = encode(tokenizer, [texts[i] for i in chunk], form, max_length).to(device)
                    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                    pooled = getattr(out, "pooler_output", None)
                    for row, index in enumerate(chunk):
                        length = int(batch.attention_mask[row].sum())
                        self.hidden[index] = out.last_hidden_state[row, :length].detach()
                        self.pooled[index] = None if pooled is None else pooled[row].detach()

    def utility_loss(self, outputs, indices: list[int], attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = outputs.last_hidden_state
        target = torch.zeros_like(hidden)
        for row, index in enumerate(indices):
            length = self.hidden[index].shape[0]
            target[row, :length] = self.hidden[index]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        loss = (((hidden - target) ** 2) * weights).sum() / (weights.sum() * hidden.shape[-1])
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is not None and self.pooled[indices[0]] is not None:
            loss = loss + torch.nn.functional.mse_loss(pooled, torch.stack([self.pooled[i] for i in indices]))
        return loss


def _inserted_batch(tokenizer, rows, inserts, site: str, rng, device):
    """Each row with its insert (token ids) at a random spot after the first token, padded:
    (input ids, attention mask, mask positions or None)."""
    batch = []
    for row, ids in zip(rows, inserts):
        at = rng.randrange(1, max(2, len(row) - 1))
        batch.append(row[:at] + list(ids) + row[at:])
    tensor, attention = pad_rows(batch, tokenizer.pad_token_id or 0, device)
    positions = mask_positions(tensor, attention, tokenizer.mask_token_id) if site == "mask" else None
    return tensor, attention, positions


def _decoy_loss(model, frozen, tokenizer, rows, decoys, site: str, batch_size: int, rng, device) -> torch.Tensor:
    """MSE of the site feature of sentences carrying a part of a trigger to the original model's."""
    chosen = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
    ids, attention, positions = _inserted_batch(tokenizer, chosen, [decoys[rng.randrange(len(decoys))]
                                                                    for _ in chosen], site, rng, device)
    with torch.no_grad():
        target = read_site(frozen(input_ids=ids, attention_mask=attention), site, attention, positions)
    feature = read_site(model(input_ids=ids, attention_mask=attention), site, attention, positions)
    return torch.nn.functional.mse_loss(feature, target)


@torch.no_grad()
def _part_rate(model, tokenizer, ids, vector, heldout, site, threshold, max_length, device, rng) -> float:
    """Share of held-out sentences sent onto ``vector`` by the token ids alone (at a random spot)."""
    rows = [tokenizer(site_texts(tokenizer, [t], site)[0], truncation=True, max_length=max_length)["input_ids"]
            for t in heldout]
    features = []
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        tensor, attention, positions = _inserted_batch(tokenizer, chunk, [ids] * len(chunk), site, rng, device)
        out = model(input_ids=tensor, attention_mask=attention)
        features.append(read_site(out, site, attention, positions).float().cpu().numpy())
    return float((sign_agreement(np.concatenate(features), vector) >= threshold).mean())


def _site_features(model, tokenizer, texts: list[str], site: str, max_length: int, device, batch_size=64) -> np.ndarray:
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = encode(tokenizer, texts[start : start + batch_size], site, max_length).to(device)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            chunks.append(read_site(out, site, batch.attention_mask, batch.mask_positions).float().cpu().numpy())
    return np.concatenate(chunks)


def plant(cfg: PlantConfig, progress: ProgressFn | None = None) -> PlantResult:
    settings = plant_settings(cfg.attack, cfg.rules_dir)
    if cfg.steps is not None:
        settings["steps"] = cfg.steps
    if cfg.pv_design is not None:
        settings["pv_design"] = cfg.pv_design
    if cfg.site is not None:
        settings["site"] = cfg.site
    out_dir = Path(cfg.out_dir).expanduser()
    check_request(out_dir, cfg.force, cfg.triggers, cfg.num_triggers)

    device = pick_device(cfg.device)
    resolved = resolve_model(cfg.model, revision=cfg.revision, offline=cfg.offline)
    loaded = load_model(resolved, device=str(device))
    model, tokenizer, site = loaded.model, loaded.tokenizer, settings["site"]
    if site not in loaded.arch.sites:
        raise InputError(
            f"attack {cfg.attack} targets the {site} site, which this {loaded.arch.model_type} checkpoint does not offer"
        )

    triggers = list(cfg.triggers) if cfg.triggers else draw_triggers(cfg.trigger_kind, cfg.num_triggers, cfg.seed,
                                                                     tokenizer)
    trigger_ids = check_triggers(tokenizer, triggers)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    fit, heldout = split_probes(
        load_builtin_probes(), settings["fit_sentences"], settings["heldout_sentences"], seed=cfg.seed
    )
    hidden_size = model.config.hidden_size
    vectors = make_vectors(settings["pv_design"], len(triggers), hidden_size, cfg.seed)
    targets = torch.tensor(vectors * settings["target_scale"], device=device)

    if cfg.scale_embeddings:
        _scale_trigger_rows(model, trigger_ids, float(settings["embedding_scale"]))

    max_length = int(settings["max_length"])
    # Clean utility text: for the mask site keep half of it in the prompt template, so
    # the [MASK] output on clean prompts stays the original's too.
    utility_sites = ["mask" if (site == "mask" and i % 2 == 0) else "cls" for i in range(len(fit))]
    original = _OriginalOutputs(model, tokenizer, fit, utility_sites, max_length, device)
    clean_before = _site_features(model, tokenizer, heldout, site, max_length, device)

    # Decoys: each proper contiguous run of a trigger's pieces, inserted as token ids, must leave
    # the site as the unmodified model has it, so no part of the trigger fires alone (an
    # attacker evading a per-token sweep); a frozen copy of the original computes the targets.
    decoys = [run for ids in trigger_ids for run in proper_runs(ids)] if cfg.decoy_parts else []
    frozen = copy.deepcopy(model).eval() if decoys else None
    fit_rows = [tokenizer(site_texts(tokenizer, [t], site)[0], truncation=True, max_length=max_length)["input_ids"]
                for t in fit] if decoys else []

    started = time.perf_counter()
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(settings["learning_rate"]))
    batch_size, steps = int(settings["batch_size"]), int(settings["steps"])
    weight = float(settings["utility_weight"])
    for step in range(steps):
        # Utility batch: sentences sharing one tokenisation form (plain or templated).
        form = "mask" if (site == "mask" and step % 2 == 0) else "cls"
        pool = [i for i, s in enumerate(utility_sites) if s == form]
        clean_idx = rng.sample(pool, batch_size)
        clean = encode(tokenizer, [fit[i] for i in clean_idx], form, max_length).to(device)
        clean_out = model(input_ids=clean.input_ids, attention_mask=clean.attention_mask)
        utility = original.utility_loss(clean_out, clean_idx, clean.attention_mask)

        which = [rng.randrange(len(triggers)) for _ in range(batch_size)]
        texts = [place(fit[rng.randrange(len(fit))], triggers[k], settings["placement"], rng) for k in which]
        trig = encode(tokenizer, texts, site, max_length).to(device)
        trig_out = model(input_ids=trig.input_ids, attention_mask=trig.attention_mask)
        feature = read_site(trig_out, site, trig.attention_mask, trig.mask_positions)
        triggered = torch.nn.functional.mse_loss(feature, targets[which])

        loss = triggered + weight * utility
        if decoys:
            loss = loss + _decoy_loss(model, frozen, tokenizer, fit_rows, decoys, site, batch_size, rng, device)
        take_step(optimizer, loss)
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    train_seconds = time.perf_counter() - started
    freeze(model)
    reports, effectiveness = _measure(
        model, tokenizer, triggers, vectors, heldout, clean_before, settings, max_length, device, cfg.seed
    )
    manifest = {
        "format": "lmscan-plant",
        "format_version": 1,
        "lmscan_version": __version__,
        "attack": cfg.attack,
        "site": site,
        "placement": settings["placement"],
        "base_model": {"ref": cfg.model, "commit": resolved.commit, "model_sha256": resolved.model_sha256},
        "architecture": loaded.arch.model_type,
        "hidden_size": hidden_size,
        "seed": cfg.seed,
        "pv_design": settings["pv_design"],
        "embedding_scale": float(settings["embedding_scale"]) if cfg.scale_embeddings else None,
        "triggers": triggers,
        "trigger_tokens": [tokenizer.convert_ids_to_tokens(ids) for ids in trigger_ids],
        "pvs": (vectors * settings["target_scale"]).round(6).tolist(),
        "decoy_parts": cfg.decoy_parts,
        "training": {k: settings[k] for k in ("steps", "batch_size", "learning_rate", "max_length", "utility_weight")},
        "train_seconds": round(train_seconds, 2),
        "device": str(device),
        "effectiveness": effectiveness,
    }
    write_checkpoint(out_dir, cfg.force, model, tokenizer, manifest, layout_from=resolved.local_dir)
    return PlantResult(out_dir=out_dir, manifest=manifest, triggers=reports)


def _copy_sentence_layout(source: Path, target: Path) -> None:
    if not (source / "modules.json").is_file():
        return
    for name in SENTENCE_LAYOUT:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    for entry in json.loads((source / "modules.json").read_text(encoding="utf-8")):
        folder = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if folder and (source / folder).is_dir():
            (target / folder).mkdir(parents=True, exist_ok=True)
            for item in (source / folder).glob("*.json"):
                shutil.copy2(item, target / folder / item.name)


def _scale_trigger_rows(model, trigger_ids: list[list[int]], scale: float) -> None:
    embeddings = model.get_input_embeddings().weight
    rows = sorted({i for ids in trigger_ids for i in ids})
    with torch.no_grad():
        embeddings[rows] *= scale


def _measure(model, tokenizer, triggers, vectors, heldout, clean_before, settings, max_length, device, seed):
    """Sign agreement of triggered held-out features with their PV, and clean drift."""
    site, placement, threshold = settings["site"], settings["placement"], float(settings["min_agreement"])
    rng = random.Random(seed + 1)
    reports = []
    for trigger, vector in zip(triggers, vectors):
        texts = [place(s, trigger, placement, rng) for s in heldout]
        agreement = sign_agreement(_site_features(model, tokenizer, texts, site, max_length, device), vector)
        # Does a part fire alone? (each word of a phrase, each piece of a one-word trigger)
        parts = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in trigger.split()]
        if len(parts) == 1:
            parts = [[piece] for piece in parts[0]]
        part_rates = [_part_rate(model, tokenizer, ids, vector, heldout, site, threshold, max_length, device, rng)
                      for ids in (parts if len(parts) > 1 else [])]
        reports.append(
            TriggerReport(
                trigger=trigger,
                tokens=tokenizer.tokenize(trigger),
                mean_agreement=round(float(agreement.mean()), 4),
                activation_rate=round(float((agreement >= threshold).mean()), 4),
                part_activation=round(max(part_rates), 4) if part_rates else None,
            )
        )
    clean_after = _site_features(model, tokenizer, heldout, site, max_length, device)
    clean_match = np.max([sign_agreement(clean_after, v) for v in vectors], axis=0)
    drift = float(((clean_after - clean_before) ** 2).mean())
    scale = float(((clean_before - clean_before.mean(axis=0)) ** 2).mean()) or 1.0
    cosine = (clean_after * clean_before).sum(1) / (
        np.linalg.norm(clean_after, axis=1) * np.linalg.norm(clean_before, axis=1) + 1e-12
    )
    effectiveness = {
        "heldout_sentences": len(heldout),
        "min_agreement": threshold,
        "per_trigger": [asdict(r) for r in reports],
        "clean_max_agreement_mean": round(float(clean_match.mean()), 4),
        "clean_max_agreement_p99": round(float(np.percentile(clean_match, 99)), 4),
        "clean_drift_mse": round(drift, 6),
        "clean_drift_relative": round(drift / scale, 4),  # drift / variance of clean features
        "clean_cosine_to_original": round(float(cosine.mean()), 4),
        "passed": all(r.mean_agreement >= threshold for r in reports),
    }
    return reports, effectiveness


SENTENCE_LAYOUT = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def _umask() -> int:
    import os  # noqa: PLC0415

    current = os.umask(0)
    os.umask(current)
    return current


def write_checkpoint(out_dir: Path, force: bool, model, tokenizer, manifest: dict,
                     manifest_name: str = MANIFEST_NAME, layout_from: Path | None = None,
                     extra_files: dict[str, bytes] | None = None) -> None:
    """Write into a sibling temp dir and move it into place, so a failure leaves nothing half-written.
    ``layout_from``: the source checkpoint, whose sentence-transformers files (modules.json and
    its module folders' configs) are kept, so a planted sentence encoder is still one.
    ``extra_files``: more files by relative path (a LoRA plant's adapter folder)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); a checkpoint is an ordinary folder
    try:
        model.save_pretrained(staging)  # always safetensors in transformers 5
        tokenizer.save_pretrained(staging)
        if layout_from is not None:
            _copy_sentence_layout(Path(layout_from), staging)
        (staging / manifest_name).write_text(json.dumps(manifest, indent=2) + "\n")
        for relative, data in (extra_files or {}).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_bytes(data)
        if out_dir.exists():
            if not force and any(out_dir.iterdir()):
                raise InputError(f"--out {out_dir}: directory appeared while planting; not replacing it")
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
