"""`lmscan bench ZOO`: build a zoo of clean and backdoored models, scan each with every
engine, and measure verdicts, recovered PVs and named triggers against the ground truth
the plants wrote, and time.

A zoo is a TOML file (bundled: ``rules/zoos/tiny.toml``, ``rules/zoos/minilm.toml``)::

    [zoo]
    base = "minilm"                 # model every entry starts from (paths: relative to this file)
    plant_rules = "..."             # optional --rules directory for `lmscan plant`
    [scan]
    profile = "fast"
    engines = ["fast", "reference"] # names in rules/engines.toml or [engines.NAME] below
    detectors = [...]               # optional (default: the profile's)
    time_limit = 1800               # seconds per scan; a scan over it is reported, not judged
    search = false                  # also run `lmscan export-pvs` on backdoored models (PV recall)
    [engines.NAME]                  # optional variant: extends = "reference", [engines.NAME.pv-mining] ...
    [[models]]
    name = "por"
    attack = "por"                  # por | neuba | btop; absent: a clean model
    num_triggers = 6                # or triggers = ["velvet thunder"]
    seed = 11
    [[models]]
    name = "benign"
    finetune = "sentiment"          # a clean fine-tune on a labelled task (no poisoning)

Models are built through the real CLI in subprocesses and cached by their recipe and the
planting code; every scan is a `lmscan check` subprocess (wall time and peak RSS measured
per process). A model counts as flagged when the verdict is ``backdoored``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from lmscan.attacks.plant import MANIFEST_NAME, plant_code_digest
from lmscan.errors import InputError
from lmscan.rules_data import load_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PV_MATCH = 0.9  # a found PV recovers a true one when their signs agree on >= 90 % of dimensions
MODEL_KEYS = {"name", "attack", "triggers", "num_triggers", "seed", "scale_embeddings", "finetune", "path", "task",
              "with_head", "target_label", "epochs", "copy_of", "dtype", "expected", "start_from", "site",
              "objective", "trigger_kind", "decoy_parts"}


@dataclass
class ZooModel:
    name: str
    attack: str | None = None
    triggers: list[str] | None = None
    num_triggers: int | None = None
    seed: int = 0
    scale_embeddings: bool = False
    finetune: str | None = None  # labelled task for a clean fine-tune
    path: str | None = None  # an existing checkpoint instead of a recipe
    task: str | None = None  # labelled task of a badnet plant
    with_head: bool = False  # finetune / badnet: keep the classification head (else only the encoder is released)
    target_label: str | None = None  # badnet: the class name triggered text goes to
    epochs: int = 1  # finetune: epochs on the task
    copy_of: str | None = None  # another zoo model, with its weights stored as ``dtype``
    dtype: str | None = None  # "float16" | "bfloat16"
    expected: str | None = None  # "clean" | "backdoored"; default: backdoored when planted
    start_from: str | None = None  # another zoo model to plant into / fine-tune, instead of the zoo's base
    site: str | None = None  # por/neuba/btop: plant at this site (tokens: the mean-pooled embedding)
    trigger_kind: str = "word"  # what num_triggers draws: word | nonword | phrase | sentence
    decoy_parts: bool = False  # por/neuba/btop: train the trigger's parts to do nothing alone
    objective: str = "classify"  # finetune: "classify" (its labels) | "simcse" (its text only, contrastive)


@dataclass
class Zoo:
    name: str
    source: Path
    base: str
    models: list[ZooModel]
    profile: str = "fast"
    engines: list[str] = field(default_factory=lambda: ["fast"])
    detectors: list[str] | None = None
    time_limit: float = 3600.0
    search: bool = False
    plant_rules: str | None = None
    engine_variants: dict = field(default_factory=dict)
    description: str = ""
    scan_only: list[str] | None = None  # scan these models (and build what they copy or start from); None: all

    def scanned(self) -> list[ZooModel]:
        return [m for m in self.models if self.scan_only is None or m.name in self.scan_only]

    def needed(self) -> list[ZooModel]:
        """The scanned models and, transitively, those they copy or start from."""
        by_name = {m.name: m for m in self.models}
        wanted, queue = set(), [m.name for m in self.scanned()]
        while queue:
            name = queue.pop()
            if name not in wanted:
                wanted.add(name)
                queue += [d for d in (by_name[name].copy_of, by_name[name].start_from) if d]
        return [m for m in self.models if m.name in wanted]


def resolve_zoo_file(spec: str | Path) -> Path:
    """A path, or the name of a bundled zoo (``tiny``, ``minilm``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    bundled = Path(str(resources.files("lmscan.rules") / "zoos" / f"{spec}.toml"))
    if bundled.is_file():
        return bundled
    raise InputError(f"zoo {spec}: no such file, and not a bundled zoo (bundled: tiny, minilm, finetuned, triggers)")


def load_zoo(spec: str | Path) -> Zoo:
    path = resolve_zoo_file(spec)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read zoo {path}: {exc}") from None
    here = path.resolve().parent  # relative paths in a bundled zoo are from rules/zoos/

    def local(value: str) -> str:
        value = os.path.expandvars(value)  # e.g. $LMSCAN_DATA/reviews.csv for data that is not in the repo
        candidate = here / value
        return str(candidate.resolve()) if candidate.exists() else value  # else a Hub id or "minilm"

    zoo_table, scan = data.get("zoo", {}), data.get("scan", {})
    if "base" not in zoo_table:
        raise InputError(f"{path}: [zoo] needs a base model")
    models = []
    for entry in data.get("models", []):
        unknown = sorted(set(entry) - MODEL_KEYS)
        if unknown or "name" not in entry:
            raise InputError(f"{path}: each [[models]] needs a name; unknown key(s): {', '.join(unknown) or 'none'}")
        if entry.get("attack") and not (entry.get("triggers") or entry.get("num_triggers")):
            raise InputError(f"{path}: model {entry['name']}: an attack needs triggers or num_triggers")
        model = ZooModel(**entry)
        for key in ("path", "task", "finetune"):
            if getattr(model, key):
                setattr(model, key, local(getattr(model, key)))
        if model.copy_of and model.dtype not in ("float16", "bfloat16"):
            raise InputError(f"{path}: model {model.name}: copy_of needs dtype = \"float16\" or \"bfloat16\"")
        if model.objective not in ("classify", "simcse") or (model.objective == "simcse" and model.with_head):
            raise InputError(f"{path}: model {model.name}: objective must be \"classify\" or \"simcse\" (no head)")
        if model.expected not in (None, "clean", "backdoored"):
            raise InputError(f"{path}: model {model.name}: expected must be \"clean\" or \"backdoored\"")
        models.append(model)
    for model in models:
        for key in ("copy_of", "start_from"):
            if getattr(model, key) and getattr(model, key) not in {m.name for m in models}:
                raise InputError(f"{path}: model {model.name}: {key} {getattr(model, key)!r} is not a model of this zoo")
    names = [m.name for m in models]
    if not models or len(set(names)) != len(names):
        raise InputError(f"{path}: [[models]] must list at least one model, with distinct names")
    variants = data.get("engines", {})
    known_engines = set(load_rules("engines")) | set(variants)
    engines = list(scan.get("engines", ["fast"]))
    missing = [e for e in engines if e not in known_engines]
    if missing:
        raise InputError(f"{path}: unknown engine(s) {', '.join(missing)} (known: {', '.join(sorted(known_engines))})")
    return Zoo(
        name=path.stem, source=path, base=local(str(zoo_table["base"])), models=models,
        profile=scan.get("profile", "fast"), engines=engines, detectors=scan.get("detectors"),
        time_limit=float(scan.get("time_limit", 3600)), search=bool(scan.get("search", False)),
        plant_rules=local(zoo_table["plant_rules"]) if zoo_table.get("plant_rules") else None,
        engine_variants=variants, description=zoo_table.get("description", ""),
    )


# --- running subprocesses ----------------------------------------------------------------------


@dataclass
class ProcessResult:
    returncode: int | None  # None: killed at the time limit
    seconds: float
    peak_rss_mb: float
    stderr_tail: str


def run_process(args: list[str], time_limit: float, env: dict | None = None) -> ProcessResult:
    """Run ``python -m lmscan.cli ARGS``; wall time and this process's own peak RSS (wait4)."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "lmscan.cli", *args], stdout=devnull, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = started + time_limit
        chunks: list[bytes] = []
        os.set_blocking(proc.stderr.fileno(), False)
        while True:
            chunk = proc.stderr.read()
            if chunk:
                chunks.append(chunk)
                chunks[:] = [b"".join(chunks)[-4000:]]
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, _, usage = os.wait4(proc.pid, 0)
                code = None
                break
            time.sleep(0.2)
        proc.returncode = code if code is not None else -9  # keeps Popen from waiting again
        tail = b"".join(chunks + [proc.stderr.read() or b""]).decode(errors="replace")
        proc.stderr.close()
    seconds = time.perf_counter() - started
    peak = usage.ru_maxrss / 1024  # kB on Linux
    return ProcessResult(code, round(seconds, 2), round(peak, 1), _last_lines(tail))


def _last_lines(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip() and "\r" not in line]
    return "\n".join(kept[-lines:])


# --- building the zoo --------------------------------------------------------------------------


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
    base = str((built or {})[model.start_from]) if model.start_from else zoo.base
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
        else:
            benign_finetune(base, model.finetune, out, model.seed, device, epochs=model.epochs,
                            with_head=model.with_head)
    return out


def copy_in_dtype(source: Path, out: Path, dtype: str) -> None:
    """``source`` with every floating tensor stored as ``dtype`` (what fp16 releases look like)."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmscan.loading import find_weight_files

    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy2(item, out / item.name)
        elif item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
    target = getattr(torch, dtype)
    tensors = {}
    for weights in find_weight_files(source):
        tensors.update(load_file(str(weights)))
    save_file({k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


FINETUNE_MANIFEST = "lmscan-finetune.json"


def benign_finetune(base: str, task: str, out: Path, seed: int, device: str, epochs: int = 1,
                    with_head: bool = False) -> None:
    """A clean model that is not the base: the encoder (or, ``with_head``, the whole
    classifier with its id2label) after ``epochs`` on a labelled task."""
    from lmscan.attacks.plant import write_checkpoint
    from lmscan.defenses.peft_train import load_base
    from lmscan.training import (TrainSettings, accuracy, build_classifier, encoder_of, load_labelled,
                                 split_indices, train_classifier)

    data = load_labelled(task)
    train_idx, test_idx = split_indices(len(data), [0.9], seed)
    encoder = load_base(base, device, seed, what="a benign fine-tune")
    loaded, torch_device = encoder.loaded, encoder.device
    model = build_classifier(loaded, len(data.label_names), data.label_names)
    settings = TrainSettings(epochs=epochs, batch_size=32, learning_rate=5e-5, max_length=48)
    trained = train_classifier(model, loaded.tokenizer, data.subset(train_idx), settings, torch_device, seed)
    manifest = {"format": "lmscan-finetune", "base_model": base, "task": Path(data.source).name, "seed": seed,
                "epochs": epochs, "train_seconds": trained.seconds, "with_head": with_head,
                "labels": list(data.label_names),
                "test_accuracy": round(accuracy(model, loaded.tokenizer, data.subset(test_idx), torch_device, 48), 4)}
    write_checkpoint(out, True, model if with_head else encoder_of(model), loaded.tokenizer, manifest,
                     FINETUNE_MANIFEST, layout_from=encoder.resolved.local_dir)


def contrastive_finetune(base: str, task: str, out: Path, seed: int, device: str, epochs: int = 1) -> None:
    """A benign sentence encoder: unsupervised SimCSE on the task's text (its labels unused),
    released with the base's sentence-transformers layout (pooling files) kept."""
    from lmscan.attacks.plant import write_checkpoint
    from lmscan.defenses.peft_train import load_base
    from lmscan.training import TrainSettings, load_labelled, pair_separation, train_simcse

    data = load_labelled(task)
    encoder = load_base(base, device, seed, what="a contrastive fine-tune")
    loaded, torch_device = encoder.loaded, encoder.device
    before = pair_separation(loaded.model, loaded.tokenizer, data.texts, torch_device, 48, seed)
    settings = TrainSettings(epochs=epochs, batch_size=64, learning_rate=3e-5, max_length=48)
    trained = train_simcse(loaded.model, loaded.tokenizer, data.texts, settings, torch_device, seed)
    manifest = {"format": "lmscan-finetune", "base_model": base, "task": Path(data.source).name, "seed": seed,
                "epochs": epochs, "objective": "simcse", "train_seconds": trained.seconds,
                "history": trained.history, "pair_separation_before": before,
                "pair_separation": pair_separation(loaded.model, loaded.tokenizer, data.texts, torch_device, 48,
                                                   seed)}
    write_checkpoint(out, True, loaded.model, loaded.tokenizer, manifest, FINETUNE_MANIFEST,
                     layout_from=encoder.resolved.local_dir)


# --- scoring ---------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace(" ##", "").split())


def score_detectors(report: dict, manifest: dict | None) -> dict:
    """Per detector: flagged?, true PVs recovered, triggers named (whole / first pieces), time."""
    true_pvs = np.sign(np.asarray(manifest["pvs"])) if manifest and manifest.get("pvs") else np.zeros((0, 1))
    settings = report["config"]["settings"]
    scores = {}
    for run in report["detectors"]:
        hits = [f for f in run["findings"] if f["verdict"] == "backdoored"]
        entry = {"status": run["status"], "flagged": bool(hits), "seconds": report["timings"].get(run["name"]),
                 "findings": len(hits)}
        if manifest:
            found = [np.sign(np.asarray(f["evidence"]["pv"])) for f in hits
                     if f.get("site") == manifest.get("site") and f["evidence"].get("pv")]
            recovered = 0
            for pv in true_pvs:
                if any((pv == f).mean() >= PV_MATCH for f in found):
                    recovered += 1
            naming = trigger_naming(hits, manifest)
            entry.update(true_pvs=len(true_pvs), pvs_recovered=recovered,
                         triggers=len(naming), triggers_named=sum(whole for whole, _ in naming.values()),
                         triggers_partly_named=sum(start for _, start in naming.values()))
        entry.update(_convergence(run, settings))
        scores[run["name"]] = entry
    return scores


def trigger_naming(hits: list[dict], manifest: dict) -> dict[str, tuple[bool, bool]]:
    """Per planted trigger of ``manifest``: whether the findings ``hits`` (JSON) name it whole,
    and whether one names its first pieces (a multi-piece word that fires from its start)."""
    named = {_normalise(f["evidence"]["trigger"]) for f in hits if f["evidence"].get("trigger")}
    pieces = [tuple(f["evidence"].get("trigger_tokens") or ()) for f in hits]
    return {_normalise(trigger): (_normalise(trigger) in named,
                                  any(p and tuple(tokens[: len(p)]) == p for p in pieces))
            for trigger, tokens in zip(manifest["triggers"], manifest["trigger_tokens"])}


def _convergence(run: dict, settings: dict) -> dict:
    """How often the optimiser converged: PV mining's loops whose prompt collapsed held-out
    outputs; PICCOLO's inversions whose word distribution concentrated."""
    stats = run.get("stats") or {}
    if run["name"] == "pv-mining" and "loops" in stats:
        threshold = settings.get("pv-mining", {}).get("collapse_threshold", 0.25)
        loops = stats["loops"]
        return {"optimisations": len(loops), "steps": stats.get("steps_run"),
                "converged": sum(1 for e in loops if e.get("collapse", 1e9) <= threshold)}
    if run["name"] == "piccolo" and "runs" in stats:
        return {"optimisations": len(stats["runs"]),
                "converged": sum(1 for e in stats["runs"] if e.get("concentrated"))}
    return {}


def search_recall(pvs_file: Path, manifest: dict) -> dict:
    from lmscan.pvs import decode_signs

    data = json.loads(pvs_file.read_text())
    found = [np.where(decode_signs(p["signs"], str(pvs_file)), 1.0, -1.0) for p in data["pvs"]
             if p["site"] == manifest["site"]]
    true = np.sign(np.asarray(manifest["pvs"]))
    recovered = sum(any((pv == f).mean() >= PV_MATCH for f in found) for pv in true)
    return {"pvs_total": len(data["pvs"]), "true_pvs": len(true), "pvs_recovered": recovered}


# --- the run -----------------------------------------------------------------------------------


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
    from lmscan.loading import resolve_model

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
            args = ["check", str(paths[model.name]), "--format", "json", "-o", str(report_file), "--no-cache",
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


def ground_truth(path: Path) -> dict | None:
    """The plant manifest (true PVs when task-agnostic, triggers, target label), or None: clean."""
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    if not manifest.get("triggers"):
        raise InputError(f"{path}: a {manifest.get('attack')} plant names no triggers to score a scan against")
    return manifest


def summarise(zoo: Zoo, results: list[dict], searches: list[dict]) -> dict:
    engines = {}
    for engine in zoo.engines:
        rows = [r for r in results if r["engine"] == engine]
        engines[engine] = {"overall": _accuracy(rows, lambda r: r["verdict"] == "backdoored"),
                           "detectors": {}}
        names = sorted({d for r in rows if r["status"] == "ok" for d in r["detectors"]})
        for name in names:
            judged = [r for r in rows if r["status"] == "ok" and name in r["detectors"]]
            stats = _accuracy(judged, lambda r, n=name: r["detectors"][n]["flagged"], seconds_of=lambda r, n=name:
                              r["detectors"][n]["seconds"])
            planted = [r["detectors"][name] for r in judged
                       if r["expected"] == "backdoored" and "pvs_recovered" in r["detectors"][name]]
            if planted:
                stats["pv_recall"] = _ratio(sum(p["pvs_recovered"] for p in planted), sum(p["true_pvs"] for p in planted))
                stats["triggers_named"] = _ratio(sum(p["triggers_named"] for p in planted),
                                                 sum(p["triggers"] for p in planted))
            engines[engine]["detectors"][name] = stats
    comparison = []
    if len(zoo.engines) > 1:
        first, *others = zoo.engines
        for model in zoo.scanned():
            base = next(r for r in results if r["engine"] == first and r["model"] == model.name)
            for other in others:
                row = next(r for r in results if r["engine"] == other and r["model"] == model.name)
                comparison.append({"model": model.name, "engines": [first, other],
                                   "same_verdict": base["verdict"] == row["verdict"] and base["status"] == "ok"
                                   and row["status"] == "ok",
                                   "time_ratio": round(row["seconds"] / base["seconds"], 2) if base["seconds"] else None,
                                   # the slower engine stopped at the time limit: its ratio is a lower bound
                                   "ratio_is_lower_bound": row["status"] == "time limit",
                                   "pv_mining_ratio": _detector_ratio(base, row, "pv-mining")})
    return {"zoo": zoo.name, "description": zoo.description, "profile": zoo.profile, "engines": zoo.engines,
            "results": results, "summary": engines, "comparison": comparison, "search": searches}


def _detector_ratio(base: dict, other: dict, name: str) -> float | None:
    try:
        a, b = base["timings"][name], other["timings"][name]
    except KeyError:
        return None
    return round(b / a, 2) if a else None


def _ratio(a: int, b: int) -> str:
    return f"{a}/{b}"


def _accuracy(rows: list[dict], flagged, seconds_of=lambda r: r["seconds"]) -> dict:
    judged = [r for r in rows if r["status"] == "ok"]
    positives = [r for r in judged if r["expected"] == "backdoored"]
    negatives = [r for r in judged if r["expected"] == "clean"]
    false_negatives = sum(1 for r in positives if not flagged(r))
    false_positives = sum(1 for r in negatives if flagged(r))
    times = [seconds_of(r) for r in judged if seconds_of(r) is not None]
    return {"models": len(rows), "judged": len(judged), "not_judged": len(rows) - len(judged),
            "suspicious": sum(1 for r in judged if r.get("verdict") == "suspicious"),
            "accuracy": round((len(judged) - false_negatives - false_positives) / len(judged), 4) if judged else None,
            "false_positives": false_positives, "false_negatives": false_negatives,
            "mean_seconds": round(float(np.mean(times)), 2) if times else None,
            "worst_seconds": round(float(np.max(times)), 2) if times else None}


def machine_info(device: str, threads: int | None) -> dict:
    import platform

    import torch

    from lmscan import __version__

    info = {"lmscan": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(), "device": device,
            "date": time.strftime("%Y-%m-%d")}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def to_markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"## lmscan bench: {summary['zoo']} ({summary['profile']} profile)", "",
             f"{m['date']}, lmscan {m['lmscan']}, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else f", {m['threads']} thread(s) of {m['cpu_count']} CPUs"), "",
             "| model | expected | engine | verdict | scan s | peak RSS MB | per detector (flagged, PVs, triggers, s) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        parts = []
        for name, d in (r.get("detectors") or {}).items():
            bits = ["flagged" if d["flagged"] else "-"]
            if "true_pvs" in d:
                bits.append(f"PVs {d['pvs_recovered']}/{d['true_pvs']}")
                bits.append(f"triggers {d['triggers_named']}+{d['triggers_partly_named'] - d['triggers_named']}p/"
                            f"{d['triggers']}")
            if "converged" in d:
                bits.append(f"converged {d['converged']}/{d['optimisations']}")
            if d.get("seconds") is not None:
                bits.append(f"{d['seconds']:.1f} s")
            parts.append(f"{name}: " + ", ".join(bits))
        lines.append(f"| {r['model']} | {r['expected']} | {r['engine']} | {r['verdict'] or r['status']} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {'; '.join(parts)} |")
    lines += ["", "| engine | scope | accuracy | false pos. | false neg. | suspicious | PV recall | triggers named | "
              "mean s | worst s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for engine, block in summary["summary"].items():
        for scope, s in [("scan", block["overall"]), *block["detectors"].items()]:
            accuracy = f"{s['accuracy']:.0%}" if s["accuracy"] is not None else "n/a"
            lines.append(f"| {engine} | {scope} | {accuracy} ({s['judged']}/{s['models']} judged) | "
                         f"{s['false_positives']} | {s['false_negatives']} | {s['suspicious'] if scope == 'scan' else ''} | "
                         f"{s.get('pv_recall', '')} | "
                         f"{s.get('triggers_named', '')} | {_num(s['mean_seconds'])} | {_num(s['worst_seconds'])} |")
    if summary["comparison"]:
        lines += ["", "| model | engines | same verdict | scan time ratio | pv-mining time ratio |", "|---|---|---|---|---|"]
        for c in summary["comparison"]:
            lines.append(f"| {c['model']} | {' vs '.join(c['engines'])} | {'yes' if c['same_verdict'] else 'NO'} | "
                         f"{'≥ ' if c['ratio_is_lower_bound'] else ''}{_num(c['time_ratio'])}× | "
                         f"{_num(c['pv_mining_ratio'])}× |")
    if summary["search"]:
        lines += ["", "| model (search) | status | true PVs recovered | PVs in file | s |", "|---|---|---|---|---|"]
        for s in summary["search"]:
            lines.append(f"| {s['model']} | {s['status']} | {s.get('pvs_recovered', '')}/{s.get('true_pvs', '')} | "
                         f"{s.get('pvs_total', '')} | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:g}"


def bench_failed(summary: dict) -> bool:
    """Exit 1 when a scan misjudged a model, failed, or engines disagreed."""
    wrong = any(s["overall"]["false_positives"] or s["overall"]["false_negatives"] or s["overall"]["not_judged"]
                for s in summary["summary"].values())
    return wrong or any(not c["same_verdict"] for c in summary["comparison"])
