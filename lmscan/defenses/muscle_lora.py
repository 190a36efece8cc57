"""MuScleLoRA (seed 003): fine-tune on a dataset that may be poisoned without learning its backdoor.

Three parts, as in the paper:

1. Low-rank adaptation: the encoder is frozen and LoRA goes into every attention projection
   (query, key, value and the attention output by default).
2. Multiple radial scalings: in the penultimate encoder layer the LoRA modules get rank
   |S|·bandwidth and their projected input is scaled, h = W₀x + R (Lx ⊙ S), with
   S = (1, 4, 8, …, 32) (the paper's vector for BERT-base; bandwidth 1). Scaling down the
   clean task's high frequencies lets it be learnt before the low-frequency backdoor mapping.
   On save, S is folded into L (R (L ⊙ S)), so the adapter is an ordinary peft LoRA adapter.
3. Gradient alignment: after each backward pass on a training batch (gradient g) the gradient
   g_c of a batch of the small clean auxiliary set (``aux_size`` rows of the validation data,
   which must be trusted) is computed, and the update uses
       ĝ = (1 − μ)·g_a + μ·g,   g_a = |g·g_c| / ‖g_c‖² · g_c,
   with μ rising linearly from 0 to μ_max over training: early updates follow only the clean
   direction, later ones take in a little of the raw gradient to avoid under-fitting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lmscan.defenses.peft_train import attach_peft, train_peft
from lmscan.errors import InputError


@dataclass
class MuscleLoraConfig:
    r: int = 8  # LoRA rank outside the multi-scale layer
    targets: tuple[str, ...] = ("query", "key", "value", "attention.output.dense")
    scales: tuple[float, ...] = (1, 4, 8, 12, 16, 20, 24, 28, 32)  # S (paper, BERT-base)
    bandwidth: int = 1  # rank per scale
    layer: int = -2  # the encoder layer whose LoRA modules get the radial scalings (penultimate)
    aux_size: int = 96  # clean auxiliary rows taken from the validation data (paper: 96 for BERT)
    mu_max: float = 0.0  # share of the raw gradient let through at the end (paper: 0.1 for BERT; see the rules)
    learning_rate: float | None = None  # None: the [peft] learning rate
    epochs: int | None = None  # None: the [peft] epochs

    def __post_init__(self):
        self.targets = tuple(self.targets)
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or min(self.scales) <= 0:
            raise InputError("muscle_lora scales must be a non-empty list of positive numbers")
        if self.r < 1 or self.bandwidth < 1 or self.aux_size < 1:
            raise InputError("muscle_lora r, bandwidth and aux_size must be >= 1")
        if not 0.0 <= self.mu_max <= 1.0:
            raise InputError(f"muscle_lora mu_max must be in [0, 1], got {self.mu_max}")


def _scaled_modules(model, config: MuscleLoraConfig) -> list[str]:
    """Names (relative to the classifier) of the LoRA targets inside the multi-scale layer."""
    layers = model.config.num_hidden_layers
    index = config.layer if config.layer >= 0 else layers + config.layer
    if not 0 <= index < layers:
        raise InputError(f"muscle_lora layer {config.layer} is outside the model's {layers} layers")
    marker = f".layer.{index}."
    names = []
    for name, _ in model.named_modules():
        if marker in name + "." and any(name == t or name.endswith("." + t) for t in config.targets):
            names.append(name)
    if not names:
        raise InputError(f"muscle_lora: no LoRA target in encoder layer {index} of this "
                         f"{model.config.model_type} model")
    return names


def attach_muscle_lora(classifier, settings, config: MuscleLoraConfig):
    """LoRA everywhere plus the multi-scale modules; returns the peft model (scales applied by hooks)."""
    import dataclasses  # noqa: PLC0415

    scaled = _scaled_modules(classifier, config)
    rank = len(config.scales) * config.bandwidth
    lora = dataclasses.replace(settings, kind="lora", r=config.r, alpha=config.r, targets=config.targets)
    # rank_pattern keys are matched as regular expressions on the module name's end.
    pattern = {name.replace(".", r"\."): rank for name in scaled}
    model = attach_peft(classifier, lora, rank_pattern=pattern, alpha_pattern=dict(pattern))
    vector = torch.tensor(config.scales).repeat_interleave(config.bandwidth)
    model._muscle_hooks = []
    for name, module in model.named_modules():
        if any(name.endswith(s) for s in scaled) and hasattr(module, "lora_A"):
            down = module.lora_A["default"]
            if down.out_features != rank:
                raise InputError(f"muscle_lora: {name} got rank {down.out_features}, expected {rank}")
            s = vector.to(down.weight.device, down.weight.dtype)
            model._muscle_hooks.append((down, s, down.register_forward_hook(lambda mod, inp, out, s=s: out * s)))
    if len(model._muscle_hooks) != len(scaled):
        raise InputError("muscle_lora: could not place the multi-scale modules")
    return model


@torch.no_grad()
def fold_scales(model) -> None:
    """R (Lx ⊙ S) = R (L ⊙ S) x: fold S into L and drop the hooks (an ordinary LoRA adapter remains)."""
    for down, s, handle in getattr(model, "_muscle_hooks", []):
        handle.remove()
        down.weight.mul_(s[:, None])
    model._muscle_hooks = []


class GradientAlignment:
    """``before_step`` hook: replace the gradient g by (1 − μ)·g_a + μ·g (see the module doc)."""

    def __init__(self, model, tokenizer, aux, settings, device, mu_max: float, seed: int):
        self.model, self.tokenizer, self.aux = model, tokenizer, aux
        self.settings, self.device, self.mu_max = settings, device, mu_max
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.trace: list[dict] = []

    def _aux_batch(self) -> list[int]:
        batch = []
        while len(batch) < min(self.settings.batch_size, len(self.aux)):
            if not self.order:
                self.order = list(range(len(self.aux)))
                self.rng.shuffle(self.order)
            batch.append(self.order.pop())
        return batch

    def __call__(self, done: int, total: int) -> None:
        mu = self.mu_max * (done / (total - 1) if total > 1 else 1.0)
        g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        batch = self._aux_batch()
        enc = self.tokenizer([self.aux.texts[i] for i in batch], padding=True, truncation=True,
                             max_length=self.settings.max_length, return_tensors="pt").to(self.device)
        logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([self.aux.labels[i] for i in batch],
                                                                      device=self.device))
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        g_c = [torch.zeros_like(p) if gc is None else gc for p, gc in zip(self.params, grads)]
        dot = sum(float((a * b).sum()) for a, b in zip(g, g_c))
        norm2 = sum(float((b * b).sum()) for b in g_c)
        coef = abs(dot) / norm2 if norm2 > 0 else 0.0
        for p, raw, clean in zip(self.params, g, g_c):
            p.grad = (1.0 - mu) * coef * clean + mu * raw
        if done % 10 == 0 or done == total - 1:
            gnorm = sum(float((a * a).sum()) for a in g) ** 0.5
            cosine = dot / (gnorm * norm2 ** 0.5) if gnorm > 0 and norm2 > 0 else 0.0
            self.trace.append({"step": done + 1, "mu": round(mu, 5), "cosine": round(cosine, 5)})


def train_muscle_lora(base, splits, settings, config: MuscleLoraConfig, seed: int, progress=None):
    import dataclasses  # noqa: PLC0415

    settings = dataclasses.replace(settings, **{k: v for k, v in (("learning_rate", config.learning_rate),
                                                                   ("epochs", config.epochs)) if v is not None})
    num_labels = len(splits.label_names)
    model = attach_muscle_lora(base.classifier(num_labels, splits.label_names, seed), settings, config)
    aux_rows = random.Random(seed + 7).sample(range(len(splits.validation)), min(config.aux_size,
                                                                                 len(splits.validation)))
    aux = splits.validation.subset(aux_rows)
    align = GradientAlignment(model, base.tokenizer, aux, settings, base.device, config.mu_max, seed + 8)
    trained = train_peft(model, base, splits.train, settings, seed, splits.validation, before_step=align,
                         progress=progress, phase="muscle-lora")
    info = {"method": "MuScleLoRA (multi-scale LoRA + gradient alignment to clean data)",
            "config": dataclasses.asdict(config), "aux_rows": len(aux), "epochs": settings.epochs,
            "learning_rate": settings.learning_rate, "alignment_trace": align.trace}
    return model, trained, info
