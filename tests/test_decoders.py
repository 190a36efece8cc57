"""Decoder LLMs: every native causal LM in transformers loads, and is honestly not assessed yet."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.errors import CannotAssess
from lmscan.models import ARCHITECTURES, decoder_types, identify, load_model, resolve_model
from lmscan.models.architectures import architecture_entry, check_config

try:
    from tiny_decoders import DECODER_CONFIGS, write_tiny_decoder
except ImportError:  # tests/ imported as a package
    from tests.tiny_decoders import DECODER_CONFIGS, write_tiny_decoder

transformers = pytest.importorskip("transformers")


# --- the derived decoder list -------------------------------------------------------------------


def test_decoders_come_from_the_transformers_mappings():
    decoders = decoder_types()
    for model_type in ("llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox", *DECODER_CONFIGS):
        assert model_type in decoders
    # Encoders (their ForCausalLM is a masked encoder), encoder-decoders and bert-generation are not decoders.
    for model_type in ("bert", "roberta", "electra", "bart", "mbart", "marian", "whisper", "bert-generation", "t5"):
        assert model_type not in decoders
    assert not set(decoders) & set(ARCHITECTURES)
    assert len(decoders) > 50


def test_prefix_is_read_from_the_base_model_class():
    assert architecture_entry("gpt2")["prefix"] == "transformer"
    assert architecture_entry("llama")["prefix"] == "model"
    assert architecture_entry("gpt_neox")["prefix"] == transformers.GPTNeoXModel.base_model_prefix


@pytest.mark.parametrize("spelling", ["gpt_neox", "gpt-neox", "GPT_NEOX", "gemma3_text", "Qwen2"])
def test_model_type_spellings(spelling):
    assert check_config({"model_type": spelling}) == spelling.lower().replace("-", "_")


def test_unsupported_message_stays_readable():
    with pytest.raises(CannotAssess) as info:
        check_config({"model_type": "frobnicator"})
    text = str(info.value)
    assert "encoders: albert, bert" in text and "decoders: every causal LM in transformers" in text
    assert f"({len(decoder_types())} types" in text and "falcon" not in text
    assert len(text) < 400


def test_sizes_from_a_nested_text_config():
    arch = identify({"model_type": "gemma3", "text_config": {"hidden_size": 48, "num_hidden_layers": 2,
                                                             "num_attention_heads": 4}})
    assert (arch.family, arch.hidden_size, arch.num_layers, arch.num_heads) == ("decoder", 48, 2, 4)
    assert arch.sites == ("next", "tokens", "last") and arch.default_sites == ("next",) and not arch.has_pooler


def test_attention_free_decoder_has_no_heads():
    arch = identify({"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2})
    assert arch.num_heads == 0 and arch.family == "decoder"


# --- tiny checkpoints, loaded and scanned -------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(DECODER_CONFIGS))
def test_tiny_decoder_loads(model_type, tmp_path):
    write_tiny_decoder(tmp_path, model_type)
    loaded = load_model(resolve_model(str(tmp_path)))
    assert loaded.arch.model_type == model_type and loaded.arch.family == "decoder"
    assert loaded.arch.hidden_size == 32 and loaded.arch.default_sites == ("next",)
    assert type(loaded.model).__name__ == decoder_types()[model_type]


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    write_tiny_decoder(tmp_path, "llama", dtype=torch.bfloat16)
    assert "bfloat16" in (tmp_path / "config.json").read_text()
    loaded = load_model(resolve_model(str(tmp_path)))
    assert loaded.stored_dtypes == ["bfloat16"]
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_sharded_decoder_loads(tmp_path):
    write_tiny_decoder(tmp_path, "qwen2", max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    resolved = resolve_model(str(tmp_path))
    assert sorted(resolved.weight_sha256) == shards
    loaded = load_model(resolved)
    assert loaded.arch.model_type == "qwen2" and not loaded.missing_keys


def _check(path, *extra):
    result = CliRunner().invoke(main, ["check", str(path), "--format", "json", "--no-cache", "--device", "cpu",
                                       *extra])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("model_type", sorted(DECODER_CONFIGS))
def test_decoder_scan_with_encoder_detectors_only_is_not_assessed(model_type, tmp_path):
    write_tiny_decoder(tmp_path, model_type)
    code, report = _check(tmp_path, "--detectors", "static,vocab-sweep,trigger-search")
    assert code == 3, report
    assert report["verdict"] == "not-assessed"
    assert "no decoder detector" in report["reason"] and "next" in report["reason"]
    assert "not supported" not in report["reason"]
    assert report["model"]["architecture"] == model_type
    runs = {run["name"]: run for run in report["detectors"]}
    assert runs["files"]["status"] == "ok" and runs["static"]["status"] == "ok"
    for name in ("vocab-sweep", "trigger-search"):
        assert runs[name]["status"] == "skipped"
        assert "no decoder detector" in runs[name]["note"] and runs[name]["cleared_sites"] == []


def test_decoder_scan_never_clean_with_clearing_detectors_asked_for(tmp_path):
    write_tiny_decoder(tmp_path, "llama")
    code, report = _check(tmp_path, "--detectors", "vocab-sweep,pv-mining", "--sites", "tokens")
    assert code == 3 and report["verdict"] == "not-assessed"
    assert "no decoder detector" in report["reason"]


# --- the dtype a scan computes in ---------------------------------------------------------------


def test_compute_dtype_follows_the_checkpoint_and_the_device():
    from lmscan.models.device import compute_dtype, native_bf16

    cpu_bf16 = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert compute_dtype({"dtype": "bfloat16"}, "cpu") == cpu_bf16
    assert compute_dtype({"torch_dtype": "bfloat16"}, "cpu") == cpu_bf16
    assert compute_dtype({"model_type": "gemma3", "text_config": {"dtype": "bfloat16"}}, "cpu") == cpu_bf16
    assert compute_dtype({"dtype": "float16"}, "cpu") == torch.float32  # no CPU computes fp16 natively
    assert compute_dtype({"dtype": "float32"}, "cpu") == compute_dtype({}, "cpu") == torch.float32


def test_bf16_checkpoint_scan_reports_both_dtypes(tmp_path):
    from lmscan.models.device import native_bf16

    write_tiny_decoder(tmp_path, "llama", dtype=torch.bfloat16)
    code, report = _check(tmp_path)
    assert code == 0 and report["verdict"] == "clean" and report["model"]["weight_dtypes"] == ["bfloat16"]
    assert report["model"]["compute_dtype"] == ("bfloat16" if native_bf16("cpu") else "float32")
