"""Python API: everything the CLI does, callable from code.

    from lmscan.api import ScanConfig, scan
    report = scan(ScanConfig(model="org/name"))
    report.verdict  # "clean" | "suspicious" | "backdoored" | "not-assessed"
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from lmscan import __version__
from lmscan.errors import CannotAssess, InputError
from lmscan.findings import DetectorRun, Report
from lmscan.rules_data import load_rules

DETECTORS = ("static", "vocab-sweep", "pv-mining")
SCAN_SITES = ("cls", "pooler", "mask", "last", "tokens")

ProgressFn = Callable[[str, int, int], None]


@dataclass
class ScanConfig:
    model: str
    revision: str | None = None
    offline: bool | None = None
    profile: str = "fast"
    detectors: list[str] | None = None  # None: the profile's list
    sites: list[str] | None = None  # None: the sites the architecture offers an attacker
    device: str = "auto"
    seed: int = 0
    rules_dir: str | None = None
    probes_file: str | None = None
    text_column: str | None = None
    settings: dict = field(default_factory=dict)  # resolved profile settings (filled by scan)


def profile_settings(profile: str, model_type: str | None, rules_dir: str | None = None) -> dict:
    """The profile's table with its per-architecture override applied."""
    profiles = load_rules("profiles", rules_dir)
    if profile not in profiles:
        raise InputError(f"unknown profile {profile!r} (available: {', '.join(profiles)})")
    settings = {k: v for k, v in profiles[profile].items() if k != "arch"}
    override = profiles[profile].get("arch", {}).get(model_type or "", {})
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


def _probe_sets(config: ScanConfig, settings: dict) -> tuple[list[str], list[str]]:
    from lmscan.probes import load_builtin_probes, load_probe_file, split_probes

    sentences = load_probe_file(config.probes_file, config.text_column) if config.probes_file else load_builtin_probes()
    return split_probes(sentences, int(settings["probe_fit"]), int(settings["probe_heldout"]), seed=config.seed)


def _versions() -> dict:
    import torch
    import transformers

    return {"name": "lmscan", "version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def scan(config: ScanConfig, progress: ProgressFn | None = None) -> Report:
    """Resolve, load and scan a model; returns a Report (never prints)."""
    from lmscan.device import pick_device
    from lmscan.loading import load_model, resolve_model
    from lmscan.report.verdict import aggregate, load_policy

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    policy = load_policy(config.rules_dir)
    device = pick_device(config.device)
    resolved = resolve_model(config.model, revision=config.revision, offline=config.offline)
    loaded = load_model(resolved, device=str(device))
    settings = profile_settings(config.profile, loaded.arch.model_type, config.rules_dir)
    detectors = list(config.detectors or settings["detectors"])
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise InputError(f"unknown detector(s) {', '.join(unknown)} (available: {', '.join(DETECTORS)})")
    sites = _pick_sites(config.sites, loaded.arch)
    fit, heldout = _probe_sets(config, settings)
    timings = {"load": round(time.perf_counter() - t0, 2)}

    runs: list[DetectorRun] = []
    for name in detectors:
        t = time.perf_counter()
        runs.append(_run_detector(name, loaded, sites, fit, heldout, settings, config, progress, runs))
        timings[name] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - t0, 2)

    verdict, severity = aggregate(runs, policy)
    resolved_config = {**dataclasses.asdict(config), "detectors": detectors, "sites": sites, "settings": settings}
    return Report(
        schema_version="1.0",
        tool=_versions(),
        model={
            "ref": resolved.ref, "kind": resolved.kind, "repo_id": resolved.repo_id, "revision": resolved.revision,
            "commit": resolved.commit, "local_dir": str(resolved.local_dir),
            "weight_sha256": dict(resolved.weight_sha256), "model_sha256": resolved.model_sha256,
            "architecture": loaded.arch.model_type, "hidden_size": loaded.arch.hidden_size,
            "sites": list(loaded.arch.sites),
        },
        config=resolved_config, seed=config.seed, device=str(device), detectors=runs, verdict=verdict,
        severity=severity, timings=timings, started_at=started_at,
    )


def _pick_sites(requested: list[str] | None, arch) -> list[str]:
    if requested:
        missing = [s for s in requested if s not in arch.sites]
        if missing:
            raise InputError(f"site(s) {', '.join(missing)} not offered by this {arch.model_type} checkpoint "
                             f"(offers: {', '.join(arch.sites)})")
        return list(requested)
    sites = [s for s in arch.default_sites if s in arch.sites]
    if not sites:
        raise CannotAssess(f"no feature site to scan on this {arch.model_type} checkpoint")
    return sites


def _run_detector(name, loaded, sites, fit, heldout, settings, config, progress, earlier) -> DetectorRun:
    def report(done, total, _loss=0.0):
        if progress is not None:
            progress(name, done, total)

    if name == "static":
        from lmscan.detectors.static import run_static

        return run_static(loaded, load_rules("static", config.rules_dir))
    if name == "vocab-sweep":
        from lmscan.detectors.vocab_sweep import VocabSweepConfig, run_vocab_sweep

        detector_config = _dataclass_from(VocabSweepConfig, settings.get("vocab-sweep", {}))
        return run_vocab_sweep(loaded, sites, fit, heldout, detector_config, seed=config.seed, progress=report)
    if name == "pv-mining":
        from lmscan.detectors.pv_mining import PVMiningConfig, run_pv_mining

        detector_config = _dataclass_from(PVMiningConfig, settings.get("pv-mining", {}))
        return run_pv_mining(loaded, sites, fit, heldout, detector_config, seed=config.seed, progress=report,
                             known_triggers=_confirmed_triggers(earlier, loaded.tokenizer))
    raise InputError(f"unknown detector {name!r}")


def _confirmed_triggers(runs: list[DetectorRun], tokenizer) -> list[tuple[str, tuple[int, ...]]]:
    """Token sequences earlier detectors tied to a backdoor; PV mining re-verifies them against its PVs."""
    seen, triggers = set(), []
    for run in runs:
        for finding in run.findings:
            tokens = finding.evidence.get("trigger_tokens")
            if finding.verdict != "backdoored" or not tokens:
                continue
            # Static findings list every outlier row; each is its own candidate.
            groups = [tokens] if "trigger" in finding.evidence else [[t] for t in tokens]
            for group in groups:
                ids = tuple(tokenizer.convert_tokens_to_ids(group))
                if ids not in seen:
                    seen.add(ids)
                    triggers.append((tokenizer.convert_tokens_to_string(group), ids))
    return triggers


def _dataclass_from(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} setting(s) in rules: {', '.join(unknown)}")
    return cls(**values)
