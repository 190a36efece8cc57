"""Python API: everything the CLI does, callable from code.

    from lmscan.api import ScanConfig, scan
    report = scan(ScanConfig(model="org/name"))
    report.verdict  # "clean" | "suspicious" | "backdoored" | "not-assessed"

Many models: ``lmscan.fleet.scan_many(configs, jobs=..., ray_address=..., cache=...)`` yields one
result per model as it finishes (it builds on this module, so it lives beside it).
"""

from __future__ import annotations

import dataclasses
import platform
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lmscan import DISTRIBUTION, __version__
from lmscan.detectors import check_names
from lmscan.detectors.base import ProgressFn
from lmscan.detectors.runner import context
from lmscan.errors import CannotAssess, InputError
from lmscan.findings import DetectorRun, Report
from lmscan.rules_data import dataclass_from, load_rules
from lmscan.sites import SITES


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


def tool_info() -> dict:
    import torch
    import transformers

    return {"name": "lmscan", "distribution": DISTRIBUTION, "version": __version__, "torch": torch.__version__,
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
    skipped_sites: dict[str, str] = field(default_factory=dict)  # expected sites not scanned: site -> why


def check_request(config: ScanConfig) -> None:
    """What can be checked without the model: names of profile, engine, detectors, sites.
    Runs first, so a typo fails in a second instead of after the model has loaded."""
    profiles = load_rules("profiles", config.rules_dir)
    if config.profile not in profiles:
        raise InputError(f"unknown profile {config.profile!r} (available: {', '.join(profiles)})")
    engines = load_rules("engines", config.rules_dir)
    if config.engine not in engines:
        raise InputError(f"unknown engine {config.engine!r} (available: {', '.join(engines)})")
    check_names(config.detectors or profiles[config.profile].get("detectors", []))
    unknown = [s for s in config.sites or [] if s not in SITES]
    if unknown:
        raise InputError(f"unknown site(s) {', '.join(unknown)} (known: {', '.join(SITES)})")
    if config.probes_file:
        from lmscan.probes import load_probe_file

        load_probe_file(config.probes_file, config.text_column)


def scan_settings(config: ScanConfig, resolved) -> tuple[dict, list[str]]:
    """The effective settings for this model and the detectors to run, all checked, before loading it."""
    from lmscan.detectors.runner import check_settings
    from lmscan.loading.architectures import check_config

    model_type = check_config(_read_json(resolved.config_path))
    settings = profile_settings(config.profile, model_type, config.rules_dir, config.engine)
    detectors = detector_plan(config, settings)
    check_settings(detectors, settings)
    return settings, detectors


def detector_plan(config: ScanConfig, settings: dict) -> list[str]:
    """The detectors a scan runs, in order: the file inventory always first (every file in
    the folder is accounted for, whatever --detectors says), then the requested ones."""
    requested = check_names(config.detectors or settings["detectors"])
    return ["files", *(d for d in requested if d != "files")]


def _read_json(path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def prepare(config: ScanConfig, resolved=None) -> Prepared:
    """Resolve (unless given), check the settings, then load the model and pick sites and probes."""
    from lmscan.device import pick_device
    from lmscan.loading import load_model, resolve_model

    t0 = time.perf_counter()
    check_request(config)
    device = pick_device(config.device)
    resolved = resolved or resolve_model(config.model, revision=config.revision, offline=config.offline)
    settings, _ = scan_settings(config, resolved)
    loaded = load_model(resolved, device=str(device), for_scan=True)
    sites = _pick_sites(config.sites, loaded.arch, loaded.skipped_sites)
    fit, heldout, spare = _probe_sets(config, settings)
    # Sites the user narrowed away with --sites were not expected; the default sites were.
    skipped = {} if config.sites else dict(loaded.skipped_sites)
    return Prepared(resolved, loaded, device, settings, sites, fit, heldout, round(time.perf_counter() - t0, 2),
                    spare, skipped)


def model_info(resolved, loaded=None) -> dict:
    """What the report says about the model: its identity, and once loaded what it ships."""
    info = {
        "ref": resolved.ref, "kind": resolved.kind, "repo_id": resolved.repo_id, "revision": resolved.revision,
        "commit": resolved.commit, "local_dir": str(resolved.local_dir),
        "weight_sha256": dict(resolved.weight_sha256), "model_sha256": resolved.model_sha256,
        "folder_sha256": resolved.folder_sha256,
    }
    if loaded is not None:
        arch = loaded.arch
        info.update(architecture=arch.model_type, hidden_size=arch.hidden_size, sites=list(arch.sites),
                    head_labels=loaded.labels, pooling=loaded.pooling, weight_dtypes=loaded.stored_dtypes)
    return info


def scan(config: ScanConfig, progress: ProgressFn | None = None, resolved=None) -> Report:
    """Resolve (unless ``resolved`` is given), load and scan a model; returns a Report, never prints.

    Every detector runs through lmscan.detectors.runner (error capture, OOM fallback);
    Ctrl-C ends the scan with the runs made so far and ``incomplete`` set."""
    from lmscan.detectors.runner import run_detector, warn_stderr
    from lmscan.rules_data import load_catalog
    from lmscan.report.verdict import aggregate, load_policy

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    policy = load_policy(config.rules_dir)
    catalog = load_catalog(config.rules_dir)
    if progress is not None:
        progress("load", 0, 1, "")  # loading a large model takes a while: say so before it starts
    prepared = prepare(config, resolved)
    if progress is not None:
        progress("load", 1, 1, "")
    settings, sites = prepared.settings, prepared.sites
    detectors = detector_plan(config, settings)
    timings = {"load": prepared.load_seconds}

    runs: list[DetectorRun] = []
    incomplete = False
    try:
        for name in detectors:
            t = time.perf_counter()
            runs.append(run_detector(name, context(prepared, name, config.seed, progress, runs), catalog,
                                     warn=warn_stderr))
            timings[name] = round(time.perf_counter() - t, 2)
    except KeyboardInterrupt:
        incomplete = True
    timings["total"] = round(time.perf_counter() - t0, 2)

    verdict, severity, reason = aggregate(runs, sites, policy, incomplete, prepared.skipped_sites)
    resolved_config = {**dataclasses.asdict(config), "detectors": detectors, "sites": sites, "settings": settings}
    return Report(
        schema_version="1.0", tool=tool_info(), model=model_info(prepared.resolved, prepared.loaded),
        config=resolved_config, seed=config.seed, device=str(prepared.device), detectors=runs, verdict=verdict,
        severity=severity, timings=timings, started_at=started_at, reason=reason, incomplete=incomplete,
        skipped_sites=dict(prepared.skipped_sites),
    )


def scan_cached(config: ScanConfig, resolved, cache=None, progress: ProgressFn | None = None,
                warn=None) -> Report:
    """``scan`` unless ``cache`` (a lmscan.cache.ResultCache) holds an identical scan: same files,
    same settings, same code. A cached report has ``from_cache`` set and names the model just
    given (its path or Hub id may differ from the cached scan's). ``warn(message)`` hears of a
    result that could not be cached."""
    from lmscan.cache import scan_identity

    key = None
    if cache is not None:
        settings, names = scan_settings(config, resolved)
        key = cache.key(scan_identity(resolved, config, settings, names))
        report = cache.get(key)
        if report is not None:
            report.model.update(model_info(resolved))
            return refresh_file_inventory(report, resolved, config)
    report = scan(config, progress=progress, resolved=resolved)
    if key is not None and report.verdict != "not-assessed" and not cache.put(key, report) and warn is not None:
        warn("could not write the result cache")
    return report


def refresh_file_inventory(report: Report, resolved, config: ScanConfig) -> Report:
    """A cached report with the ``files`` inventory taken again from the folder as it is now.
    The key already covers every file; this keeps the cache from ever answering a file
    question even if a future key forgets one."""
    from lmscan.detectors.files import run_files
    from lmscan.detectors.runner import apply_catalog
    from lmscan.report.verdict import aggregate, load_policy
    from lmscan.rules_data import load_catalog

    fresh = apply_catalog(run_files(resolved), load_catalog(config.rules_dir))
    report.detectors = [fresh if run.name == "files" else run for run in report.detectors]
    if not any(run.name == "files" for run in report.detectors):
        report.detectors.insert(0, fresh)
    report.verdict, report.severity, report.reason = aggregate(
        report.detectors, list(report.config.get("sites") or []), load_policy(config.rules_dir), report.incomplete)
    return report


def not_assessed_report(config: ScanConfig, resolved, why) -> Report:
    """The report of a scan that ended without a verdict: ``why`` is the error (its exit code is
    named) or a sentence. ``resolved`` None: stopped before the model's files were even hashed."""
    reason = why if isinstance(why, str) else f"{why} (exit {getattr(why, 'exit_code', 2)})"
    model = model_info(resolved) if resolved is not None else {"ref": config.model}
    return Report(schema_version="1.0", tool=tool_info(), model=model,
                  config=dataclasses.asdict(config), seed=config.seed, device=config.device, detectors=[],
                  verdict="not-assessed", severity="info", timings={},
                  started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), reason=reason)


def run_one(config: ScanConfig, name: str, progress: ProgressFn | None = None, fit: list[str] | None = None,
            **extra) -> DetectorRun:
    """Load the model and run one detector through the same runner as a scan (what
    ``lmscan heads`` and ``lmscan invert`` do); a detector that fails is an error here."""
    from lmscan.detectors.runner import run_detector, warn_stderr
    from lmscan.errors import LmscanError
    from lmscan.rules_data import load_catalog

    catalog = load_catalog(config.rules_dir)
    prepared = prepare(config)
    ctx = context(prepared, name, config.seed, progress, **extra)
    if fit is not None:
        ctx.fit = list(fit)
    run = run_detector(name, ctx, catalog, warn=warn_stderr)
    if run.status == "error":
        raise LmscanError(f"{name} failed: {run.note}")
    return run


def export_pvs(config: ScanConfig, from_report: Report | None = None, include_unverified: bool = False,
               progress: ProgressFn | None = None, resolved=None):
    """Search a model for all of its PVs (resuming from an earlier report of the same
    weights when given) and return (PVSet, SearchResult); nothing is written."""
    from lmscan.pvs import PVEntry, PVSet
    from lmscan.search import SearchConfig, search_pvs

    t0 = time.perf_counter()
    prepared = prepare(config, resolved)
    resume = None
    if from_report is not None:
        if from_report.model.get("model_sha256") != prepared.resolved.model_sha256:
            raise InputError("the report is about different weights (model_sha256 differs); rerun without it")
        resume = [r for r in from_report.detectors if r.status == "ok"]
        prepared.sites = [s for s in prepared.sites if s in set().union(*(r.sites for r in resume))] or prepared.sites
    search_settings = {**prepared.settings.get("search", {})}
    if include_unverified:
        search_settings["include_unverified"] = True
    search_config = dataclass_from(SearchConfig, search_settings)
    result = search_pvs(prepared, search_config, seed=config.seed, progress=progress, resume=resume,
                        rules_dir=config.rules_dir)
    entries = [PVEntry(id=i, site=p.site, template=p.template, signs=p.pv >= 0, verified=p.verified, source=p.source,
                       triggers=p.triggers, collapse=p.collapse, activation_rate=p.activation_rate)
               for i, p in enumerate(result.pvs)]
    info = model_info(prepared.resolved, prepared.loaded)
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


def _pick_sites(requested: list[str] | None, arch, skipped: dict[str, str]) -> list[str]:
    if requested:
        missing = [s for s in requested if s not in arch.sites]
        if missing:
            why = "".join(f"; {s}: {skipped[s]}" for s in missing if s in skipped)
            raise InputError(f"site(s) {', '.join(missing)} not offered by this {arch.model_type} checkpoint "
                             f"(offers: {', '.join(arch.sites)}{why})")
        return list(requested)
    sites = [s for s in arch.default_sites if s in arch.sites]
    if not sites:
        raise CannotAssess(f"no feature site to scan on this {arch.model_type} checkpoint")
    return sites
