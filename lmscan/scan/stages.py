"""Running detectors as stages: settings in, a DetectorRun out, whatever happens inside.

Every caller (``lmscan check``, the PV search behind ``export-pvs``, ``heads``,
``invert``) runs detectors through a :class:`StageRunner` (:func:`run_detector` underneath),
so all of them get the same stage order bookkeeping and timings, and
  - the GPU out-of-memory fallback (half the batch, twice, then the CPU),
  - error capture: an exception inside a detector becomes a run with status
    ``error`` and its message, and the findings other detectors made are kept,
  - the rule catalog: each finding's title, severity and verdict come from
    rules/rule_catalog.toml (a user's --rules file may re-rate a rule).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from lmscan.detectors import get
from lmscan.detectors.base import ProgressFn, ScanContext
from lmscan.errors import InputError
from lmscan.findings import DetectorRun
from lmscan.scan.rules import dataclass_from


def detector_config(name: str, settings: dict):
    """The detector's frozen Config from the profile's ``[PROFILE.<name>]`` table."""
    return dataclass_from(get(name).Config, settings.get(name))


def verify_config(settings: dict):
    from lmscan.evidence.verify_config import VerifyConfig

    return dataclass_from(VerifyConfig, settings.get("verify"))


def check_settings(names: list[str], settings: dict) -> None:
    """Build every config the scan will need, so a bad setting fails before the model loads."""
    verify_config(settings)
    for name in names:
        detector_config(name, settings)


def context(prepared, name: str, seed: int, progress: ProgressFn | None = None,
            earlier: list[DetectorRun] | None = None, settings: dict | None = None, stage: str | None = None,
            **extra) -> ScanContext:
    """The ScanContext detector ``name`` gets on a prepared model (lmscan.api.prepare);
    ``settings`` overrides the profile's effective settings."""
    settings = settings if settings is not None else prepared.settings
    return ScanContext(loaded=prepared.loaded, sites=list(prepared.sites), fit=list(prepared.fit),
                       heldout=list(prepared.heldout), spare=list(prepared.spare),
                       config=detector_config(name, settings), verify=verify_config(settings), seed=seed,
                       earlier=list(earlier or []), stage=stage or name, on_progress=progress,
                       reference=getattr(prepared.resolved, "reference", None),
                       base=getattr(prepared.resolved, "base", None), **extra)


def apply_catalog(run: DetectorRun, catalog: dict) -> DetectorRun:
    """Each finding's title, severity and verdict from the rule catalog. A detector emits only
    the rules its class declares (``rule_ids``): the declaration is what a reader can trust."""
    declared = get(run.name).rule_ids
    for finding in run.findings:
        if finding.rule_id not in declared:
            raise InputError(f"detector {run.name} emitted rule {finding.rule_id}, which it does not declare "
                             f"(rule_ids: {', '.join(declared) or 'none'})")
        entry = catalog.get(finding.rule_id)
        if entry is None:
            raise InputError(f"detector {run.name} emitted rule {finding.rule_id}, which rules/rule_catalog.toml "
                             "does not define")
        finding.title = finding.title or entry.get("name", finding.rule_id)
        finding.severity = entry["severity"]
        finding.verdict = entry["verdict"]
    return run


def run_detector(name: str, ctx: ScanContext, catalog: dict, warn=None) -> DetectorRun:
    """Run detector ``name`` on ``ctx``; never raises for what happens inside the detector
    (KeyboardInterrupt excepted). ``warn(message)`` hears about OOM retries."""
    import torch

    cls = get(name)
    family = ctx.loaded.arch.family
    if family not in cls.families:
        return _unverified_family_run(cls, family, ctx.sites)
    detector = cls()
    ctx.stage = ctx.stage or name
    if cls.sites:
        ctx.sites = [s for s in ctx.sites if s in cls.sites]
    notes: list[str] = []
    started = time.perf_counter()
    for attempt in range(4):
        try:
            run = detector.run(ctx)
            break
        except torch.cuda.OutOfMemoryError:
            if ctx.loaded.device.type != "cuda" or attempt == 3:
                return _error_run(name, started, "GPU out of memory, also after the fallbacks", notes)
            torch.cuda.empty_cache()
            batch = getattr(ctx.config, "batch_size", 1)
            if attempt < 2 and batch > 1:
                ctx.config = dataclasses.replace(ctx.config, batch_size=max(1, batch // 2))
                notes.append(f"GPU out of memory: retried with batch size {ctx.config.batch_size}")
            else:
                ctx.loaded.model.to("cpu")
                ctx.loaded.device = torch.device("cpu")
                notes.append("GPU out of memory: finished on the CPU")
            if warn is not None:
                warn(f"{name}: {notes[-1]}")
        except Exception as exc:  # noqa: BLE001 - one failing detector must not lose the others' findings
            if os.environ.get("LMSCAN_DEBUG"):
                raise
            return _error_run(name, started, f"{type(exc).__name__}: {_first_line(exc)}", notes)
    run.note = "; ".join([*notes, run.note] if run.note else notes)
    run.can_clear = cls.can_clear
    if not cls.can_clear:
        run.cleared_sites = []  # flag-only detectors never vouch for a site, whatever they return
    return apply_catalog(run, catalog)


def _unverified_family_run(cls, family: str, sites: list[str]) -> DetectorRun:
    """A detector never run on a family it was not verified on: a skipped run that says so,
    so its silence is never read as a cleared site."""
    read = [s for s in sites if not cls.sites or s in cls.sites]
    note = (f"no {family} detector yet: {cls.name} is verified on {' and '.join(f'{f}s' for f in cls.families)} "
            f"only, so it did not read {', '.join(read) or 'this model'}")
    return DetectorRun(cls.name, "skipped", 0.0, note=note, stats={"unverified_family": family},
                       can_clear=cls.can_clear)


def _error_run(name: str, started: float, message: str, notes: list[str]) -> DetectorRun:
    return DetectorRun(name, "error", round(time.perf_counter() - started, 2), note="; ".join([*notes, message]),
                       can_clear=get(name).can_clear)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def warn_stderr(message: str) -> None:
    print(f"lmscan: warning: {message}", file=sys.stderr)


class StageRunner:
    """Runs detectors one after another on a prepared model, each seeing the runs before it;
    keeps the runs and each stage's seconds. The scan and the PV search both run through it."""

    def __init__(self, prepared, catalog: dict, seed: int, progress: ProgressFn | None = None, warn=None):
        self.prepared, self.catalog, self.seed, self.progress = prepared, catalog, seed, progress
        self.warn = warn if warn is not None else warn_stderr
        self.runs: list[DetectorRun] = []
        self.timings: dict[str, float] = {}

    def run(self, name: str, *, settings: dict | None = None, label: str | None = None,
            earlier: list[DetectorRun] | None = None, keep: bool = True, **extra) -> DetectorRun:
        """Run detector ``name``; ``earlier`` (default: every run so far) is what it may build on,
        ``settings`` replaces the plan's, ``label`` names the stage in progress output."""
        started = time.perf_counter()
        ctx = context(self.prepared, name, self.seed, self.progress, self.runs if earlier is None else earlier,
                      settings=settings, stage=label, **extra)
        run = run_detector(name, ctx, self.catalog, warn=self.warn)
        self.timings[name] = round(time.perf_counter() - started, 2)
        if keep:
            self.runs.append(run)
        return run
