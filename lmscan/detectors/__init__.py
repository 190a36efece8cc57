"""Detectors and their registry.

Each detector is one module with a class following lmscan.detectors.base.Detector;
adding one is that file plus one line in ``BUILTIN`` below. Modules are imported on
first use, so listing names (and rejecting a typo in ``--detectors``) costs nothing.
"""

from __future__ import annotations

import importlib

from lmscan.errors import InputError

# name -> "module:Class"; the order is the order `lmscan check` runs them in.
BUILTIN = {
    "files": "lmscan.detectors.files:CheckpointFiles",  # always runs first (lmscan.api.scan)
    "static": "lmscan.detectors.static:StaticRules",
    "vocab-sweep": "lmscan.detectors.vocab_sweep:VocabSweep",
    "trigger-search": "lmscan.detectors.trigger_search:TriggerSearch",  # seeded by the sweep's ranking
    "sentence-starts": "lmscan.detectors.sentence_starts:SentenceStarts",  # classifiers with a head
    "pv-mining": "lmscan.detectors.pv_mining:PVMining",
    "attention": "lmscan.detectors.attention:AttentionHeads",
    "piccolo": "lmscan.detectors.piccolo:Piccolo",
    "base-diff": "lmscan.detectors.base_diff:BaseDiff",  # with --base on a full checkpoint
    "target-inversion": "lmscan.detectors.target_inversion:TargetInversion",  # decoders
}

_registered: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a detector class at run time (a plugin, or a test's toy detector)."""
    _registered[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _registered.pop(name, None)


def names() -> list[str]:
    return [*BUILTIN, *(n for n in _registered if n not in BUILTIN)]


def get(name: str) -> type:
    """The detector class called ``name``; InputError for an unknown name."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN:
        raise InputError(f"unknown detector {name!r} (available: {', '.join(names())})")
    module, _, attr = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_names(requested) -> list[str]:
    unknown = [d for d in requested if d not in names()]
    if unknown:
        raise InputError(f"unknown detector(s) {', '.join(unknown)} (available: {', '.join(names())})")
    return list(requested)
