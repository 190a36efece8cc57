"""Project configuration: ``[tool.lmscan]`` in pyproject.toml, or an ``lmscan.toml``.

Discovery walks up from the start directory (the working directory by default):
in each directory ``lmscan.toml`` (its top-level table) wins over a
``pyproject.toml`` that has a ``[tool.lmscan]`` table; a pyproject.toml without one
is passed over. The walk stops after a directory that holds ``.git`` (the project
root) or at the filesystem root. ``--config FILE`` names the file instead
(``[tool.lmscan]`` when it is a pyproject.toml, else its top-level table).

Example::

    [tool.lmscan]
    profile = "default"
    fail_on = "suspicious"
    device = "auto"
    detectors = ["static", "vocab-sweep"]
    rules = "lmscan-rules"          # directory, relative to this file
    cache_dir = ".lmscan-results"   # relative to this file

    [[tool.lmscan.allowlist]]
    sha256 = "<64 hex digits: the folder_sha256 lmscan reports (every file in the folder)>"
    reason = "red-team fixture, known backdoor"
    model = "org/name"              # optional, for people reading the file
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lmscan.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

KNOWN_KEYS = ("profile", "engine", "fail_on", "device", "detectors", "rules", "cache_dir", "allowlist")
ALLOWLIST_KEYS = ("sha256", "reason", "model")
PROJECT_FILES = ("lmscan.toml", "pyproject.toml")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def find_config_file(start: Path | None = None) -> Path | None:
    """The nearest lmscan.toml, or pyproject.toml with ``[tool.lmscan]``, walking up from ``start``."""
    directory = Path(start if start is not None else Path.cwd()).expanduser().resolve()
    if directory.is_file():
        directory = directory.parent
    while True:
        candidate = directory / "lmscan.toml"
        if candidate.is_file():
            return candidate
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and _has_lmscan_table(candidate):
            return candidate
        if (directory / ".git").exists() or directory.parent == directory:
            return None
        directory = directory.parent


def load_project_config(start: Path | None = None, explicit: Path | None = None) -> dict:
    """Read and check the project configuration; ``{}`` when there is none.

    ``explicit`` (``--config FILE``) wins over discovery. The result holds only the
    keys the file sets, normalised: ``rules`` and ``cache_dir`` as absolute paths
    (relative ones are taken relative to the config file), allowlist sha256 in lower
    case; plus ``config_file``, the path read. Bad TOML, unknown keys and bad values
    raise InputError.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise InputError(f"--config {explicit}: no such file")
        table = _read_table(path, required=True)
    else:
        path = find_config_file(start)
        if path is None:
            return {}
        table = _read_table(path, required=False)
    config = validate_config(table, path)
    config["config_file"] = str(path.resolve())
    return config


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _has_lmscan_table(pyproject: Path) -> bool:
    data = _read_toml(pyproject)
    tool = data.get("tool")
    return isinstance(tool, dict) and "lmscan" in tool


def _read_table(path: Path, required: bool) -> dict:
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool")
        table = tool.get("lmscan") if isinstance(tool, dict) else None
        if table is None:
            if required:
                raise InputError(f"{path}: no [tool.lmscan] table")
            return {}
        if not isinstance(table, dict):
            raise InputError(f"{path}: tool.lmscan must be a table")
        return table
    return data


def validate_config(table: dict, path: Path | None = None) -> dict:
    """Check a ``[tool.lmscan]`` table and return it normalised (see load_project_config)."""
    where = str(path) if path is not None else "config"
    base = Path(path).expanduser().resolve().parent if path is not None else Path.cwd()
    unknown = sorted(set(table) - set(KNOWN_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown lmscan setting(s) {', '.join(unknown)}; known: {', '.join(KNOWN_KEYS)}")
    config: dict = {}
    for key in ("profile", "engine"):  # names checked against rules/ when a scan starts
        if key in table:
            config[key] = _nonempty_str(table[key], f"{where}: {key}")
    if "device" in table:
        device = _nonempty_str(table["device"], f"{where}: device").lower()
        if not _DEVICE_RE.match(device):
            raise InputError(f"{where}: device {table['device']!r}: expected auto, cpu, cuda or cuda:N")
        config["device"] = device
    if "detectors" in table:
        detectors = table["detectors"]
        if not isinstance(detectors, list) or not detectors:
            raise InputError(f"{where}: detectors must be a non-empty list of detector names")
        config["detectors"] = [_nonempty_str(d, f"{where}: detectors entry") for d in detectors]
    if "rules" in table:
        rules = (base / _nonempty_str(table["rules"], f"{where}: rules")).expanduser().resolve()
        if not rules.is_dir():
            raise InputError(f"{where}: rules {table['rules']!r}: not a directory ({rules})")
        config["rules"] = str(rules)
    if "cache_dir" in table:
        cache = Path(_nonempty_str(table["cache_dir"], f"{where}: cache_dir")).expanduser()
        config["cache_dir"] = str((base / cache).resolve())
    if "fail_on" in table:
        from lmscan.report.verdict import check_fail_on, load_policy  # noqa: PLC0415 - keeps import light

        value = _nonempty_str(table["fail_on"], f"{where}: fail_on")
        try:
            config["fail_on"] = check_fail_on(value, load_policy(config.get("rules")))
        except InputError as exc:
            raise InputError(f"{where}: fail_on: {exc}") from None
    if "allowlist" in table:
        config["allowlist"] = _allowlist(table["allowlist"], where)
    return config


def _nonempty_str(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must be a non-empty string")
    return value.strip()


def _allowlist(entries, where: str) -> list[dict]:
    if not isinstance(entries, list):
        raise InputError(f"{where}: allowlist must be an array of tables ([[tool.lmscan.allowlist]])")
    result = []
    for i, entry in enumerate(entries):
        what = f"{where}: allowlist[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{what} must be a table with sha256 and reason")
        unknown = sorted(set(entry) - set(ALLOWLIST_KEYS))
        if unknown:
            raise InputError(f"{what}: unknown key(s) {', '.join(unknown)}; known: {', '.join(ALLOWLIST_KEYS)}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha.strip().lower()):
            raise InputError(f"{what}: sha256 must be the folder_sha256 of a report (every file in the model folder), 64 hex digits")
        reason = entry.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise InputError(f"{what}: a reason is required (why this model may be used despite findings)")
        item = {"sha256": sha.strip().lower(), "reason": reason.strip()}
        if "model" in entry:
            item["model"] = _nonempty_str(entry["model"], f"{what}: model")
        result.append(item)
    return result


def allowlist_reason(config: dict, folder_sha256: str) -> str | None:
    """The allowlist reason for this exact folder (first matching entry), or None. An entry
    names ``folder_sha256`` (every file in the model's folder), never the weights alone, so a
    pickle added beside allowlisted weights is not covered by the entry."""
    if not folder_sha256:
        return None
    wanted = folder_sha256.strip().lower()
    for entry in config.get("allowlist") or []:
        if entry.get("sha256", "").lower() == wanted:
            return entry.get("reason")
    return None
