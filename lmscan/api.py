"""Python API: everything the CLI does, callable from code.

    from lmscan.api import ScanConfig, scan
    report = scan(ScanConfig(model="org/name"))
    report.verdict  # "clean" | "suspicious" | "backdoored" | "not-assessed"

Many models: ``lmscan.scan.fleet.scan_many(configs, jobs=..., ray_address=..., cache=...)`` yields one
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
from lmscan.detectors.base import ProgressFn
from lmscan.errors import CannotAssess, InputError
from lmscan.findings import DetectorRun, Report
from lmscan.scan.plan import ScanConfig, ScanPlan, check_request, plan_scan, profile_settings
from lmscan.scan.rules import dataclass_from
from lmscan.scan.stages import StageRunner

__all__ = ["ScanConfig", "ScanPlan", "check_request", "plan_scan", "profile_settings", "prepare", "scan",
           "scan_cached", "export_pvs", "run_one", "not_assessed_report", "model_info", "tool_info"]


def _probe_sets(config: ScanConfig, settings: dict) -> tuple[list[str], list[str], list[str]]:
    """Fit and held-out sentences, and the unused rest (spares a longer schedule may train on)."""
    from lmscan.models.probes import load_builtin_probes, load_probe_file, split_probes

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


def prepare(plan: ScanPlan | ScanConfig) -> Prepared:
    """Load the plan's model and pick its sites and probe sets (a ScanConfig is planned first)."""
    from lmscan.models import load_model
    from lmscan.models.device import compute_dtype, pick_device

    plan = _as_plan(plan)
    config = plan.config
    t0 = time.perf_counter()
    device = pick_device(config.device)
    # A bf16/fp16 checkpoint computes in its own dtype where the device has it natively, else fp32.
    loaded = load_model(plan.resolved, device=str(device), for_scan=True, raw_config=plan.model_config,
                        dtype=compute_dtype(plan.model_config, device))
    sites = _pick_sites(config.sites, loaded.arch, loaded.skipped_sites)
    fit, heldout, spare = _probe_sets(config, plan.settings)
    # Sites the user narrowed away with --sites were not expected; the default sites were.
    skipped = {} if config.sites else dict(loaded.skipped_sites)
    return Prepared(plan.resolved, loaded, device, plan.settings, sites, fit, heldout,
                    round(time.perf_counter() - t0, 2), spare, skipped)


def _as_plan(plan: ScanPlan | ScanConfig) -> ScanPlan:
    return plan if isinstance(plan, ScanPlan) else plan_scan(plan)


def model_info(resolved, loaded=None) -> dict:
    """What the report says about the model: its identity, and once loaded what it ships."""
    info = {
        "ref": resolved.ref, "kind": resolved.kind, "repo_id": resolved.repo_id, "revision": resolved.revision,
        "commit": resolved.commit, "local_dir": str(resolved.local_dir),
        "weight_sha256": dict(resolved.weight_sha256), "model_sha256": resolved.model_sha256,
        "folder_sha256": resolved.folder_sha256,
    }
    if getattr(resolved, "gguf", None) is not None:
        gguf = resolved.gguf
        info["gguf"] = {"file": gguf.file, "version": gguf.version, "architecture": gguf.architecture,
                        "tensor_count": gguf.tensor_count, "tensor_types": list(gguf.tensor_types)}
    if getattr(resolved, "base", None) is not None:
        # Both identities: the adapter (the fields above) and the base it was merged into.
        info["adapter"] = True
        info["base"] = model_info(resolved.base)
    if getattr(resolved, "reference", None) is not None:
        # The base base-diff compares it with, and how it was chosen (--base, model card, weights).
        info["reference"] = {**model_info(resolved.reference), "chosen_by": resolved.reference.chosen_by}
    elif getattr(resolved, "reference_note", ""):
        info["reference_note"] = resolved.reference_note  # why no base was compared
    if loaded is not None:
        arch = loaded.arch
        info.update(architecture=arch.model_type, hidden_size=arch.hidden_size, sites=list(arch.sites),
                    head_labels=loaded.labels, pooling=loaded.pooling, weight_dtypes=loaded.stored_dtypes,
                    compute_dtype=str(next(loaded.model.parameters()).dtype).replace("torch.", ""))
    return info


def scan(plan: ScanPlan | ScanConfig, progress: ProgressFn | None = None) -> Report:
    """Load and scan the plan's model (a ScanConfig is planned first); returns a Report, never prints.

    Every detector runs as a stage of lmscan.scan.stages (error capture, OOM fallback);
    Ctrl-C (or SIGTERM, SIGHUP) ends the scan with the runs made so far and ``incomplete`` set."""
    from lmscan.report.verdict import aggregate

    plan = _as_plan(plan)
    config = plan.config
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    if progress is not None:
        progress("load", 0, 1, "")  # loading a large model takes a while: say so before it starts
    prepared = prepare(plan)
    if progress is not None:
        progress("load", 1, 1, "")
    stages = StageRunner(prepared, plan.catalog, config.seed, progress)
    incomplete = False
    try:
        for name in plan.detectors:
            stages.run(name)
    except KeyboardInterrupt:
        incomplete = True
    timings = {"load": prepared.load_seconds, **stages.timings, "total": round(time.perf_counter() - t0, 2)}

    verdict, severity, reason = aggregate(stages.runs, prepared.sites, plan.policy, incomplete,
                                          prepared.skipped_sites)
    resolved_config = {**dataclasses.asdict(config), "detectors": plan.detectors, "sites": prepared.sites,
                       "settings": plan.settings}
    return Report(
        schema_version="1.0", tool=tool_info(), model=model_info(prepared.resolved, prepared.loaded),
        config=resolved_config, seed=config.seed, device=str(prepared.device), detectors=stages.runs,
        verdict=verdict, severity=severity, timings=timings, started_at=started_at, reason=reason,
        incomplete=incomplete, skipped_sites=dict(prepared.skipped_sites),
    )


def scan_cached(plan: ScanPlan, cache=None, progress: ProgressFn | None = None, warn=None) -> Report:
    """``scan`` unless ``cache`` (a lmscan.scan.cache.ResultCache) holds an identical scan: same files,
    same settings, same code. A cached report has ``from_cache`` set and names the model just
    given (its path or Hub id may differ from the cached scan's). ``warn(message)`` hears of a
    result that could not be cached."""
    from lmscan.scan.cache import scan_identity

    key = None
    if cache is not None:
        key = cache.key(scan_identity(plan))
        report = cache.get(key)
        if report is not None:
            report.model.update(model_info(plan.resolved))
            return refresh_file_inventory(report, plan)
    report = scan(plan, progress=progress)
    if key is not None and report.verdict != "not-assessed" and not cache.put(key, report) and warn is not None:
        warn("could not write the result cache")
    return report


def refresh_file_inventory(report: Report, plan: ScanPlan) -> Report:
    """A cached report with the ``files`` inventory taken again from the folder as it is now.
    The key already covers every file; this keeps the cache from ever answering a file
    question even if a future key forgets one."""
    from lmscan.detectors.files import run_files
    from lmscan.report.verdict import aggregate
    from lmscan.scan.stages import apply_catalog

    fresh = apply_catalog(run_files(plan.resolved), plan.catalog)
    report.detectors = [fresh if run.name == "files" else run for run in report.detectors]
    if not any(run.name == "files" for run in report.detectors):
        report.detectors.insert(0, fresh)
    report.verdict, report.severity, report.reason = aggregate(
        report.detectors, list(report.config.get("sites") or []), plan.policy, report.incomplete,
        report.skipped_sites)
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


def run_one(plan: ScanPlan | ScanConfig, name: str, progress: ProgressFn | None = None,
            fit: list[str] | None = None, **extra) -> DetectorRun:
    """Load the model and run one detector as a stage, as a scan would (what ``lmscan heads``
    and ``lmscan invert`` do); a detector that fails is an error here."""
    from lmscan.errors import LmscanError

    plan = _as_plan(plan)
    prepared = prepare(plan)
    if fit is not None:
        prepared.fit = list(fit)
    run = StageRunner(prepared, plan.catalog, plan.config.seed, progress).run(name, **extra)
    if run.status == "error":
        raise LmscanError(f"{name} failed: {run.note}")
    return run


def export_pvs(plan: ScanPlan | ScanConfig, from_report: Report | None = None, include_unverified: bool = False,
               progress: ProgressFn | None = None):
    """Search a model for all of its PVs (resuming from an earlier report of the same
    weights when given) and return (PVSet, SearchResult); nothing is written."""
    from lmscan.pv.pvs_file import PVEntry, PVSet
    from lmscan.pv.search import SearchConfig, search_pvs

    from lmscan.models.architectures import ENCODER, architecture_entry

    plan = _as_plan(plan)
    config = plan.config
    if architecture_entry(plan.model_type)["family"] != ENCODER:  # refused before the weights load
        raise CannotAssess(f"PV export needs an encoder (a BERT-like model whose sentence feature a PV fixes); "
                           f"{plan.model_type} is a decoder, so there is nothing to export")
    t0 = time.perf_counter()
    prepared = prepare(plan)
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
                        catalog=plan.catalog)
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
