"""LoRA/PEFT adapters: scanned merged into their base, both identities named, bad pairs refused.

Adapters are made with peft itself on the tiny decoders of tests/tiny_decoders.py (and on the
bundled MiniLM), with trained-looking (non-zero) LoRA B matrices so the merge changes weights.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.errors import InputError, UnsafeCheckpointError
from lmscan.models import load_model, resolve_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

try:
    from tiny_decoders import DECODER_CONFIGS, write_tiny_decoder
except ImportError:  # tests/ imported as a package
    from tests.tiny_decoders import DECODER_CONFIGS, write_tiny_decoder

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "bert": ["query", "value"]}


def make_adapter(base_dir, out_dir, model_type="llama", task="CAUSAL_LM", seed=1, model_cls=None):
    """A LoRA adapter trained-looking on ``base_dir``; returns (adapter dir, the merged model peft makes)."""
    model_cls = model_cls or transformers.AutoModelForCausalLM
    model = model_cls.from_pretrained(str(base_dir))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_type], task_type=task)
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    wrapped.save_pretrained(str(out_dir))
    return out_dir, wrapped.merge_and_unload()


def set_base(adapter_dir, base_ref):
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_ref
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_decoder(root / "base", "llama")
    adapter, merged = make_adapter(base, root / "adapter")
    return base, adapter, merged


def _check(*args):
    return CliRunner().invoke(main, ["check", *map(str, args), "--format", "json", "--no-cache", "--device", "cpu"])


def _one_line(result, code):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmscan: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_adapter_is_merged_into_its_base(llama_pair):
    base, adapter, merged = llama_pair
    resolved = resolve_model(str(adapter))
    assert resolved.base is not None and resolved.base.local_dir == base.resolve()
    assert list(resolved.weight_sha256) == ["adapter_model.safetensors"]
    assert "adapter_config.json" in resolved.file_sha256
    loaded = load_model(resolved)
    ours = loaded.model.layers[0].self_attn.q_proj.weight
    plain = load_model(resolve_model(str(base))).model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(ours, merged.model.layers[0].self_attn.q_proj.weight, atol=1e-6)
    assert not torch.allclose(ours, plain)  # the adapter changed what the scan reads
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())


def test_adapter_scan_names_both_identities(llama_pair):
    base, adapter, _ = llama_pair
    result = _check(adapter)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # The merged model is what the decoder detector searched (a random tiny model: nothing found).
    assert report["verdict"] == "clean" and "target-inversion" in [d["name"] for d in report["detectors"]]
    model = report["model"]
    assert model["adapter"] is True and list(model["weight_sha256"]) == ["adapter_model.safetensors"]
    assert model["base"]["local_dir"] == str(base.resolve()) and "model.safetensors" in model["base"]["weight_sha256"]
    assert model["base"]["model_sha256"] != model["model_sha256"]
    assert model["architecture"] == "llama"
    # The pair's identity moves with the base: another base under the same adapter is another model.
    other = write_tiny_decoder(adapter.parent / "other-base", "llama", seed=5)
    assert resolve_model(str(adapter), base=str(other)).folder_sha256 != resolve_model(str(adapter)).folder_sha256


def test_adapter_identities_in_text_and_sarif(llama_pair):
    _, adapter, _ = llama_pair
    text = CliRunner().invoke(main, ["check", str(adapter), "--no-cache", "--device", "cpu"])
    assert "adapter" in text.stdout and "base" in text.stdout
    sarif = CliRunner().invoke(main, ["check", str(adapter), "--no-cache", "--device", "cpu", "--format", "sarif"])
    run = json.loads(sarif.stdout)["runs"][0]
    artifacts = json.dumps(run.get("artifacts", [])) + json.dumps(run.get("properties", {}))
    assert "adapter_model.safetensors" in artifacts and "model.safetensors" in artifacts


def test_base_option_overrides_the_adapter_note(llama_pair, tmp_path):
    base, adapter, _ = llama_pair
    moved = tmp_path / "adapter"
    moved.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (moved / name).write_bytes((adapter / name).read_bytes())
    set_base(moved, str(tmp_path / "gone"))
    line = _one_line(_check(moved), 2)
    assert f"base model of the adapter {moved}" in line and "no such file or directory" in line
    result = _check(moved, "--base", base)
    assert result.exit_code == 0 and json.loads(result.stdout)["model"]["base"]["local_dir"] == str(base.resolve())


def test_adapter_without_a_base_name_asks_for_base(llama_pair, tmp_path):
    _, adapter, _ = llama_pair
    moved = tmp_path / "adapter"
    moved.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (moved / name).write_bytes((adapter / name).read_bytes())
    set_base(moved, None)
    assert "name it with --base MODEL" in _one_line(_check(moved), 2)


def test_base_offline_hub_id_missing_is_one_line(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _, adapter, _ = llama_pair
    line = _one_line(_check(adapter, "--base", "some-org/not-cached"), 2)
    assert "base model of the adapter" in line and "offline mode is on" in line


def test_base_option_on_a_full_model_names_its_reference(llama_pair):
    """--base on a full checkpoint is the model it was fine-tuned from: recorded, not merged."""
    base, _, _ = llama_pair
    result = _check(base, "--base", base)
    report = json.loads(result.stdout)
    assert report["model"]["reference"]["local_dir"] == str(base) and "adapter" not in report["model"]


def test_adapter_for_another_hidden_size_does_not_fit(llama_pair, tmp_path):
    _, adapter, _ = llama_pair
    wide = tmp_path / "wide"
    config = transformers.AutoConfig.for_model("llama", **{**DECODER_CONFIGS["llama"], "hidden_size": 48})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    write_tiny_decoder(tmp_path / "tok", "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wide / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    line = _one_line(_check(adapter, "--base", wide), 2)
    assert "the adapter does not fit its base model" in line


def test_adapter_for_another_architecture_does_not_fit(tmp_path):
    neox = write_tiny_decoder(tmp_path / "neox", "gpt_neox")
    adapter, _ = make_adapter(neox, tmp_path / "neox-adapter", model_type="gpt_neox")
    llama = write_tiny_decoder(tmp_path / "llama", "llama")
    line = _one_line(_check(adapter, "--base", llama), 2)
    assert "the adapter does not fit its base model" in line


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_adapter_pickle_goes_through_the_pickle_guard(llama_pair, tmp_path):
    base, adapter, merged = llama_pair
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    plain, evil = tmp_path / "plain", tmp_path / "evil"
    for folder in (plain, evil):
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    torch.save(tensors, plain / "adapter_model.bin")
    loaded = load_model(resolve_model(str(plain)))  # a plain-tensor pickle loads through the guard
    assert torch.allclose(loaded.model.layers[0].self_attn.q_proj.weight,
                          merged.model.layers[0].self_attn.q_proj.weight, atol=1e-6)
    marker = tmp_path / "PWNED"
    torch.save({**tensors, "x": Payload(marker)}, evil / "adapter_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(UnsafeCheckpointError):
        load_model(resolve_model(str(evil)))
    line = _one_line(_check(evil), 2)
    assert line.startswith("lmscan: error: refusing to load") and "adapter_model.bin" in line
    assert not marker.exists()


def test_adapter_without_weights_is_bad_input(llama_pair, tmp_path):
    _, adapter, _ = llama_pair
    (tmp_path / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    with pytest.raises(InputError, match="no adapter weights"):
        resolve_model(str(tmp_path))


def test_minilm_adapter_merges(minilm_path, tmp_path):
    adapter, merged = make_adapter(minilm_path, tmp_path / "minilm-lora", model_type="bert",
                                   task="FEATURE_EXTRACTION", model_cls=transformers.AutoModel)
    loaded = load_model(resolve_model(str(adapter)))
    assert loaded.arch.model_type == "bert"
    ours = loaded.model.encoder.layer[0].attention.self.query.weight
    assert torch.allclose(ours, merged.encoder.layer[0].attention.self.query.weight, atol=1e-6)


def test_the_result_cache_keys_on_the_base_too(llama_pair, tmp_path):
    from lmscan.api import ScanConfig, plan_scan
    from lmscan.scan.cache import scan_identity

    base, adapter, _ = llama_pair
    other = write_tiny_decoder(tmp_path / "other-base", "llama", seed=7)
    first = scan_identity(plan_scan(ScanConfig(model=str(adapter), device="cpu")))
    again = scan_identity(plan_scan(ScanConfig(model=str(adapter), base=str(base), device="cpu")))
    moved = scan_identity(plan_scan(ScanConfig(model=str(adapter), base=str(other), device="cpu")))
    assert first == again and moved != first and moved["base"] != first["base"]


def test_an_adapter_from_the_hub_cache(llama_pair, tmp_path, monkeypatch):
    try:
        from hubcache import make_hf_cache
    except ImportError:  # tests/ imported as a package
        from tests.hubcache import make_hf_cache

    base, adapter, _ = llama_pair
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_hf_cache(tmp_path / "hub", "org/tiny-lora",
                  {name: adapter / name for name in ("adapter_config.json", "adapter_model.safetensors")})
    resolved = resolve_model("org/tiny-lora")
    assert (resolved.kind, resolved.repo_id) == ("hub", "org/tiny-lora") and resolved.commit
    assert resolved.base.local_dir == base.resolve()
    result = _check("org/tiny-lora")
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["repo_id"] == "org/tiny-lora" and model["base"]["local_dir"] == str(base.resolve())


def test_an_adapter_config_that_is_not_json_is_bad_input(llama_pair, tmp_path):
    _, adapter, _ = llama_pair
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert "adapter_config.json: not readable JSON" in _one_line(_check(tmp_path), 2)


def test_an_adapter_that_cannot_be_merged_is_not_assessed(llama_pair, tmp_path):
    base, adapter, _ = llama_pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PROMPT_TUNING"}))
    (tmp_path / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    line = _one_line(_check(tmp_path), 3)
    assert "a PROMPT_TUNING adapter cannot be merged into its base" in line


def test_an_adapter_that_names_itself_or_another_adapter_as_base(llama_pair, tmp_path):
    _, adapter, _ = llama_pair
    line = _one_line(_check(adapter, "--base", adapter), 2)
    assert "is itself a LoRA/PEFT adapter; the base must be a full model" in line
    loop = tmp_path / "loop"
    loop.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (loop / name).write_bytes((adapter / name).read_bytes())
    set_base(loop, str(loop))  # its own folder
    assert "is itself a LoRA/PEFT adapter" in _one_line(_check(loop), 2)
