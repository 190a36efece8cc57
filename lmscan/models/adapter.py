"""LoRA/PEFT adapters, merged into their base model so that the scan reads what a user runs.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
pickled ``adapter_model.bin``); its tensors were read by the safe loader before they
reach this module. peft injects the LoRA layers into the base model lmscan built, loads
the adapter's tensors into them and merges them into the base weights.

peft saves tensors under the module path of the model it was trained on
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` for a causal LM);
lmscan scans the base model inside it, so the task model's prefix (``model.``, ``bert.``)
is taken off.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from lmscan.errors import CannotAssess, InputError
from lmscan.models.resolve import ADAPTER_CONFIG

_PEFT_PREFIX = "base_model.model."
# PEFT types whose weights merge into the base model's (the others add prompts or modules).
MERGEABLE = ("LORA",)


def read_adapter_config(adapter_dir: Path, label: str):
    """The adapter's peft config; CannotAssess for an adapter type that cannot be merged."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: PLC0415

    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a JSON object")
    peft_type = str(raw.get("peft_type") or "").upper()
    if peft_type not in MERGEABLE:
        raise CannotAssess(f"{label}: a {peft_type or 'untyped'} adapter cannot be merged into its base "
                           f"(lmscan merges {', '.join(MERGEABLE)} adapters), so it cannot be assessed")
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    known = {k: v for k, v in raw.items() if k in config_cls.__dataclass_fields__}
    try:
        return config_cls(**known)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a valid {peft_type} adapter config ({exc})") from None


def merge_adapter(model, adapter_dir: Path, adapter_weights: dict[str, torch.Tensor], label: str):
    """``model`` with the adapter merged into its weights (a new module; ``model`` is consumed)."""
    from peft import PeftModel, set_peft_model_state_dict  # noqa: PLC0415

    config = read_adapter_config(adapter_dir, label)
    state = _rebase(adapter_weights, getattr(model, "base_model_prefix", "") or "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wrapped = PeftModel(model, config)
        except (ValueError, KeyError, TypeError) as exc:  # target modules that the base does not have
            raise InputError(f"{label}: the adapter does not fit its base model ({_first_line(exc)})") from None
        try:
            result = set_peft_model_state_dict(wrapped, state)
        except RuntimeError as exc:  # size mismatch: an adapter trained for another hidden size
            raise InputError(f"{label}: the adapter does not fit its base model ({_first_line(exc)})") from None
        unused = sorted(k for k in getattr(result, "unexpected_keys", None) or [] if "lora_" in k)
        absent = sorted(k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k)
        if absent:  # an untrained LoRA layer merges as nothing: the scan would miss the adapter
            raise InputError(f"{label}: the adapter file lacks {len(absent)} LoRA tensor(s) its config names "
                             f"(e.g. {absent[0]})")
        if unused:
            raise InputError(f"{label}: the adapter does not fit its base model: {len(unused)} adapter tensor(s) "
                             f"match no module of the base (e.g. {unused[0]})")
        return wrapped.merge_and_unload()


def _rebase(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Adapter tensor names as peft expects them on the base model lmscan built."""
    rebased = {}
    for key, tensor in weights.items():
        inner = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if prefix and inner.startswith(prefix + "."):
            inner = inner[len(prefix) + 1:]
        rebased[_PEFT_PREFIX + inner] = tensor
    return rebased


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
