"""Resolve a model reference (local path, bundled MiniLM, Hub id) and load it without running its code."""

from lmscan.models.architectures import (
    ARCHITECTURES,
    ArchInfo,
    decoder_types,
    identify,
    supported_model_types,
    supported_summary,
)
from lmscan.models.model import LoadedModel, load_model, quiet_transformers
from lmscan.models.resolve import (
    BUNDLED_ALIASES,
    ResolvedModel,
    find_weight_files,
    resolve_model,
    sha256_file,
)
from lmscan.models.safe_load import load_state_dict

__all__ = [
    "ARCHITECTURES",
    "BUNDLED_ALIASES",
    "ArchInfo",
    "LoadedModel",
    "ResolvedModel",
    "find_weight_files",
    "decoder_types",
    "identify",
    "load_model",
    "load_state_dict",
    "quiet_transformers",
    "resolve_model",
    "sha256_file",
    "supported_model_types",
    "supported_summary",
]
