"""GGUF files (llama.cpp's single-file format): the header read as data, never as code.

A GGUF file is a header (magic, version, tensor and metadata counts), metadata
key/values (architecture, sizes, the tokenizer, often a chat template), a table of
tensor infos (name, dims, quantisation type, data offset) and the aligned tensor data.
Nothing in it runs; the risks are a chat template that escapes a runtime's sandbox
(checked like any other, lmscan.models.chat_template) and a malformed table that makes
loaders disagree on which bytes are which weights (checked here).

The header is read with the ``gguf`` package's reader (an optional extra); the weights
are dequantised by transformers when it implements the GGUF architecture.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lmscan.errors import CannotAssess, InputError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'lmscan-backdoor[gguf]'"
TEMPLATE_KEY = "tokenizer.chat_template"

# The smallest tensor info (name length, a one-byte name, n_dims, one dim, type, offset) and
# key/value (key length, a one-byte key, type, a one-byte value): a count the file cannot hold
# is refused before any reader walks it.
_MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8
_MIN_KV = 8 + 1 + 4 + 1
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 40  # a trillion weights in one tensor: no real checkpoint comes near
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GGUFInfo:
    """What lmscan knows of a GGUF file from its header alone."""

    file: str  # the file name in its folder
    version: int
    architecture: str
    tensor_count: int
    kv_count: int
    tensor_types: tuple[str, ...]  # quantisation types of the tensors (Q4_K, F32, ...)
    chat_templates: tuple[tuple[str, str], ...] = ()  # (metadata key, template text)
    problems: tuple[str, ...] = field(default_factory=tuple)  # table inconsistencies, one line each


def require_gguf():
    """The gguf package, or CannotAssess naming the extra that installs it."""
    try:
        import gguf  # noqa: PLC0415 - optional extra
    except ImportError:
        raise CannotAssess(f"reading GGUF files needs the gguf extra: {INSTALL_HINT}") from None
    try:
        import accelerate  # noqa: F401, PLC0415 - transformers loads GGUF weights through it
    except ImportError:
        raise CannotAssess(f"loading GGUF weights needs accelerate, part of the gguf extra: {INSTALL_HINT}") from None
    return gguf


def read_gguf_header(path: Path) -> GGUFInfo:
    """Read and check ``path``'s header and tensor table. InputError for a file that is not a
    readable GGUF; CannotAssess when the gguf extra is missing."""
    path = Path(path)
    size = path.stat().st_size
    version, tensor_count, kv_count = _check_counts(path, size)
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # ValueError, IndexError, KeyError, OverflowError from a broken table
        raise InputError(f"{path}: not a valid GGUF file, corrupt or truncated ({_short(exc)})") from None
    architecture = _string_field(reader, "general.architecture") or ""
    templates = tuple((key, text) for key in reader.fields
                      if key == TEMPLATE_KEY or key.startswith(TEMPLATE_KEY + ".")
                      for text in [_string_field(reader, key)] if text is not None)
    problems = tuple(_table_problems(reader, size, tensor_count, architecture))
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    return GGUFInfo(path.name, version, architecture, tensor_count, kv_count, types, templates, problems)


def _check_counts(path: Path, size: int) -> tuple[int, int, int]:
    """Magic, version and the two counts, read with struct before any reader trusts them."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    version, tensor_count, kv_count = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise InputError(f"{path}: GGUF version {version} is not one lmscan reads (2 or 3)")
    if tensor_count * _MIN_TENSOR_INFO + kv_count * _MIN_KV > size:
        raise InputError(f"{path}: the GGUF header claims {tensor_count} tensors and {kv_count} metadata entries, "
                         f"more than a file of {size} bytes can hold")
    return version, tensor_count, kv_count


def _string_field(reader, key: str) -> str | None:
    entry = reader.fields.get(key)
    if entry is None:
        return None
    try:
        value = entry.contents()
    except Exception:  # noqa: BLE001 - a field of another type is simply not a string
        return None
    return value if isinstance(value, str) else None


def _int_field(reader, key: str) -> int | None:
    entry = reader.fields.get(key)
    if entry is None:
        return None
    try:
        value = entry.contents()
    except Exception:  # noqa: BLE001
        return None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _table_problems(reader, size: int, tensor_count: int, architecture: str) -> list[str]:
    """What the reader accepted but a loader may read differently: tensors outside the file,
    overlapping or misaligned data, absurd shapes, counts that disagree with the metadata."""
    problems = []
    if len(reader.tensors) != tensor_count:
        problems.append(f"the header counts {tensor_count} tensors but the table holds {len(reader.tensors)}")
    alignment = int(getattr(reader, "alignment", 32) or 32)
    spans = []
    for tensor in reader.tensors:
        dims = [int(d) for d in tensor.shape]
        elements = 1
        for dim in dims:
            elements *= dim
        if not dims or len(dims) > _MAX_DIMS or any(d <= 0 for d in dims) or elements > _MAX_ELEMENTS:
            problems.append(f"tensor {tensor.name!r} has an absurd shape {dims}")
            continue
        start, end = int(tensor.data_offset), int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            problems.append(f"tensor {tensor.name!r} data ends at byte {end}, past the end of the file ({size})")
        if (start - int(reader.data_offset)) % alignment:
            problems.append(f"tensor {tensor.name!r} data at byte {start} is not aligned to {alignment}")
        spans.append((start, end, tensor.name))
    spans.sort()
    for (_s1, end1, name1), (start2, _e2, name2) in zip(spans, spans[1:]):
        if start2 < end1:
            problems.append(f"tensors {name1!r} and {name2!r} share bytes: two loaders can read different weights")
    blocks = _int_field(reader, f"{architecture}.block_count")
    found = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK_RE.match(t.name))}
    if blocks is not None and found and len(found) != blocks:
        problems.append(f"the metadata names {blocks} blocks ({architecture}.block_count) but the tensors "
                        f"hold {len(found)}")
    return problems


def gguf_config(model_dir: Path, info: GGUFInfo) -> dict:
    """The transformers config of the GGUF file (what config.json is for a folder), or
    CannotAssess when transformers does not implement its architecture."""
    require_gguf()
    from transformers import AutoConfig  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()  # its GGUF notes are not lmscan's report
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # noqa: PLC0415
    except ImportError:
        GGUF_SUPPORTED_ARCHITECTURES = None  # noqa: N806 - an older layout: let the loader decide
    if GGUF_SUPPORTED_ARCHITECTURES is not None and info.architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CannotAssess(_unsupported(info))
    try:
        config = AutoConfig.from_pretrained(str(model_dir), gguf_file=info.file, local_files_only=True,
                                            trust_remote_code=False)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise CannotAssess(_unsupported(info)) from None
        raise InputError(f"{model_dir / info.file}: cannot read its config ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a broken metadata table raises
        raise InputError(f"{model_dir / info.file}: cannot read its config ({_short(exc)})") from None
    return config.to_dict()


def _unsupported(info: GGUFInfo) -> str:
    import transformers  # noqa: PLC0415

    return (f"{info.file}: GGUF architecture {info.architecture!r} cannot be dequantised by transformers "
            f"{transformers.__version__} (it loads GGUF llama, qwen2, gemma3, phi3, ...), so lmscan cannot assess it")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160] + ("..." if len(text) > 160 else "")
