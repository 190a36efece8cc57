"""A scan request resolved once: which model, with which settings, detectors, policy and rules.

Every command that scans (check, the fleet, export-pvs, heads, invert) builds one
:class:`ScanPlan` and hands it on; nothing downstream reads the profiles, the policy or the
model's config.json again. Two steps, so that a typo fails before a large model is hashed:

    request = check_request(config)      # names of profile, engine, detectors, sites; probes file
    plan = request.plan(resolved)        # the model's architecture, effective settings, detector list

:func:`plan_scan` does both (and resolves the model) for callers that need no step between.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lmscan.errors import InputError


@dataclass
class ScanConfig:
    """What a user asks for (CLI options or API arguments), before anything is checked."""

    model: str
    revision: str | None = None
    offline: bool | None = None
    profile: str = "fast"
    engine: str = "fast"  # how PV mining is scheduled (rules/engines.toml); "reference" = the paper's schedule
    detectors: list[str] | None = None  # None: the profile's list
    sites: list[str] | None = None  # None: the sites the architecture offers an attacker
    device: str = "auto"
    seed: int = 0
    rules_dir: str | None = None
    probes_file: str | None = None
    text_column: str | None = None
    # An adapter's base (default: the one it names); a full checkpoint's base for base-diff (default:
    # inferred, lmscan.models.base_inference); "none": compare with nothing.
    base: str | None = None
    settings: dict = field(default_factory=dict)  # resolved profile settings (filled by scan)


@dataclass(frozen=True)
class ScanPlan:
    """A request bound to one model: everything a scan needs besides the loaded weights."""

    config: ScanConfig
    resolved: object  # lmscan.models.resolve.ResolvedModel
    model_config: dict  # the model's config.json, read once
    model_type: str
    settings: dict  # the profile with its architecture and engine overrides applied
    detectors: list[str]  # in order; the file inventory first
    policy: dict  # rules/policy.toml
    catalog: dict  # rules/rule_catalog.toml
    rules: dict  # the content of every rules file that can change a verdict (it keys the result cache)


@dataclass(frozen=True)
class ScanRequest:
    """A checked request, not yet bound to a model (see the module docstring)."""

    config: ScanConfig
    profiles: dict
    engines: dict
    policy: dict
    catalog: dict

    def plan(self, resolved) -> ScanPlan:
        """Bind the request to a resolved model: its config.json read once, the effective
        settings and every detector's Config built (a bad setting fails before loading)."""
        from lmscan.models.architectures import DECODER, architecture_entry, check_config
        from lmscan.scan.stages import check_settings

        model_config = model_config_of(resolved)
        model_type = check_config(model_config)
        settings = merged_settings(self.profiles, self.engines, self.config.profile, self.config.engine, model_type)
        chosen = self.config.detectors or settings["detectors"]
        if not self.config.detectors and architecture_entry(model_type)["family"] == DECODER:
            # The profile's encoder detectors would only be skipped on a decoder: it has its own list.
            chosen = settings.get("decoder_detectors", chosen)
        if self._may_infer_reference(resolved, model_type):
            from lmscan.models.base_inference import infer_reference

            resolved.reference, resolved.reference_note = infer_reference(resolved, model_config)
        if not self.config.detectors and getattr(resolved, "reference", None) is not None:
            # --base on a full checkpoint: the detectors that compare it with its declared base join in.
            chosen = [*chosen, *(d for d in settings.get("reference_detectors", []) if d not in chosen)]
        detectors = detector_order(chosen)
        check_settings(detectors, settings)
        rules = {"profiles": self.profiles, "engines": self.engines, "policy": self.policy,
                 "rule_catalog": self.catalog}
        return ScanPlan(self.config, resolved, model_config, model_type, settings, detectors, self.policy,
                        self.catalog, rules)


    def _may_infer_reference(self, resolved, model_type: str) -> bool:
        """A full encoder or decoder checkpoint, no --base given (nor --base none), not inferred before."""
        from lmscan.models.architectures import DECODER, ENCODER, architecture_entry

        return (self.config.base is None and getattr(resolved, "base", None) is None
                and getattr(resolved, "reference", None) is None and not getattr(resolved, "reference_note", "")
                and getattr(resolved, "gguf", None) is None and architecture_entry(model_type)["family"] in (ENCODER, DECODER))


def check_request(config: ScanConfig) -> ScanRequest:
    """What can be checked without the model: names of profile, engine, detectors, sites, and
    the probes file. Runs first, so a typo fails in a second instead of after the model loads."""
    from lmscan.detectors import check_names
    from lmscan.models.sites import SITES
    from lmscan.report.verdict import load_policy
    from lmscan.scan.rules import load_catalog, load_rules

    profiles = load_rules("profiles", config.rules_dir)
    engines = load_rules("engines", config.rules_dir)
    _known(config.profile, profiles, "profile")
    _known(config.engine, engines, "engine")
    check_names(config.detectors or profiles[config.profile].get("detectors", []))
    unknown = [s for s in config.sites or [] if s not in SITES]
    if unknown:
        raise InputError(f"unknown site(s) {', '.join(unknown)} (known: {', '.join(SITES)})")
    if config.probes_file:
        from lmscan.models.probes import load_probe_file

        load_probe_file(config.probes_file, config.text_column)
    return ScanRequest(config, profiles, engines, load_policy(config.rules_dir), load_catalog(config.rules_dir))


def plan_scan(config: ScanConfig, resolved=None) -> ScanPlan:
    """check_request, resolve the model (unless given), and bind: the one plan of a command."""
    request = check_request(config)
    if resolved is None:
        from lmscan.models import resolve_model

        resolved = resolve_model(config.model, revision=config.revision, offline=config.offline,
                                 base=config.base)
    return request.plan(resolved)


def profile_settings(profile: str, model_type: str | None, rules_dir: str | None = None,
                     engine: str = "fast") -> dict:
    """The profile's table with its per-architecture override and the engine's table applied."""
    from lmscan.scan.rules import load_rules

    profiles, engines = load_rules("profiles", rules_dir), load_rules("engines", rules_dir)
    _known(profile, profiles, "profile")
    _known(engine, engines, "engine")
    return merged_settings(profiles, engines, profile, engine, model_type)


def merged_settings(profiles: dict, engines: dict, profile: str, engine: str, model_type: str | None) -> dict:
    settings = {k: v for k, v in profiles[profile].items() if k != "arch"}
    overrides = [profiles[profile].get("arch", {}).get(model_type or "", {}),
                 {k: v for k, v in engines[engine].items() if k != "description"}]
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
    return settings


def detector_order(requested: list[str]) -> list[str]:
    """The detectors a scan runs, in order: the file inventory always first (every file in
    the folder is accounted for, whatever --detectors says), then the requested ones."""
    from lmscan.detectors import check_names

    return ["files", *(d for d in check_names(requested) if d != "files")]


def model_config_of(resolved) -> dict:
    """The model's config as config.json would give it: a GGUF file carries it in its metadata
    (read through transformers), an adapter takes its base's."""
    if getattr(resolved, "gguf", None) is not None:
        from lmscan.models.gguf_file import gguf_config

        return gguf_config(resolved.local_dir, resolved.gguf)
    return read_json_object(resolved.config_path)


def read_json_object(path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def _known(name: str, table: dict, what: str) -> None:
    if name not in table:
        raise InputError(f"unknown {what} {name!r} (available: {', '.join(table)})")
