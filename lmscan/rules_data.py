"""Hyper-parameters and thresholds live as TOML in rules/; this module reads them.

Lookup order for a file name: the user's ``--rules DIR`` (if given), then the rules
shipped with lmscan. A user file replaces the shipped file of the same name whole,
so what is in force is always one readable file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmscan.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

BUILTIN_RULES = Path(__import__("importlib.resources", fromlist=["files"]).files("lmscan.rules"))  # rules/ (pyproject)


def rules_path(name: str, rules_dir: str | Path | None = None) -> Path:
    filename = name if name.endswith(".toml") else f"{name}.toml"
    if rules_dir is not None:
        user_dir = Path(rules_dir).expanduser()
        if not user_dir.is_dir():
            raise InputError(f"--rules {rules_dir}: not a directory")
        if (user_dir / filename).is_file():
            return user_dir / filename
    path = BUILTIN_RULES / filename
    if not path.is_file():
        raise InputError(f"no rules file {filename!r} in {rules_dir or BUILTIN_RULES}")
    return path


def load_rules(name: str, rules_dir: str | Path | None = None) -> dict:
    path = rules_path(name, rules_dir)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read rules file {path}: {exc}") from None
