"""Scanning a fleet: many models with the same settings, one result per model as it finishes.

    from lmscan.scan.fleet import scan_many
    for result in scan_many([ScanConfig(model=m) for m in models], jobs=2, cache=ResultCache()):
        print(result.ref, result.verdict, result.cached)

Models run in this process (``jobs=1``), in ``jobs`` local worker processes (spawned:
torch does not survive a fork), or as Ray tasks (``ray_address``). One model's failure
is its own result (``verdict == "error"``), never the end of the fleet. With a result
cache a re-run resumes: a model already scanned under the same key is not scanned again.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from lmscan.errors import CannotAssess, InputError, LmscanError

if TYPE_CHECKING:
    from lmscan.api import ScanConfig
    from lmscan.findings import Report

RAY_EXTRA = "pip install 'lmscan-backdoor[ray]'"
# How a scan reports progress: "off" (silent), "lines" (plain stderr lines, what a worker
# process or Ray task prints) or "auto" (bars on a terminal, lines elsewhere).
PROGRESS_MODES = ("off", "lines", "auto")
# The device a worker process is pinned to (set once per process by _start_worker).
_worker_device: str | None = None


@dataclass
class FleetResult:
    """One model of a fleet: its report, or the one-line error that stopped it."""

    index: int  # position in the fleet; combined reports keep this order
    ref: str  # the model as given (with @revision)
    report: Report | None = None
    error: str = ""
    error_code: int = 2  # the exit code the error carries
    started_at: str = ""  # ISO 8601, UTC, milliseconds
    finished_at: str = ""
    seconds: float = 0.0
    host: str = ""  # where it ran (a Ray cluster has many)

    @property
    def cached(self) -> bool:
        return self.report is not None and self.report.from_cache

    @property
    def verdict(self) -> str:
        return self.report.verdict if self.report is not None else "error"


def parse_models_file(path: str | Path) -> list[str]:
    """Model references from a file: one a line (``org/name``, ``org/name@revision``, a path);
    blank lines and ``#`` comments (whole lines or line ends) are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--models-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    refs = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [ref for ref in refs if ref]


def model_ref(config: ScanConfig) -> str:
    return f"{config.model}@{config.revision}" if config.revision else config.model


def import_ray():
    """The ray module, or the one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"Ray is not installed; it is an optional extra: {RAY_EXTRA}") from None
    return ray


def scan_many(configs: Iterable[ScanConfig], jobs: int = 1, ray_address: str | bool | None = None, cache=None,
              threads: int | None = None, progress: str = "off") -> Iterator[FleetResult]:
    """Scan every config; yield a FleetResult per model as it finishes (not in fleet order).

    ``jobs``: local worker processes (with CUDA and device "auto", worker k computes on GPU
    k mod the GPU count). ``ray_address``: run each model as a Ray task instead: True attaches
    to the Ray that ``ray.init()`` finds or starts a local one; a string is an address
    (``auto``, ``ray://head:10001``). ``cache``: a lmscan.scan.cache.ResultCache (None: no caching;
    on a Ray cluster its folder is read and written on the workers). ``threads``: torch
    threads per worker (default: this machine's cores divided among the jobs; one per CPU Ray
    task). ``progress``: one of PROGRESS_MODES; worker processes and Ray tasks cannot draw
    bars, so they print lines for "auto"."""
    configs = list(configs)
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}")
    worker_progress = "off" if progress == "off" else "lines"
    if ray_address:
        return _on_ray(import_ray(), configs, None if ray_address is True else ray_address, cache, threads,
                       worker_progress)
    if jobs > 1 and len(configs) > 1:
        return _in_processes(configs, jobs, cache, threads, worker_progress)
    return _in_this_process(configs, cache, progress)


def scan_one(index: int, config: ScanConfig, cache=None, threads: int | None = None,
             progress: str = "off") -> FleetResult:
    """Scan one model of a fleet, wherever it runs; every failure becomes the result's error."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    if _worker_device is not None and config.device == "auto":
        config = dataclasses.replace(config, device=_worker_device)
    result = FleetResult(index, model_ref(config), started_at=_now(), host=socket.gethostname())
    t0 = time.perf_counter()
    try:
        result.report = _scan(config, result.ref, cache, progress)
    except LmscanError as exc:
        result.error, result.error_code = _one_line(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one model's crash must not end the fleet
        result.error = f"internal error: {type(exc).__name__}: {_one_line(exc)}"
    result.finished_at = _now()
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


def _scan(config: ScanConfig, label: str, cache, progress: str) -> Report:
    from contextlib import nullcontext

    from lmscan.api import not_assessed_report, scan_cached
    from lmscan.models import resolve_model
    from lmscan.report.console import OutputConsole
    from lmscan.report.progress import detector_progress
    from lmscan.scan.plan import check_request

    request = check_request(config)
    resolved = resolve_model(config.model, revision=config.revision, offline=config.offline,
                                 base=config.base)
    stderr = OutputConsole(stderr=True)
    plain = True if progress == "lines" else None  # None: bars on a terminal, lines elsewhere
    shown = nullcontext() if progress == "off" else detector_progress(stderr, label, plain=plain)

    def warn(message: str) -> None:
        stderr.print(f"[lmscan] {label}: warning: {message}", markup=False, highlight=False)

    try:
        with shown as show:
            return scan_cached(request.plan(resolved), cache, progress=show, warn=warn)
    except CannotAssess as exc:  # read but not assessable: a report that says why, as a single scan gives
        return not_assessed_report(config, resolved, exc)


def _in_this_process(configs: list[ScanConfig], cache, progress: str) -> Iterator[FleetResult]:
    for index, config in enumerate(configs):
        result = scan_one(index, config, cache, progress=progress)
        yield result
        if result.report is not None and result.report.incomplete:
            return  # Ctrl-C stopped this scan: do not start the next one


def _start_worker(devices, threads: int) -> None:
    global _worker_device
    _worker_device = devices.get()
    import torch

    torch.set_num_threads(threads)


def _in_processes(configs: list[ScanConfig], jobs: int, cache, threads: int | None,
                  progress: str) -> Iterator[FleetResult]:
    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    for device in _worker_devices(configs, jobs):
        devices.put(device)
    threads = threads or max(1, _cores() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(devices, threads))
    try:
        futures = {pool.submit(scan_one, index, config, cache, None, progress): index
                   for index, config in enumerate(configs)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory (BrokenProcessPool)
                yield FleetResult(index, model_ref(configs[index]), error=f"worker process failed: {_one_line(exc)}")
    finally:
        pool.shutdown(cancel_futures=True)


def _worker_devices(configs: list[ScanConfig], jobs: int) -> list[str | None]:
    """One device per worker: GPU k mod the GPU count when CUDA is there and the scans may use it."""
    import torch

    if any(c.device != "auto" for c in configs) or not torch.cuda.is_available():
        return [None] * jobs
    return [f"cuda:{k % torch.cuda.device_count()}" for k in range(jobs)]


def _on_ray(ray, configs: list[ScanConfig], address: str | None, cache, threads: int | None,
            progress: str) -> Iterator[FleetResult]:
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise LmscanError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {_one_line(exc)}") \
                from None
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and all(c.device != "cpu" for c in configs)
        task = ray.remote(scan_one).options(**({"num_gpus": 1} if use_gpu else {"num_cpus": threads or 1}))
        if cache is not None:
            cache = type(cache)(cache.dir.absolute())  # a worker need not share this working directory
        pending = {task.remote(index, _for_a_worker(config), cache, None if use_gpu else threads or 1, progress): index
                   for index, config in enumerate(configs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as exc:  # the task or its worker died
                result = FleetResult(index, "", error=f"Ray task failed: {_one_line(exc)}")
            result.ref = model_ref(configs[index])  # as given, not as made absolute for the worker
            yield result
    finally:
        if started_here:
            ray.shutdown()


def _for_a_worker(config: ScanConfig) -> ScanConfig:
    """The config as a Ray worker must see it: the offline rule in force here, and local paths
    absolute (a worker's environment and working directory may differ from this process's)."""
    from lmscan.models.resolve import offline_mode

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().absolute()) if path and Path(path).expanduser().exists() else path

    return dataclasses.replace(config, model=absolute(config.model), rules_dir=absolute(config.rules_dir),
                               probes_file=absolute(config.probes_file),
                               offline=True if offline_mode(config.offline) else config.offline)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
