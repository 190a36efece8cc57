"""The ``.pvs`` file: a model's backdoor output signatures for the runtime monitor.

A UTF-8 JSON document, readable without pickle or lmscan (format documented in the
README). Each PV is kept as a sign string, one '+' or '-' per hidden unit ('+' means
the feature value is >= 0), because the monitor compares signs only.

    {"format": "lmscan-pvs", "version": 1, "created": "...", "generator": "lmscan 0.1.0",
     "model": {"ref", "repo_id", "commit", "model_sha256", "weight_sha256", "architecture", "hidden_size"},
     "t_match": 0.8, "calibration": {...}, "search": {...},
     "pvs": [{"id": 0, "site": "cls", "template": null, "signs": "+-+...", "verified": true,
              "source": "vocab-sweep", "collapse": 0.02, "activation_rate": 1.0,
              "triggers": [{"text": "zq", "tokens": ["z", "##q"], "activation_rate": 1.0, ...}]}]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lmscan.errors import InputError
from lmscan.models.sites import SITES

FORMAT = "lmscan-pvs"
VERSION = 1


@dataclass
class PVEntry:
    id: int
    site: str
    template: str | None  # None: the plain input; else the prompt it is wrapped in ("{text}", "{mask}")
    signs: np.ndarray  # bool, True where the PV is >= 0
    verified: bool = True
    source: str = ""
    triggers: list[dict] = field(default_factory=list)
    collapse: float | None = None
    activation_rate: float | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return self.site, self.template


@dataclass
class PVSet:
    model: dict
    t_match: float
    pvs: list[PVEntry]
    calibration: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    created: str = ""
    generator: str = ""
    version: int = VERSION

    @property
    def hidden_size(self) -> int:
        return int(self.model["hidden_size"])


def encode_signs(signs: np.ndarray) -> str:
    return "".join("+" if s else "-" for s in signs)


def decode_signs(text: str, where: str) -> np.ndarray:
    if not isinstance(text, str) or set(text) - {"+", "-"}:
        raise InputError(f"{where}: 'signs' must be a string of '+' and '-'")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("+")


def to_dict(pvset: PVSet) -> dict:
    return {
        "format": FORMAT,
        "version": pvset.version,
        "created": pvset.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generator": pvset.generator,
        "model": pvset.model,
        "t_match": pvset.t_match,
        "calibration": pvset.calibration,
        "search": pvset.search,
        "pvs": [
            {"id": p.id, "site": p.site, "template": p.template, "signs": encode_signs(p.signs),
             "verified": p.verified, "source": p.source, "collapse": p.collapse,
             "activation_rate": p.activation_rate, "triggers": p.triggers}
            for p in pvset.pvs
        ],
    }


def write_pvs(pvset: PVSet, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(to_dict(pvset), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def read_pvs(path: str | Path) -> PVSet:
    """Read and validate a .pvs file; every problem is one InputError line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such .pvs file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not a .pvs file (invalid JSON at line {exc.lineno})") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, arrays nested thousands deep
        raise InputError(f"{path}: not a .pvs file (a number too long or arrays nested too deep)") from None
    return from_dict(data, str(path))


def trigger_words(path: str | Path) -> list[str]:
    """The first trigger word of each PV in a .pvs file (a defence's suspected triggers)."""
    words = [p.triggers[0]["text"] for p in read_pvs(path).pvs if p.triggers and p.triggers[0].get("text")]
    if not words:
        raise InputError(f"{path}: no PV in this .pvs file names a trigger word; give --triggers instead")
    return list(dict.fromkeys(words))


def from_dict(data, where: str = ".pvs") -> PVSet:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{where}: not a .pvs file (missing \"format\": \"{FORMAT}\")")
    version = data.get("version")
    if version != VERSION:
        raise InputError(f"{where}: unsupported .pvs version {version!r} (this lmscan reads version {VERSION})")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("hidden_size"), int) or model["hidden_size"] <= 0:
        raise InputError(f"{where}: 'model.hidden_size' must be a positive integer")
    t_match = data.get("t_match")
    if not isinstance(t_match, (int, float)) or not 0.5 < t_match <= 1.0:
        raise InputError(f"{where}: 't_match' must be a number in (0.5, 1]")
    raw = data.get("pvs")
    if not isinstance(raw, list):
        raise InputError(f"{where}: 'pvs' must be a list")
    pvs = []
    for index, item in enumerate(raw):
        here = f"{where}: pvs[{index}]"
        if not isinstance(item, dict):
            raise InputError(f"{here} must be an object")
        site = item.get("site")
        if site not in SITES:
            raise InputError(f"{here}: unknown site {site!r} (known: {', '.join(SITES)})")
        template = item.get("template")
        if template is not None and (not isinstance(template, str) or "{text}" not in template):
            raise InputError(f"{here}: 'template' must be null or a string containing {{text}}")
        signs = decode_signs(item.get("signs"), here)
        if len(signs) != model["hidden_size"]:
            raise InputError(f"{here}: {len(signs)} signs but the model's hidden size is {model['hidden_size']}")
        pv_id = item.get("id", index)
        if not isinstance(pv_id, int) or isinstance(pv_id, bool):
            raise InputError(f"{here}: 'id' must be an integer")
        triggers = item.get("triggers") or []
        if not isinstance(triggers, list) or not all(isinstance(t, dict) and isinstance(t.get("text"), str)
                                                     for t in triggers):
            raise InputError(f"{here}: 'triggers' must be a list of objects with a 'text' string")
        pvs.append(PVEntry(id=pv_id, site=site, template=template, signs=signs,
                           verified=bool(item.get("verified", True)), source=str(item.get("source", "")),
                           triggers=triggers, collapse=item.get("collapse"),
                           activation_rate=item.get("activation_rate")))
    for key in ("calibration", "search"):
        if not isinstance(data.get(key) or {}, dict):
            raise InputError(f"{where}: '{key}' must be an object")
    return PVSet(model=model, t_match=float(t_match), pvs=pvs, calibration=dict(data.get("calibration") or {}),
                 search=dict(data.get("search") or {}), created=str(data.get("created", "")),
                 generator=str(data.get("generator", "")), version=version)
