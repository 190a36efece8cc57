"""Which architectures lmscan can assess, and which feature sites each one offers.

The table below is plain data: supporting another architecture means adding one
entry (and checking its base model class in transformers has the same layout).

Sites (see ``lmscan.models.sites``):
  cls     last hidden state of the first token (encoders)
  pooler  the pooler output; only when the architecture has a pooler AND the
          checkpoint carries trained pooler weights (a missing pooler would be random)
  mask    last hidden state at the mask token of a prompt (masked-LM encoders)
  tokens  mean of the last hidden states over real tokens (every architecture)
  last    last hidden state of the last real token (decoders)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmscan.errors import CannotAssess

ENCODER = "encoder"
DECODER = "decoder"

# model_type -> facts about its base model in transformers.
#   family:       "encoder" (bidirectional, masked-LM pretrained) or "decoder" (causal LM)
#   pooler:       the base model class builds a pooler module
#   prefix:       base_model_prefix, the key prefix task-head checkpoints put before base weights
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "bert": {"family": ENCODER, "pooler": True, "prefix": "bert"},
    "roberta": {"family": ENCODER, "pooler": True, "prefix": "roberta"},
    "xlm-roberta": {"family": ENCODER, "pooler": True, "prefix": "roberta"},
    "distilbert": {"family": ENCODER, "pooler": False, "prefix": "distilbert"},
    "albert": {"family": ENCODER, "pooler": True, "prefix": "albert"},
    "deberta-v2": {"family": ENCODER, "pooler": False, "prefix": "deberta"},
    "electra": {"family": ENCODER, "pooler": False, "prefix": "electra"},
    "mpnet": {"family": ENCODER, "pooler": True, "prefix": "mpnet"},
    "gpt2": {"family": DECODER, "pooler": False, "prefix": "transformer"},
}

# Config attribute names differ between families (distilbert: dim, gpt2: n_embd, ...).
_SIZE_FIELDS = {
    "hidden_size": ("hidden_size", "dim", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_heads", "n_head", "num_heads"),
}


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    family: str  # "encoder" | "decoder"
    hidden_size: int
    num_layers: int
    num_heads: int
    has_pooler: bool  # the architecture builds a pooler (whether or not the checkpoint trained it)
    sites: tuple[str, ...]  # every site this checkpoint offers
    default_sites: tuple[str, ...]  # what a scan reads when no site is chosen
    base_model_prefix: str = ""

    @property
    def is_encoder(self) -> bool:
        return self.family == ENCODER


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(ARCHITECTURES))


def _unsupported(model_type: str) -> CannotAssess:
    return CannotAssess(
        f"architecture {model_type!r} is not supported (supported: {', '.join(supported_model_types())})"
    )


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def check_config(config: Any) -> str:
    """Return the normalised model_type, or raise CannotAssess (unknown type, custom code)."""
    raw_type = _get(config, "model_type")
    if not isinstance(raw_type, str) or not raw_type:
        raise CannotAssess(
            "the config has no model_type, so its architecture cannot be identified "
            f"(supported: {', '.join(supported_model_types())})"
        )
    if _get(config, "auto_map"):
        raise CannotAssess(
            f"architecture {raw_type!r} ships custom modelling code (auto_map in config.json); "
            "lmscan never runs code from checkpoints, so it cannot assess this model"
        )
    model_type = raw_type.strip().lower().replace("_", "-")
    if model_type not in ARCHITECTURES:
        raise _unsupported(raw_type)
    return model_type


def _size(config: Any, field: str) -> int:
    for name in _SIZE_FIELDS[field]:
        value = _get(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise CannotAssess(f"the config does not give the model's {field.replace('_', ' ')}")


def has_pooler_weights(weight_keys: Iterable[str], prefix: str) -> bool:
    """True when the state-dict keys include the pooler (with or without the base-model prefix)."""
    task_prefix = f"{prefix}." if prefix else None
    for key in weight_keys:
        if task_prefix and key.startswith(task_prefix):
            key = key[len(task_prefix):]
        if key.startswith("pooler.") or key == "pooler":
            return True
    return False


def identify(config: Any, weight_keys: Iterable[str] | None = None, head: bool = False,
             embedding: bool = False) -> ArchInfo:
    """Describe ``config`` (a transformers config or the parsed config.json dict).

    ``weight_keys`` are the checkpoint's tensor names; the pooler site is offered only
    when they include pooler weights. Without them the architecture alone decides.
    ``head``: the checkpoint's classification head is loaded (the ``label`` site);
    ``embedding``: its sentence-transformers pooling is (the ``embedding`` site). Both
    are default sites: they are what users of such checkpoints consume.
    """
    model_type = check_config(config)
    entry = ARCHITECTURES[model_type]
    family = entry["family"]
    prefix = entry.get("prefix", "")
    has_pooler = bool(entry.get("pooler"))
    pooler_site = has_pooler and (weight_keys is None or has_pooler_weights(weight_keys, prefix))

    if family == ENCODER:
        default_sites = ("cls", "pooler", "mask") if pooler_site else ("cls", "mask")
    else:
        default_sites = ("last",)
    default_sites += ("embedding",) * embedding + ("label",) * head
    sites = default_sites + ("tokens",)

    return ArchInfo(
        model_type=model_type,
        family=family,
        hidden_size=_size(config, "hidden_size"),
        num_layers=_size(config, "num_layers"),
        num_heads=_size(config, "num_heads"),
        has_pooler=has_pooler,
        sites=sites,
        default_sites=default_sites,
        base_model_prefix=prefix,
    )
