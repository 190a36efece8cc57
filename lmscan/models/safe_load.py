"""Read checkpoint weights without ever running code from the checkpoint.

safetensors files are plain data and go through ``safetensors.torch.load_file``.
Pickled PyTorch checkpoints (``pytorch_model.bin``) are a program for the pickle
machine; lmscan reads them in two guarded steps:

1. a static pass over the pickle opcodes (nothing is executed) that rejects any
   reference to a callable or class outside a small allow-list of tensor-rebuilding
   helpers, so a payload is refused even on a PyTorch whose weights-only loader is
   weaker than today's;
2. ``torch.load(..., weights_only=True)``, PyTorch's restricted unpickler.

Either guard refusing raises :class:`UnsafeCheckpointError`; the payload never runs.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from lmscan.errors import InputError, LmscanError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# Globals a plain PyTorch state dict needs. A subset of what torch's weights-only
# unpickler accepts, so this pass never lets through what torch would refuse.
_ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
        "_codecs.encode",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch._tensor._rebuild_from_type_v2",
    }
)
_TENSOR_CLASS_MODULES = frozenset({"torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse"})
_TENSOR_CLASS_RE = re.compile(r"^[A-Z][A-Za-z0-9]*(Storage|Tensor)$")
_REBUILD_RE = re.compile(r"^_rebuild_[a-z0-9_]+$")
_TORCH_CONSTANT_RE = re.compile(r"^[a-z][a-z0-9_]*$")

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
)
_NEUTRAL_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
# The legacy (pre-zip) torch format is up to five pickles back to back, then raw bytes.
_LEGACY_PICKLES = 5


def load_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Load and merge the tensors of ``files`` (all shards of one checkpoint) on the CPU.

    Raises InputError for unreadable, corrupt or truncated files and for duplicate
    tensor names across shards; UnsafeCheckpointError for a pickle holding anything
    but plain tensors.
    """
    if not files:
        raise InputError("no weight files to load")
    merged: dict[str, torch.Tensor] = {}
    for path in files:
        path = Path(path)
        tensors = _load_one(path)
        clash = next((k for k in tensors if k in merged), None)
        if clash is not None:
            raise InputError(f"{path.name}: tensor {clash!r} also appears in another shard of this checkpoint")
        merged.update(tensors)
    if not merged:
        raise InputError(f"{', '.join(Path(f).name for f in files)}: the checkpoint holds no tensors")
    return merged


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: no such weight file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the weight file is empty")
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.name.endswith(PICKLE_SUFFIXES):
        return _load_pickle(path)
    raise InputError(f"{path}: unknown weight file format (expected .safetensors or a PyTorch .bin)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, and whatever a broken header raises
        raise InputError(f"{path}: not a valid safetensors file, corrupt or truncated ({_short(exc)})") from None


# --- pickled checkpoints -----------------------------------------------------------------------


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _scan_zip_checkpoint(path)
    else:
        with open(path, "rb") as handle:
            if handle.read(4) == b"PK\x03\x04":
                raise InputError(f"{path}: truncated or corrupt PyTorch checkpoint (incomplete zip archive)")
        _scan_legacy_checkpoint(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise _unsafe(path, _torch_reason(exc)) from None
    except Exception as exc:  # RuntimeError from a broken zip, EOFError, KeyError, ...
        raise InputError(f"{path}: not a valid PyTorch checkpoint, corrupt or truncated ({_short(exc)})") from None
    return _as_state_dict(obj, path)


def _as_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept a mapping of name -> tensor, or one nested under 'state_dict' / 'model'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise InputError(f"{path}: the checkpoint is not a state dict (a mapping of names to tensors)")


def scan_pickle_file(path: Path) -> dict:
    """The static opcode pass alone, for a pickle lmscan does not load: what it imports.
    Returns ``{"scanned": True, "code": bool, "detail": str}``; never runs the pickle."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            _scan_zip_checkpoint(path)
        elif path.name.endswith(PICKLE_SUFFIXES):
            _scan_legacy_checkpoint(path)
        else:  # a plain pickle (.pkl, .pickle, .ckpt, .joblib): one stream
            with open(path, "rb") as handle:
                _scan_pickle_stream(handle, path, first=True)
    except UnsafeCheckpointError as exc:
        return {"scanned": True, "code": True, "detail": str(exc)}
    except (InputError, OSError) as exc:
        return {"scanned": True, "code": False, "detail": f"unreadable as a pickle: {exc}"}
    return {"scanned": True, "code": False, "detail": "plain tensors only"}


def _unsafe(path: Path, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: the pickle contains code/objects outside plain tensors ({reason}); "
        "lmscan never runs code from checkpoints"
    )


def _scan_zip_checkpoint(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith(".pkl")]
            if not pickles:
                raise InputError(f"{path}: a zip file without a pickled state dict, not a PyTorch checkpoint")
            for name in pickles:
                data = archive.read(name)
                _scan_pickle_stream(io.BytesIO(data), path, first=True)
    except LmscanError:
        raise
    except Exception as exc:  # BadZipFile, OSError, EOFError, zlib.error / LZMAError from a bad compressed member
        raise InputError(f"{path}: not a valid PyTorch checkpoint, corrupt or truncated ({_short(exc)})") from None


def _scan_legacy_checkpoint(path: Path) -> None:
    with open(path, "rb") as handle:
        for index in range(_LEGACY_PICKLES):
            if not handle.peek(1):
                break  # end of file: fewer pickles than a full legacy checkpoint
            _scan_pickle_stream(handle, path, first=index == 0)


def _scan_pickle_stream(stream, path: Path, first: bool) -> None:
    """Walk one pickle's opcodes (executing nothing); refuse globals outside the allow-list."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # values pushed by recent opcodes (strings, else None)
    offending: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if not _is_allowed_global(module, attr):
                    offending.append(f"{module}.{attr}")
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and all(isinstance(v, str) for v in recent[-2:]):
                    if not _is_allowed_global(recent[-2], recent[-1]):
                        offending.append(f"{recent[-2]}.{recent[-1]}")
                else:
                    offending.append("<a global whose name is computed at load time>")
                recent.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                offending.append(f"<copyreg extension {arg}>")
                recent.append(None)
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name not in _NEUTRAL_OPS:
                recent.append(None)
            if len(recent) > 64:
                del recent[:-8]
    except Exception as exc:  # ValueError / EOFError from a malformed or truncated pickle
        if not offending:
            what = "not a valid PyTorch checkpoint, corrupt or truncated" if first else "corrupt PyTorch checkpoint"
            raise InputError(f"{path}: {what} ({_short(exc)})") from None
    if offending:
        unique = list(dict.fromkeys(offending))
        shown = ", ".join(unique[:4]) + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
        raise _unsafe(path, f"it imports {shown}")


def _is_allowed_global(module: str, name: str) -> bool:
    if f"{module}.{name}" in _ALLOWED_GLOBALS:
        return True
    if module in _TENSOR_CLASS_MODULES and _TENSOR_CLASS_RE.match(name):
        return True
    if module == "torch._utils" and _REBUILD_RE.match(name):
        return True
    if module == "torch" and _TORCH_CONSTANT_RE.match(name):
        # dtypes (torch.float16), layouts and quantisation schemes are plain constants
        value = getattr(torch, name, None)
        return isinstance(value, (torch.dtype, torch.layout, torch.qscheme))
    return False


_TORCH_REASON_RE = re.compile(
    r"(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|Unsupported operand \S+|Unsupported class \S+)",
    re.IGNORECASE,
)


def _torch_reason(exc: BaseException) -> str:
    match = _TORCH_REASON_RE.search(str(exc))
    if match:
        return "torch's weights-only loader: " + match.group(1).rstrip(".,;")
    return "rejected by torch's weights-only loader"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text[:160] + ("..." if len(text) > 160 else "")
