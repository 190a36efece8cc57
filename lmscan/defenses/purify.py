"""`lmscan purify`: PURE (seed 004) — head pruning plus attention normalisation.

Algorithm 1 of the paper, on the defender's own clean labelled data:

Step 1  fine-tune the (possibly backdoored) encoder θ_p with a new head on the train split
        → f_p, the vanilla fine-tune (its accuracy and label flip rate are the "before").
        Measure each head's [CLS] attention variance on the validation split (padding
        masked, `lmscan.detectors.attention.cls_attention_variance`), then prune heads of
        f_p greedily, lowest variance first, while validation accuracy stays ≥ c.
Step 2  prune the same heads from the ORIGINAL θ_p, add a new head and fine-tune with
        CE + μ·Σ_l λ_l·Σ_{h remaining} ‖A_h^l[CLS]‖₂ (batch mean), where
        λ_l = −log2(mean variance of layer l's remaining heads), min-max scaled to [0, 1];
        keep the epoch with the best validation accuracy → f_c. If even that epoch is below
        the accuracy bar, step 2 is rerun with the smaller μ values of ``mu_fallbacks`` (the
        last, 0, is the paper's prune-only ablation): the paper chose μ by clean validation
        accuracy too.

Pruning without `prune_heads` (gone in transformers 5): a head's slice of the value
projection (weight rows and bias) and the matching input columns of the attention
output projection are zeroed, and re-zeroed after every optimiser step. The head then
adds nothing to the residual stream, and the checkpoint keeps the standard architecture.

Resumable: the step-1 model, the variance matrix and the pruning result are kept in
``OUT/.purify-work/`` under a digest of the inputs and settings; rerunning the same
command continues from there. The folder is removed once OUT is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmscan import __version__
from lmscan.errors import InputError
from lmscan.models.training import (
    LabelledData,
    TrainSettings,
    accuracy,
    build_classifier,
    encoder_of,
    infer_target,
    label_flip_rate,
    load_labelled,
    predict,
    resolve_task_file,
    split_indices,
    train_classifier,
    triggered_predictions,
)

REPORT_NAME = "purify-report.json"
WORK_NAME = ".purify-work"

# Where each encoder family keeps, per layer, the value projection and the attention
# output projection (the two matrices a head's slice is cut from).
_LAYER_LISTS = ("encoder.layer", "transformer.layer")
_PROJECTIONS = (
    ("attention.self.value", "attention.output.dense"),  # bert, roberta, xlm-roberta, electra
    ("attention.v_lin", "attention.out_lin"),  # distilbert
    ("attention.attn.v", "attention.attn.o"),  # mpnet
    ("attention.self.value_proj", "attention.output.dense"),  # deberta-v2
)

Progress = Callable[[str, int, int, str], None]  # (phase, done, total, info)


@dataclass
class PurifyConfig:
    threshold: float = 0.85  # c: keep pruning while validation accuracy >= c
    relative: bool = False  # c is a fraction of the unpruned model's validation accuracy
    mu: float = 0.15  # weight of the attention-norm term
    mu_fallbacks: tuple[float, ...] = (0.0375, 0.0)  # step 2 ended below the accuracy bar: retry with these
    finetune_epochs: int = 1  # step 1 (vanilla fine-tune)
    purify_epochs: int = 2  # step 2 (attention normalisation)
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 48
    validation_fraction: float = 0.15  # of --train, when no --validation file is given
    test_fraction: float = 0.15  # of --train: held out for the before/after numbers
    eval_batch_size: int = 64


@dataclass
class PurifyResult:
    out_dir: Path
    report: dict


# --- heads -----------------------------------------------------------------------------------


def _get(module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def attention_projections(model) -> list[tuple[torch.nn.Linear, torch.nn.Linear]]:
    """(value projection, attention output projection) of every layer of ``model``'s encoder."""
    encoder = encoder_of(model)
    layers = next((_get(encoder, path) for path in _LAYER_LISTS if _get(encoder, path) is not None), None)
    if layers is not None:
        for value_path, out_path in _PROJECTIONS:
            pairs = [(_get(layer, value_path), _get(layer, out_path)) for layer in layers]
            if all(isinstance(v, torch.nn.Linear) and isinstance(o, torch.nn.Linear) for v, o in pairs):
                return pairs
    raise InputError(f"purify cannot locate the attention heads of a {model.config.model_type} model "
                     "(supported: BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, MPNet, DeBERTa-v2 layouts)")


class HeadPruning:
    """Zero a set of heads in a model and keep them zero."""

    def __init__(self, model, heads: list[tuple[int, int]]):
        self.pairs = attention_projections(model)
        num_heads = model.config.num_attention_heads
        self.head_dim = self.pairs[0][0].out_features // num_heads
        self.heads = sorted(set(heads))

    @torch.no_grad()
    def apply(self, heads: list[tuple[int, int]] | None = None) -> None:
        for layer, head in (self.heads if heads is None else heads):
            value, out = self.pairs[layer]
            cut = slice(head * self.head_dim, (head + 1) * self.head_dim)
            value.weight[cut, :] = 0
            if value.bias is not None:
                value.bias[cut] = 0
            out.weight[:, cut] = 0


def remaining_mask(shape: tuple[int, int], pruned: list[tuple[int, int]]) -> np.ndarray:
    keep = np.ones(shape, dtype=bool)
    for layer, head in pruned:
        keep[layer, head] = False
    return keep


def layer_coefficients(variance: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """λ_l = −log2(mean variance of layer l's remaining heads), min-max scaled to [0, 1]; 0 for empty layers."""
    raw = np.full(variance.shape[0], np.nan)
    for layer in range(variance.shape[0]):
        if keep[layer].any():
            raw[layer] = -np.log2(max(float(variance[layer, keep[layer]].mean()), 1e-12))
    present = ~np.isnan(raw)
    out = np.zeros_like(raw)
    if present.any():
        low, high = raw[present].min(), raw[present].max()
        out[present] = (raw[present] - low) / (high - low) if high > low else 1.0
    return out


def attention_norm_loss(lambdas: np.ndarray, keep: np.ndarray, mu: float):
    """μ·Σ_l λ_l·Σ_{h remaining} ‖A_h^l[CLS]‖₂, averaged over the batch."""
    weights = torch.tensor(lambdas[:, None] * keep, dtype=torch.float32)  # (layers, heads)

    def loss(outputs, attention_mask) -> torch.Tensor:
        total = 0.0
        w = weights.to(outputs.logits.device)
        for layer, attention in enumerate(outputs.attentions):  # (B, H, n, n), padding columns are 0
            norms = attention[:, :, 0, :].norm(dim=-1)  # the [CLS] row of each head
            total = total + (norms * w[layer]).sum(dim=1).mean()
        return mu * total

    return loss


def greedy_prune(model, tokenizer, validation: LabelledData, variance: np.ndarray, bar: float, device,
                 config: PurifyConfig, progress: Progress | None = None) -> tuple[list[tuple[int, int]], list[dict]]:
    """Prune heads of ``model`` lowest variance first until validation accuracy would fall below ``bar``."""
    pruning = HeadPruning(model, [])
    layers, heads = variance.shape
    order = np.argsort(variance, axis=None, kind="stable")
    pruned: list[tuple[int, int]] = []
    trace = []
    for step, flat in enumerate(order):
        layer, head = divmod(int(flat), heads)
        pruning.apply([(layer, head)])
        acc = accuracy(model, tokenizer, validation, device, config.max_length, config.eval_batch_size)
        trace.append({"layer": layer, "head": head, "variance": round(float(variance[layer, head]), 8),
                      "validation_accuracy": round(acc, 5)})
        if progress is not None:
            progress("pruning heads", step + 1, layers * heads, f"{len(pruned)} pruned, acc {acc:.3f}")
        if acc < bar:
            break
        pruned.append((layer, head))
    return pruned, trace


# --- the run ---------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _other_contents(out_dir: Path, force: bool) -> list[Path]:
    """What OUT holds besides our resumable work folder; refused unless --force."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    if not out_dir.is_dir():
        return []
    others = [p for p in out_dir.iterdir() if p.name != WORK_NAME]
    if others and not force:
        raise InputError(f"--out {out_dir}: directory exists and is not empty (use --force to replace it)")
    return others


def _save_state(model, path: Path) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


def _load_state(model, path: Path) -> None:
    from safetensors.torch import load_file  # noqa: PLC0415

    model.load_state_dict(load_file(str(path), device=str(next(model.parameters()).device)))


def purify(model: str, train: str | Path, out_dir: str | Path, config: PurifyConfig | None = None, *,
           text_column: str = "text", label_column: str = "label", validation: str | Path | None = None,
           triggers: list[str] | None = None, pvs: str | Path | None = None, device: str = "auto", seed: int = 0,
           force: bool = False, revision: str | None = None, offline: bool | None = None,
           progress: Progress | None = None) -> PurifyResult:
    """Run PURE on ``model`` with the clean labelled data ``train``; write the purified classifier to ``out_dir``."""
    from lmscan.models.device import pick_device  # noqa: PLC0415
    from lmscan.models import load_model, resolve_model  # noqa: PLC0415
    from lmscan.models.probes import check_triggers  # noqa: PLC0415
    from lmscan.pv.pvs_file import trigger_words  # noqa: PLC0415

    config = config or PurifyConfig()
    started = time.perf_counter()
    if not 0.0 < config.threshold <= 1.0:
        raise InputError(f"--threshold must be in (0, 1], got {config.threshold}")
    if config.mu < 0:
        raise InputError(f"mu must be >= 0, got {config.mu}")
    out_dir = Path(out_dir).expanduser()
    replaced = _other_contents(out_dir, force)  # checked now, removed only once the inputs have loaded
    triggers = list(dict.fromkeys([t.strip() for t in (triggers or []) if t.strip()]))
    if pvs is not None:
        triggers = list(dict.fromkeys(triggers + trigger_words(pvs)))

    # Data: train / validation / test.
    data = load_labelled(train, text_column, label_column)
    if validation is not None:
        val_data = load_labelled(validation, text_column, label_column, label_names=data.label_names)
        train_idx, test_idx = split_indices(len(data), [1.0 - config.test_fraction], seed)
        train_data, test_data = data.subset(train_idx), data.subset(test_idx)
    else:
        train_idx, val_idx, test_idx = split_indices(
            len(data), [1.0 - config.validation_fraction - config.test_fraction, config.validation_fraction], seed)
        train_data, val_data, test_data = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)
    for name, part in (("train", train_data), ("validation", val_data), ("test", test_data)):
        if len(part) < 2:
            raise InputError(f"too few rows for a {name} split ({len(part)}); give more data")
    if len(set(train_data.labels)) < 2:
        raise InputError("the train split holds a single class; give more data of each class")

    torch_device = pick_device(device)
    torch.manual_seed(seed)  # a pooler the checkpoint lacks is initialised from the seed
    resolved = resolve_model(model, revision=revision, offline=offline)
    loaded = load_model(resolved, device=str(torch_device))
    if loaded.arch.family != "encoder":
        raise InputError(f"purify needs an encoder with a [CLS] token; {loaded.arch.model_type} is a decoder")
    tokenizer = loaded.tokenizer
    if triggers:
        check_triggers(tokenizer, triggers)
    num_labels = len(data.label_names)

    key_source = {
        "lmscan": __version__, "model": resolved.model_sha256, "train": _file_digest(resolve_task_file(train)),
        "validation": None if validation is None else _file_digest(resolve_task_file(validation)),
        "columns": [text_column, label_column], "config": dataclasses.asdict(config), "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:20]
    for path in replaced:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    work = out_dir / WORK_NAME
    if (work / "key").is_file() and (work / "key").read_text().strip() != key:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "key").write_text(key + "\n")
    resumed = []

    settings = TrainSettings(epochs=config.finetune_epochs, batch_size=config.batch_size,
                             learning_rate=config.learning_rate, max_length=config.max_length,
                             eval_batch_size=config.eval_batch_size)

    def bar(phase: str):
        if progress is None:
            return None
        return lambda done, total, loss: progress(phase, done, total, f"loss {loss:.4f}")

    # Step 1: vanilla fine-tune f_p.
    torch.manual_seed(seed + 1)
    f_p = build_classifier(loaded, num_labels, data.label_names)
    step1_file = work / "step1.safetensors"
    if (work / "step1.json").is_file() and step1_file.is_file():
        _load_state(f_p, step1_file)
        step1 = json.loads((work / "step1.json").read_text())
        resumed.append("step 1 fine-tune")
    else:
        trained = train_classifier(f_p, tokenizer, train_data, settings, torch_device, seed + 1, validation=val_data,
                                   progress=bar("step 1: fine-tune"))
        step1 = {"history": trained.history, "best_epoch": trained.best_epoch, "seconds": trained.seconds}
        _save_state(f_p, step1_file)
        (work / "step1.json").write_text(json.dumps(step1))
    f_p.eval()

    # Step 1: variance per head and greedy pruning.
    if (work / "pruning.json").is_file() and (work / "variance.npy").is_file():
        variance = np.load(work / "variance.npy")
        pruning = json.loads((work / "pruning.json").read_text())
        resumed.append("head pruning")
    else:
        from lmscan.detectors.attention import cls_attention_variance  # noqa: PLC0415

        t0 = time.perf_counter()
        variance = cls_attention_variance(f_p, tokenizer, val_data.texts, torch_device, config.eval_batch_size,
                                          config.max_length).mean(axis=0)
        base = accuracy(f_p, tokenizer, val_data, torch_device, config.max_length, config.eval_batch_size)
        cut = config.threshold * base if config.relative else config.threshold
        pruned, trace = greedy_prune(f_p, tokenizer, val_data, variance, cut, torch_device, config, progress)
        _load_state(f_p, step1_file)  # undo the pruning: f_p stays the vanilla fine-tune
        pruning = {"validation_accuracy_unpruned": round(base, 5), "accuracy_bar": round(cut, 5),
                   "pruned": [list(h) for h in pruned], "trace": trace, "seconds": round(time.perf_counter() - t0, 2)}
        np.save(work / "variance.npy", variance)
        (work / "pruning.json").write_text(json.dumps(pruning))
    pruned = [tuple(h) for h in pruning["pruned"]]

    # Step 2: pruned θ_p + new head, fine-tuned with the attention-norm term.
    keep = remaining_mask(variance.shape, pruned)
    lambdas = layer_coefficients(variance, keep)
    # The paper picks mu by clean validation accuracy; lmscan does the same downward: when the
    # norm term keeps the pruned model from learning the task (validation accuracy below the
    # bar), step 2 is rerun with the next, smaller mu.
    settings2 = dataclasses.replace(settings, epochs=config.purify_epochs)
    attempts = []
    for attempt, mu in enumerate([config.mu, *config.mu_fallbacks]):
        torch.manual_seed(seed + 2)
        f_c = build_classifier(loaded, num_labels, data.label_names)
        heads = HeadPruning(f_c, pruned)
        heads.apply()
        phase = "step 2: attention normalisation" + (f" (retry, mu {mu:.3g})" if attempt else "")
        trained2 = train_classifier(f_c, tokenizer, train_data, settings2, torch_device, seed + 2,
                                    validation=val_data,
                                    extra_loss=attention_norm_loss(lambdas, keep, mu) if mu > 0 else None,
                                    after_step=heads.apply, progress=bar(phase))
        heads.apply()
        best = trained2.history[trained2.best_epoch - 1].get("validation_accuracy", 0.0)
        attempts.append({"mu": round(mu, 6), "validation_accuracy": best, "best_epoch": trained2.best_epoch,
                         "history": trained2.history, "seconds": trained2.seconds})
        if best >= pruning["accuracy_bar"]:
            break

    # Before / after on the test split.
    measure = dict(device=torch_device, max_length=config.max_length)
    before_clean = predict(f_p, tokenizer, test_data.texts, batch_size=config.eval_batch_size, **measure)
    after_clean = predict(f_c, tokenizer, test_data.texts, batch_size=config.eval_batch_size, **measure)
    labels = np.asarray(test_data.labels)
    result_metrics = {
        "accuracy_before": round(float((before_clean == labels).mean()), 5),
        "accuracy_after": round(float((after_clean == labels).mean()), 5),
    }
    if triggers:
        hit_before = triggered_predictions(f_p, tokenizer, test_data, triggers, seed=seed + 3,
                                           batch_size=config.eval_batch_size, **measure)
        hit_after = triggered_predictions(f_c, tokenizer, test_data, triggers, seed=seed + 3,
                                          batch_size=config.eval_batch_size, **measure)
        target = infer_target(hit_before, num_labels)
        before = label_flip_rate(before_clean, hit_before, labels, target)
        after = label_flip_rate(after_clean, hit_after, labels, target)
        result_metrics.update({
            "inferred_target": target, "inferred_target_name": data.label_names[target],
            "lfr_before": before["lfr"], "lfr_after": after["lfr"],
            "lfr_per_trigger": {t: {"before": before["per_trigger"][t], "after": after["per_trigger"][t]}
                                for t in triggers},
            "lfr_rows": {"before": before["rows"], "after": after["rows"]},
        })

    # A purification that loses the task is no repair: flag it when the purified model's
    # validation accuracy ends below the bar pruning had to respect.
    utility = {"validation_accuracy": best, "bar": pruning["accuracy_bar"], "ok": best >= pruning["accuracy_bar"],
               "mu": round(mu, 6)}

    layers, num_heads = variance.shape
    report = {
        "format": "lmscan-purify", "format_version": 1, "lmscan_version": __version__,
        "method": "PURE (head pruning + attention normalisation)",
        "model": {"ref": model, "commit": resolved.commit, "model_sha256": resolved.model_sha256,
                  "architecture": loaded.arch.model_type},
        "data": {"train": str(train), "validation": None if validation is None else str(validation),
                 "text_column": text_column, "label_column": label_column, "labels": data.label_names,
                 "rows": {"train": len(train_data), "validation": len(val_data), "test": len(test_data)}},
        "config": dataclasses.asdict(config), "seed": seed, "device": str(torch_device), "triggers": triggers,
        "metrics": result_metrics,
        "utility": utility,
        "heads": {"layers": layers, "heads_per_layer": num_heads, "pruned": [list(h) for h in pruned],
                  "pruned_count": len(pruned), "variance": np.round(variance, 8).tolist(),
                  "lambda": np.round(lambdas, 5).tolist()},
        "pruning": pruning,
        "step1": step1,
        "step2": {"mu": round(mu, 6), "history": trained2.history, "best_epoch": trained2.best_epoch,
                  "seconds": round(sum(a["seconds"] for a in attempts), 2), "attempts": attempts},
        "resumed": resumed,
        "seconds": round(time.perf_counter() - started, 2),
    }
    f_c.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return PurifyResult(out_dir=out_dir, report=report)
