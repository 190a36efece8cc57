"""Hyper-parameters and thresholds live as TOML in rules/; this module reads them.

Lookup for a file name: the rules shipped with lmscan, with the user's ``--rules DIR``
file of the same name (if any) laid over it key by key, so a user overrides one
threshold without copying a whole file. Settings tables become frozen config
dataclasses through :func:`dataclass_from`; the dataclass defaults are the one place
defaults live, and the shipped profiles list only what differs from them.
"""

from __future__ import annotations

import dataclasses
import sys
from importlib import resources
from pathlib import Path

from lmscan.errors import InputError
from lmscan.findings import FINDING_VERDICTS, SEVERITIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

BUILTIN_RULES = Path(str(resources.files("lmscan.rules")))  # the top-level rules/, installed as lmscan.rules


def _filename(name: str) -> str:
    return name if name.endswith(".toml") else f"{name}.toml"


def user_rules_path(name: str, rules_dir: str | Path | None) -> Path | None:
    """The user's file for ``name`` in ``rules_dir``, or None."""
    if rules_dir is None:
        return None
    user_dir = Path(rules_dir).expanduser()
    if not user_dir.is_dir():
        raise InputError(f"--rules {rules_dir}: not a directory")
    path = user_dir / _filename(name)
    return path if path.is_file() else None


def rules_paths(name: str, rules_dir: str | Path | None = None) -> list[Path]:
    """The files that make up rules ``name``: the shipped one, then the user's override."""
    paths = [p for p in (BUILTIN_RULES / _filename(name), user_rules_path(name, rules_dir)) if p and p.is_file()]
    if not paths:
        raise InputError(f"no rules file {_filename(name)!r} in {rules_dir or BUILTIN_RULES}")
    return paths


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read rules file {path}: {exc}") from None


def merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``: tables merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_rules(name: str, rules_dir: str | Path | None = None) -> dict:
    merged: dict = {}
    for path in rules_paths(name, rules_dir):
        merged = merge(merged, _read(path))
    return merged


def dataclass_from(cls, values: dict | None):
    """Build a config dataclass from a rules table; unknown keys are a rules error."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} setting(s) in rules: {', '.join(unknown)}")
    annotations = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
                   for f in dataclasses.fields(cls)}
    for name, value in values.items():
        types, said = _WANTED.get(annotations[name].split("[")[0], (None, ""))
        bool_for_number = isinstance(value, bool) and types is not None and bool not in types
        if types and (not isinstance(value, types) or bool_for_number):
            raise InputError(f"bad {cls.__name__} setting in rules: {name} = {value!r}, but it takes {said}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad {cls.__name__} settings in rules: {exc}") from None


# What a setting of each annotated type accepts from TOML (a bool is no number here), and how to say it.
# Checked before any model loads: a wrong type would otherwise fail inside a detector, minutes later.
_WANTED = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
           "str": ((str,), "a string"), "tuple": ((list, tuple), "a list"), "list": ((list, tuple), "a list")}


def load_catalog(rules_dir: str | Path | None = None) -> dict:
    """Rule id -> metadata (rules/rule_catalog.toml with a user's file laid over it), checked:
    every rule has the severity and verdict its findings take."""
    catalog = load_rules("rule_catalog", rules_dir)
    for rule_id, entry in catalog.items():
        if not isinstance(entry, dict):
            raise InputError(f"rule_catalog.toml: [{rule_id}] must be a table")
        if entry.get("severity") not in SEVERITIES:
            raise InputError(f"rule_catalog.toml: [{rule_id}] severity must be one of {list(SEVERITIES)}")
        if entry.get("verdict") not in FINDING_VERDICTS:
            raise InputError(f"rule_catalog.toml: [{rule_id}] verdict must be one of {list(FINDING_VERDICTS)}")
    return catalog
