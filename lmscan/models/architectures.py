"""Which architectures lmscan can assess, and which feature sites each one offers.

Encoders are a hand table (below): supporting another encoder means adding one entry
(and checking its base model class in transformers has the same layout). Decoders are
not listed by hand: every causal LM that transformers implements natively is one (see
:func:`decoder_types`), so a new transformers release brings its new decoders with it.

Sites (see ``lmscan.models.sites``):
  cls     last hidden state of the first token (encoders)
  pooler  the pooler output; only when the architecture has a pooler AND the
          checkpoint carries trained pooler weights (a missing pooler would be random)
  mask    last hidden state at the mask token of a prompt (masked-LM encoders)
  tokens  mean of the last hidden states over real tokens (every architecture)
  last    last hidden state of the last real token (decoders)
  next    last hidden state at the end of a generation prompt (decoders; chat template applied)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmscan.errors import CannotAssess

ENCODER = "encoder"
DECODER = "decoder"

# Encoders: model_type -> facts about its base model in transformers.
#   family:       "encoder" (bidirectional, masked-LM pretrained)
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
}

# Config attribute names differ between families (distilbert: dim, gpt2: n_embd, ...).
_SIZE_FIELDS = {
    "hidden_size": ("hidden_size", "dim", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_heads", "n_head", "num_heads"),
}
# Multimodal and composite decoders keep the language model's sizes in a sub-config
# (gemma3: text_config); the top level is read first.
_NESTED_CONFIGS = ("text_config", "language_config", "llm_config")


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


@lru_cache(maxsize=1)
def decoder_types() -> dict[str, str]:
    """model_type -> base model class name, for every decoder transformers implements natively.

    A decoder is a type with a causal-LM class and a base model class in transformers'
    auto mappings, less the encoders and encoder-decoders whose ``ForCausalLM`` class
    only runs an encoder with a causal mask or the decoder half of a seq2seq model: their
    ``AutoModel`` is not a decoder-only language model. Types that need remote code are
    never here (they are not in the mappings; ``auto_map`` configs are refused anyway).
    """
    from transformers.models.auto import modeling_auto as auto  # noqa: PLC0415 - heavy, only when asked

    not_decoders = set(ARCHITECTURES) | set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    for name in ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"):
        not_decoders |= set(getattr(auto, name, {}))
    found = {}
    for model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        base = auto.MODEL_MAPPING_NAMES.get(model_type)
        if isinstance(base, (tuple, list)):
            base = base[0] if base else None
        # bert-generation's base model is BertGenerationEncoder: an encoder used as a decoder.
        if model_type in not_decoders or not isinstance(base, str) or base.endswith("Encoder"):
            continue
        found[model_type] = base
    return dict(sorted(found.items()))


@lru_cache(maxsize=None)
def _base_model_prefix(class_name: str) -> str:
    import transformers  # noqa: PLC0415

    try:
        return str(getattr(transformers, class_name).base_model_prefix or "")
    except Exception:  # noqa: BLE001 - a class that does not import (missing extra) has no prefix to give
        return ""


def architecture_entry(model_type: str) -> dict[str, Any]:
    """The facts about a supported model_type (as :data:`ARCHITECTURES` gives them for encoders)."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    base = decoder_types()[model_type]
    return {"family": DECODER, "pooler": False, "prefix": _base_model_prefix(base), "base_class": base}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted({*ARCHITECTURES, *decoder_types()}))


def supported_summary() -> str:
    """What "supported" means, short enough to read in an error message."""
    import transformers  # noqa: PLC0415

    version = ".".join(transformers.__version__.split(".")[:2])
    return (f"encoders: {', '.join(sorted(ARCHITECTURES))}; decoders: every causal LM in transformers {version} "
            f"({len(decoder_types())} types, e.g. llama, qwen2, gemma2, mistral, phi3, gpt2)")


def _unsupported(model_type: str) -> CannotAssess:
    return CannotAssess(f"architecture {model_type!r} is not supported ({supported_summary()})")


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
            f"(supported: {supported_summary()})"
        )
    if _get(config, "auto_map"):
        raise CannotAssess(
            f"architecture {raw_type!r} ships custom modelling code (auto_map in config.json); "
            "lmscan never runs code from checkpoints, so it cannot assess this model"
        )
    model_type = _known_type(raw_type)
    if model_type is None:
        raise _unsupported(raw_type)
    return model_type


def _known_type(raw_type: str) -> str | None:
    """The table's spelling of ``raw_type``: transformers mixes _ and - (xlm-roberta, gpt_neox)."""
    lowered = raw_type.strip().lower()
    decoders = decoder_types()
    for candidate in (lowered, lowered.replace("_", "-"), lowered.replace("-", "_")):
        if candidate in ARCHITECTURES or candidate in decoders:
            return candidate
    return None


def _size(config: Any, field: str, required: bool = True) -> int:
    nested = [_get(config, name) for name in _NESTED_CONFIGS]
    for scope in (config, *(n for n in nested if n is not None and not isinstance(n, (str, int, float, list)))):
        for name in _SIZE_FIELDS[field]:
            value = _get(scope, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    if not required:
        return 0
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
    entry = architecture_entry(model_type)
    family = entry["family"]
    prefix = entry.get("prefix", "")
    has_pooler = bool(entry.get("pooler"))
    pooler_site = has_pooler and (weight_keys is None or has_pooler_weights(weight_keys, prefix))

    if family == ENCODER:
        default_sites = ("cls", "pooler", "mask") if pooler_site else ("cls", "mask")
    else:
        # next: where generation starts, the site the decoder detector (target-inversion) searches.
        default_sites = ("next",)
    default_sites += ("embedding",) * embedding + ("label",) * head
    sites = default_sites + ("tokens",) + ("last",) * (family != ENCODER)

    return ArchInfo(
        model_type=model_type,
        family=family,
        hidden_size=_size(config, "hidden_size"),
        num_layers=_size(config, "num_layers"),
        # State-space and recurrent decoders (mamba, rwkv) have no attention heads: 0.
        num_heads=_size(config, "num_heads", required=family == ENCODER),
        has_pooler=has_pooler,
        sites=sites,
        default_sites=default_sites,
        base_model_prefix=prefix,
    )
