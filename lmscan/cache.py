"""Result cache: finished reports keyed by weights, lmscan version and scan configuration.

An entry is ``<dir>/results/<key>.json`` with ``key`` = sha256 of a canonical JSON
of (model sha256, lmscan version, scan config). A new lmscan version or any change
to the configuration therefore misses the cache instead of returning a stale
verdict. Writes are atomic (temporary file + ``os.replace``); an unreadable or
corrupt entry is deleted and treated as a miss, never an error.

Directory: ``$LMSCAN_CACHE_DIR``, else ``cache_dir`` from the project config, else
``$XDG_CACHE_HOME/lmscan``, else ``~/.cache/lmscan``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from lmscan import __version__
from lmscan.findings import Report
from lmscan.report.json_report import from_dict, jsonable, to_dict

CACHE_FORMAT = 1
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

    def key(self, model_sha256: str, config: dict) -> str:
        """sha256 over (model sha256, lmscan version, canonical JSON of the scan config)."""
        if not model_sha256:
            raise ValueError("model_sha256 is required for a cache key")
        payload = canonical_json({"model_sha256": model_sha256, "lmscan_version": __version__, "config": config})
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

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
