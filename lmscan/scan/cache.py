"""Result cache: finished reports keyed by everything that decides a scan's result.

An entry is ``<dir>/results/<key>.json`` with ``key`` = sha256 of a canonical JSON of
:func:`scan_identity`: the sha256 of every file in the model's folder (weights, the files
that change what the model computes, and every other file, which the ``files``
inventory judges), the effective
settings after every rules file was merged, the content of the rules in force, the
probe corpus, the word list, lmscan's version and a digest of its source, and the
torch/transformers versions. Any change there misses the cache instead of returning
a stale verdict. Writes are atomic (temporary file + ``os.replace``); an unreadable
or corrupt entry is deleted and treated as a miss, never an error.

Directory: ``$LMSCAN_CACHE_DIR``, else ``cache_dir`` from the project config, else
``$XDG_CACHE_HOME/lmscan``, else ``~/.cache/lmscan``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import tempfile
from pathlib import Path

from lmscan import __version__
from lmscan.findings import Report
from lmscan.report.json_report import from_dict, jsonable, to_dict

CACHE_FORMAT = 3  # 3: the key covers every file in the folder
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir(config: dict | None = None) -> Path:
    """Where lmscan caches results (see the module docstring for the order)."""
    env = os.environ.get("LMSCAN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if config and config.get("cache_dir"):
        return Path(config["cache_dir"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lmscan"
    return Path.home() / ".cache" / "lmscan"


def canonical_json(value) -> str:
    """Deterministic JSON text of ``value`` (sorted keys, no spaces, JSON-safe values)."""
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ResultCache:
    """Reports of finished scans on disk."""

    def __init__(self, directory: str | Path | None = None):
        self.dir = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.results_dir = self.dir / "results"

    @classmethod
    def from_config(cls, config: dict | None = None) -> ResultCache:
        return cls(default_cache_dir(config))

    def key(self, identity: dict) -> str:
        """sha256 over the canonical JSON of a scan identity (see :func:`scan_identity`)."""
        if not identity.get("weights"):
            raise ValueError("the weights' sha256 is required for a cache key")
        return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key or ""):
            raise ValueError(f"not a cache key: {key!r}")
        return self.results_dir / f"{key}.json"

    def get(self, key: str) -> Report | None:
        """The cached report (with ``from_cache`` set), or None on a miss or a bad entry."""
        try:
            path = self.path(key)
        except ValueError:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            self._discard(path)
            return None
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
                raise ValueError("not an lmscan cache entry for this key")
            report = from_dict(entry["report"])
        except Exception:  # noqa: BLE001 - any damage to an entry is a miss, never a crash
            self._discard(path)
            return None
        report.from_cache = True
        return report

    def put(self, key: str, report: Report) -> bool:
        """Store a report atomically. False (and nothing stored) when the directory is not writable."""
        path = self.path(key)
        data = to_dict(report)
        data["from_cache"] = False
        text = json.dumps({"format": CACHE_FORMAT, "key": key, "report": data}, ensure_ascii=False, allow_nan=False)
        tmp_name = None
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.results_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
            return True
        except OSError:
            return False
        finally:
            if tmp_name is not None:
                self._discard(Path(tmp_name))

    def clear(self) -> int:
        """Remove every cached result; return how many entries were removed."""
        if not self.results_dir.is_dir():
            return 0
        removed = 0
        for entry in self.results_dir.iterdir():
            if not entry.is_file() or entry.suffix != ".json":
                continue
            is_result = not entry.name.startswith(".tmp-")
            if self._discard(entry) and is_result:
                removed += 1
        return removed

    @staticmethod
    def _discard(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return False


def scan_identity(plan) -> dict:
    """Everything that decides the result of the scan ``plan`` (lmscan.scan.plan.ScanPlan)
    besides chance: see the module docstring. Output options, the cache folder and the
    model's path or name do not belong here."""
    import torch
    import transformers

    from lmscan.models.device import native_bf16, pick_device

    config, resolved = plan.config, plan.resolved
    device = pick_device(config.device)
    return {
        "weights": dict(resolved.weight_sha256),
        "files": dict(resolved.file_sha256),
        # Everything else in the folder: the `files` inventory judges these, so a pickle added
        # beside weights scanned before (or one removed) is a different scan.
        "other_files": {name: entry["sha256"] for name, entry in resolved.other_files.items()},
        # An adapter is scanned merged into its base: the same adapter on another base is another scan.
        "base": None if getattr(resolved, "base", None) is None else resolved.base.folder_sha256,
        # A full checkpoint's declared base decides what base-diff finds: another base, another scan.
        "reference": None if getattr(resolved, "reference", None) is None else resolved.reference.folder_sha256,
        "scan": {"profile": config.profile, "engine": config.engine, "detectors": list(plan.detectors),
                 "sites": config.sites, "seed": config.seed, "text_column": config.text_column},
        "settings": plan.settings,
        "rules": plan.rules,
        "probes": _probes_digest(config.probes_file),
        "word_list": _word_list_digest(),
        # The sweep's first stage runs in bf16 where the hardware has it; that ranks slightly differently.
        "compute": {"device": device.type, "bf16": native_bf16(device)},
        "code": {"lmscan": __version__, "source": source_digest(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "python": platform.python_version()},
    }


def _probes_digest(probes_file: str | None) -> str:
    from lmscan.models import sha256_file

    if probes_file:
        return sha256_file(Path(probes_file))
    from lmscan.models.probes import load_builtin_probes

    return hashlib.sha256("\n".join(load_builtin_probes()).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _word_list_digest() -> str:
    from lmscan.models.probes import word_list

    return hashlib.sha256("\n".join(word_list()).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over lmscan's own files (code and bundled data): a change to the code that
    keeps the version number still misses the cache."""
    root = Path(__file__).resolve().parents[1]  # the lmscan package, this file being lmscan/scan/cache.py
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".txt", ".csv", ".toml")
                       and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
