"""Obliviate (seed 000): neutralise a task-agnostic backdoor while PEFT-fine-tuning on clean data.

    L = L_task + λ_amp · L_amp + λ_reg · L_reg
    L_amp = −Σ_layers Σ_{PEFT matrices p} ‖W_p‖₂   (LoRA's A and B; the prefix re-parametrisation)
    L_reg =  Σ_layers Σ_heads ‖a_h‖₂                (a_h: head h's attention row of the [CLS] output,
                                                     batch mean; padding columns are zero)

Amplifying the PEFT weights lets the clean task's update outweigh the planted neurons;
shrinking the [CLS] attention rows keeps any single (trigger) token from taking over the
sentence representation. ‖·‖₂ of a matrix is its Frobenius norm (with a tiny ε, so LoRA's
all-zero B at initialisation has a gradient of 0, not NaN).

λ: the configured pair, or with ``select = true`` the paper's rule: the largest pair of the
grids whose validation accuracy stays within ``max_accuracy_drop`` of plain PEFT's. The two
grids are walked together from the top ((5e-3, 5e-2), (3e-3, 3e-2), ...), which costs one
training run per step instead of 16, and end with the configured pair as the last resort.

The configured default is λ_amp = 5e-3 (the top of the paper's grid) and λ_reg = 1e-3, ten
times below the paper's smallest: on MiniLM with lmscan's 3-epoch CPU schedule, λ_reg = 1e-2
(and 5e-2) kept LoRA from learning the task at all (validation accuracy 0.46, one class),
while 1e-3 learnt it to 100 % (README, "Measured").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmscan.defenses.peft_train import attach_peft, peft_weight_matrices, train_peft
from lmscan.errors import InputError


@dataclass
class ObliviateConfig:
    lambda_amp: float = 5e-3
    lambda_reg: float = 1e-3
    select: bool = False  # pick λ by clean validation accuracy (the paper's rule) instead of the pair above
    lambda_amp_grid: tuple[float, ...] = (5e-3, 3e-3, 2e-3, 1e-3)
    lambda_reg_grid: tuple[float, ...] = (5e-2, 3e-2, 2e-2, 1e-2)
    max_accuracy_drop: float = 0.02  # allowed validation-accuracy loss against plain PEFT, with select

    def __post_init__(self):
        self.lambda_amp_grid = tuple(float(v) for v in self.lambda_amp_grid)
        self.lambda_reg_grid = tuple(float(v) for v in self.lambda_reg_grid)
        if self.lambda_amp < 0 or self.lambda_reg < 0:
            raise InputError("obliviate lambda_amp and lambda_reg must be >= 0")
        if self.select and len(self.lambda_amp_grid) != len(self.lambda_reg_grid):
            raise InputError("obliviate lambda_amp_grid and lambda_reg_grid must have the same length")

    def pairs(self) -> list[tuple[float, float]]:
        """The λ pairs to train, in order: the configured one, or the grids from the top and then
        the configured pair as the last resort."""
        last = (self.lambda_amp, self.lambda_reg)
        if not self.select:
            return [last]
        pairs = sorted(zip(self.lambda_amp_grid, self.lambda_reg_grid), reverse=True)
        return pairs + ([last] if last not in pairs else [])


def amplification_loss(matrices: list[torch.Tensor]) -> torch.Tensor:
    """L_amp = −Σ ‖W‖₂ (Frobenius, ε-smoothed at 0)."""
    return -sum(torch.sqrt((w * w).sum() + 1e-12) for w in matrices)


def obliviate_loss(model, lambda_amp: float, lambda_reg: float):
    """The extra loss for ``train_classifier``: λ_amp·L_amp + λ_reg·L_reg."""
    from lmscan.defenses.purify import attention_norm_loss  # noqa: PLC0415

    matrices = peft_weight_matrices(model)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    # PURE's attention-norm term with every head kept and every layer weighted 1 is exactly L_reg.
    regulariser = attention_norm_loss(np.ones(layers), np.ones((layers, heads), dtype=bool), lambda_reg)

    def loss(outputs, attention_mask) -> torch.Tensor:
        total = regulariser(outputs, attention_mask) if lambda_reg > 0 else 0.0
        if lambda_amp > 0:
            total = total + lambda_amp * amplification_loss(matrices)
        return total

    return loss


def train_obliviate(base, splits, settings, config: ObliviateConfig, seed: int, plain, progress=None):
    """Train the defended adapter; ``plain()`` gives the plain PEFT model (trained on first use)."""
    num_labels = len(splits.label_names)
    bar = None
    if config.select:
        reference = plain()
        from lmscan.models.training import accuracy  # noqa: PLC0415

        reference_accuracy = accuracy(reference, base.tokenizer, splits.validation, base.device, settings.max_length,
                                      settings.eval_batch_size)
        bar = reference_accuracy - config.max_accuracy_drop
    tried = []
    model = trained = None
    for lambda_amp, lambda_reg in config.pairs():
        model = attach_peft(base.classifier(num_labels, splits.label_names, seed), settings)
        if not peft_weight_matrices(model) and lambda_amp > 0:
            raise InputError(f"obliviate: no PEFT weight matrices to amplify in a {settings.kind} model")
        trained = train_peft(model, base, splits.train, settings, seed, splits.validation,
                             extra_loss=obliviate_loss(model, lambda_amp, lambda_reg), progress=progress,
                             phase=f"obliviate (λ_amp {lambda_amp:g}, λ_reg {lambda_reg:g})")
        best = trained.history[trained.best_epoch - 1].get("validation_accuracy")
        norm = float(sum(torch.linalg.norm(w.detach()) for w in peft_weight_matrices(model)))
        tried.append({"lambda_amp": lambda_amp, "lambda_reg": lambda_reg, "validation_accuracy": best,
                      "peft_weight_norm": round(norm, 4)})
        if bar is None or (best is not None and best >= bar):
            break
    chosen = tried[-1]
    info = {"method": "Obliviate (neuron amplification + [CLS] attention regularisation)",
            "lambda_amp": chosen["lambda_amp"], "lambda_reg": chosen["lambda_reg"], "select": config.select,
            "tried": tried}
    if bar is not None:
        info.update({"accuracy_bar": round(bar, 5), "within_bar": chosen["validation_accuracy"] is not None
                     and chosen["validation_accuracy"] >= bar})
    return model, trained, info

