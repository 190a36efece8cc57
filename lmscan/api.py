"""Python API: everything the CLI does, callable from code.

    from lmscan.api import ScanConfig, scan
    report = scan(ScanConfig(model="org/name"))
    report.verdict  # "clean" | "suspicious" | "backdoored" | "not-assessed"
"""

from __future__ import annotations

import dataclasses
import platform
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from lmscan import __version__
from lmscan.errors import CannotAssess, InputError
from lmscan.findings import DetectorRun, Report
from lmscan.rules_data import load_rules

DETECTORS = ("static", "vocab-sweep", "pv-mining", "attention", "piccolo")  # piccolo: a baseline, not default
SCAN_SITES = ("cls", "pooler", "mask", "last", "tokens")

ProgressFn = Callable[[str, int, int], None]


@dataclass
class ScanConfig:
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
    settings: dict = field(default_factory=dict)  # resolved profile settings (filled by scan)


def profile_settings(profile: str, model_type: str | None, rules_dir: str | None = None,
                     engine: str = "fast") -> dict:
    """The profile's table with its per-architecture override and the engine's table applied."""
    profiles = load_rules("profiles", rules_dir)
    if profile not in profiles:
        raise InputError(f"unknown profile {profile!r} (available: {', '.join(profiles)})")
    engines = load_rules("engines", rules_dir)
    if engine not in engines:
        raise InputError(f"unknown engine {engine!r} (available: {', '.join(engines)})")
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


def _probe_sets(config: ScanConfig, settings: dict) -> tuple[list[str], list[str], list[str]]:
    """Fit and held-out sentences, and the unused rest (spares a longer schedule may train on)."""
    from lmscan.probes import load_builtin_probes, load_probe_file, split_probes

    sentences = load_probe_file(config.probes_file, config.text_column) if config.probes_file else load_builtin_probes()
    fit, heldout = split_probes(sentences, int(settings["probe_fit"]), int(settings["probe_heldout"]),
                                seed=config.seed)
    used = set(fit) | set(heldout)
    spare = [s for s in dict.fromkeys(sentences) if s not in used]
    random.Random(config.seed).shuffle(spare)
    return fit, heldout, spare


def _versions() -> dict:
    import torch
    import transformers

    return {"name": "lmscan", "version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class Prepared:
    """A loaded model with the profile settings, sites and probe sets a run uses."""

    resolved: object
    loaded: object
    device: object
    settings: dict
    sites: list[str]
    fit: list[str]
    heldout: list[str]
    load_seconds: float
    spare: list[str] = field(default_factory=list)  # probes in neither set


def prepare(config: ScanConfig) -> Prepared:
    from lmscan.device import pick_device
    from lmscan.loading import load_model, resolve_model

    t0 = time.perf_counter()
    device = pick_device(config.device)
    resolved = resolve_model(config.model, revision=config.revision, offline=config.offline)
    loaded = load_model(resolved, device=str(device))
    settings = profile_settings(config.profile, loaded.arch.model_type, config.rules_dir, config.engine)
    sites = _pick_sites(config.sites, loaded.arch)
    fit, heldout, spare = _probe_sets(config, settings)
    return Prepared(resolved, loaded, device, settings, sites, fit, heldout, round(time.perf_counter() - t0, 2),
                    spare)


def model_info(prepared: Prepared) -> dict:
    resolved, arch = prepared.resolved, prepared.loaded.arch
    return {
        "ref": resolved.ref, "kind": resolved.kind, "repo_id": resolved.repo_id, "revision": resolved.revision,
        "commit": resolved.commit, "local_dir": str(resolved.local_dir),
        "weight_sha256": dict(resolved.weight_sha256), "model_sha256": resolved.model_sha256,
        "architecture": arch.model_type, "hidden_size": arch.hidden_size, "sites": list(arch.sites),
    }


def scan(config: ScanConfig, progress: ProgressFn | None = None) -> Report:
    """Resolve, load and scan a model; returns a Report (never prints)."""
    from lmscan.report.verdict import aggregate, load_policy

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    policy = load_policy(config.rules_dir)
    prepared = prepare(config)
    settings, sites = prepared.settings, prepared.sites
    detectors = list(config.detectors or settings["detectors"])
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise InputError(f"unknown detector(s) {', '.join(unknown)} (available: {', '.join(DETECTORS)})")
    timings = {"load": prepared.load_seconds}

    runs: list[DetectorRun] = []
    for name in detectors:
        t = time.perf_counter()
        runs.append(_run_with_memory_fallback(name, prepared, config, progress, runs))
        timings[name] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - t0, 2)

    verdict, severity = aggregate(runs, policy)
    resolved_config = {**dataclasses.asdict(config), "detectors": detectors, "sites": sites, "settings": settings}
    return Report(
        schema_version="1.0", tool=_versions(), model=model_info(prepared), config=resolved_config, seed=config.seed,
        device=str(prepared.device), detectors=runs, verdict=verdict, severity=severity, timings=timings,
        started_at=started_at,
    )


def export_pvs(config: ScanConfig, from_report: Report | None = None, include_unverified: bool = False,
               progress: ProgressFn | None = None):
    """Search a model for all of its PVs (resuming from an earlier report of the same
    weights when given) and return (PVSet, SearchResult); nothing is written."""
    from lmscan.pvs import PVEntry, PVSet
    from lmscan.search import SearchConfig, search_pvs

    t0 = time.perf_counter()
    prepared = prepare(config)
    resume = None
    if from_report is not None:
        if from_report.model.get("model_sha256") != prepared.resolved.model_sha256:
            raise InputError("the report is about different weights (model_sha256 differs); rerun without it")
        resume = [r for r in from_report.detectors if r.status == "ok" and r.name in DETECTORS]
        prepared.sites = [s for s in prepared.sites if s in set().union(*(r.sites for r in resume))] or prepared.sites
    search_settings = {**prepared.settings.get("search", {})}
    if include_unverified:
        search_settings["include_unverified"] = True
    search_config = dataclass_from(SearchConfig, search_settings)
    result = search_pvs(prepared.loaded, prepared.sites, prepared.fit, prepared.heldout, prepared.settings,
                        search_config, seed=config.seed, progress=progress, resume=resume, rules_dir=config.rules_dir)
    entries = [PVEntry(id=i, site=p.site, template=p.template, signs=p.pv >= 0, verified=p.verified, source=p.source,
                       triggers=p.triggers, collapse=p.collapse, activation_rate=p.activation_rate)
               for i, p in enumerate(result.pvs)]
    info = model_info(prepared)
    pvset = PVSet(
        model={k: info[k] for k in ("ref", "repo_id", "commit", "model_sha256", "weight_sha256", "architecture",
                                    "hidden_size")},
        t_match=result.t_match, pvs=entries, calibration=result.calibration,
        search={"profile": config.profile, "seed": config.seed, "sites": prepared.sites,
                "fuzz_loops_run": result.loops_run, "resumed": from_report is not None,
                "settings": dataclasses.asdict(search_config),
                "seconds": {**result.timings, "total": round(time.perf_counter() - t0, 2)}},
        generator=f"lmscan {__version__}",
    )
    return pvset, result


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


def _run_with_memory_fallback(name, prepared: Prepared, config, progress, earlier) -> DetectorRun:
    """Run a detector; when the GPU runs out of memory, retry with half the batch (twice),
    then on the CPU. What happened is kept in the run's note, and the verdict stands."""
    import torch

    notes: list[str] = []
    for attempt in range(4):
        try:
            run = _run_detector(name, prepared, config, progress, earlier)
            run.note = "; ".join([*notes, run.note] if run.note else notes)
            return run
        except torch.cuda.OutOfMemoryError:
            if prepared.loaded.device.type != "cuda" or attempt == 3:
                raise
            torch.cuda.empty_cache()
            table = dict(prepared.settings.get(name, {}))
            if attempt < 2 and table.get("batch_size", 1) > 1:
                table["batch_size"] = max(1, int(table["batch_size"]) // 2)
                prepared.settings = {**prepared.settings, name: table}
                notes.append(f"GPU out of memory: retried with batch size {table['batch_size']}")
            else:
                prepared.loaded.model.to("cpu")
                prepared.loaded.device = prepared.device = torch.device("cpu")
                notes.append("GPU out of memory: finished on the CPU")
            _warn(f"{name}: {notes[-1]}")
    raise AssertionError("unreachable")


def _warn(message: str) -> None:
    import sys

    print(f"lmscan: warning: {message}", file=sys.stderr)


def _run_detector(name, prepared: Prepared, config, progress, earlier) -> DetectorRun:
    loaded, sites, fit, heldout, settings = (prepared.loaded, prepared.sites, prepared.fit, prepared.heldout,
                                             prepared.settings)

    def report(done, total, _loss=0.0, _found=0):
        if progress is not None:
            progress(name, done, total)

    if name == "static":
        from lmscan.detectors.static import run_static

        return run_static(loaded, load_rules("static", config.rules_dir))
    if name == "vocab-sweep":
        from lmscan.detectors.vocab_sweep import VocabSweepConfig, run_vocab_sweep

        detector_config = dataclass_from(VocabSweepConfig, settings.get("vocab-sweep", {}))
        return run_vocab_sweep(loaded, sites, fit, heldout, detector_config, seed=config.seed, progress=report)
    if name == "pv-mining":
        from lmscan.detectors.pv_mining import PVMiningConfig, run_pv_mining
        from lmscan.detectors.verify import triggers_from_findings

        detector_config = dataclass_from(PVMiningConfig, settings.get("pv-mining", {}))
        wanted = detector_config.fit_sentences
        if wanted > len(fit) + len(prepared.spare):
            raise InputError(f"pv-mining wants {wanted} fit sentences but only {len(fit) + len(prepared.spare)} "
                             "probe sentences are left after the held-out set")
        if wanted:
            fit = (fit + prepared.spare)[:wanted]
        return run_pv_mining(loaded, sites, fit, heldout, detector_config, seed=config.seed, progress=report,
                             known_triggers=triggers_from_findings(earlier, loaded.tokenizer))
    if name == "attention":
        from lmscan.detectors.attention import AttentionConfig, run_attention
        from lmscan.detectors.verify import triggers_from_findings

        detector_config = dataclass_from(AttentionConfig, load_rules("attention", config.rules_dir))
        triggers = [text for text, _, _ in triggers_from_findings(earlier, loaded.tokenizer)]
        with_pv = any(f.verdict == "backdoored" for r in earlier for f in r.findings)
        return run_attention(loaded, fit, triggers, detector_config, seed=config.seed, with_pv_finding=with_pv)
    if name == "piccolo":
        from lmscan.detectors.piccolo import PiccoloConfig, run_piccolo

        detector_config = dataclass_from(PiccoloConfig, settings.get("piccolo", {}))
        return run_piccolo(loaded, sites, fit, heldout, detector_config, seed=config.seed, progress=report)
    raise InputError(f"unknown detector {name!r}")


def dataclass_from(cls, values: dict):
    """Build a detector config from a rules table; unknown keys are a rules error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {cls.__name__} setting(s) in rules: {', '.join(unknown)}")
    return cls(**values)
