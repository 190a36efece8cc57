"""The sentence-transformers layout, read from its files (sentence-transformers is not needed).

A sentence-transformers checkpoint lists its modules in ``modules.json``: the
transformer (path ``""``, the folder itself), a ``Pooling`` module whose
``1_Pooling/config.json`` says how token states become one vector, and optionally
``Normalize`` (unit length). Its users consume that pooled embedding, so lmscan scans
it as the ``embedding`` site, computed the way sentence-transformers computes it:
  cls             the first token's state
  mean            mean over real tokens
  max             per-dimension max over real tokens
  mean_sqrt_len   sum over real tokens / sqrt(number of real tokens)
  weightedmean    position-weighted mean (weights 1..n)
  lasttoken       the last real token's state
several modes concatenated in that order, then L2-normalised when Normalize follows.
Modules lmscan cannot compute (a Dense projection, a custom module) make the site
unavailable, with the reason, rather than a wrong embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = ("cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
_CONFIG_KEYS = {
    "cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_KNOWN = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
          "sentence_transformers.models.Normalize")


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...]
    normalize: bool

    def describe(self) -> str:
        return "+".join(self.modes) + (" pooling, normalised" if self.normalize else " pooling")

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        count = mask.sum(dim=1).clamp_min(1.0)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "mean":
                parts.append((hidden * mask).sum(dim=1) / count)
            elif mode == "max":
                parts.append(hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values)
            elif mode == "mean_sqrt_len":
                parts.append((hidden * mask).sum(dim=1) / count.sqrt())
            elif mode == "weightedmean":
                weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
                weights = weights[None, :, None] * mask
                parts.append((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9))
            elif mode == "lasttoken":
                parts.append(hidden[rows, attention_mask.sum(dim=1) - 1])
        pooled = torch.cat(parts, dim=-1)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def read_pooling(model_dir: Path) -> tuple[Pooling | None, str]:
    """(the checkpoint's pooling, "") or (None, why the embedding site is not offered).
    No modules.json: (None, "")."""
    modules_file = Path(model_dir) / "modules.json"
    if not modules_file.is_file():
        return None, ""
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError, OverflowError):  # Overflow: "idx": 1e400
        return None, "modules.json is not readable"
    types = [str(m.get("type", "")) for m in modules]
    unknown = [t for t in types if t not in _KNOWN]
    if unknown:
        return None, f"modules.json has modules lmscan cannot compute ({', '.join(unknown)})"
    if not types or types[0] != _KNOWN[0] or modules[0].get("path", "") not in ("", "."):
        return None, "modules.json does not start with the transformer in this folder"
    pooling_entry = next((m for m in modules if m.get("type") == _KNOWN[1]), None)
    if pooling_entry is None:
        return None, "modules.json has no Pooling module"
    where = Path(str(pooling_entry.get("path", ""))) / "config.json"  # as modules.json names it
    pooling_dir = Path(model_dir) / where.parent
    try:
        root = Path(model_dir).resolve()
        inside = pooling_dir.resolve() == root or root in pooling_dir.resolve().parents
    except (OSError, ValueError, RuntimeError):  # a NUL byte in the path, a symlink loop
        inside = False
    if not inside:
        return None, f"modules.json puts the Pooling module outside the model folder ({where.parent})"
    try:
        config = json.loads((pooling_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None, f"{where} is not readable"
    if not isinstance(config, dict):
        return None, f"{where} is not a JSON object"
    modes = tuple(m for m in MODES if config.get(_CONFIG_KEYS[m]))
    if not modes and config.get("pooling_mode") in MODES:
        modes = (config["pooling_mode"],)
    if not modes:
        return None, "the Pooling module's config names no pooling mode"
    after = types[types.index(_KNOWN[1]) + 1:]
    return Pooling(modes, normalize=_KNOWN[2] in after), ""
