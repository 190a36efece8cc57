"""Property-based fuzzing of the parsers that read attacker-controlled files.

Four doors: safetensors weights, config.json and tokenizer files, pickled checkpoints,
and .pvs files. Every case must either succeed or raise one of lmscan's own errors
(LmscanError and subclasses) with a one-line message: any other exception would be a
traceback at the command line. Crafted pickles that import a dangerous callable must
be refused and never run. Each case also runs under a time limit, so a parser that
loops or allocates on a crafted length fails instead of hanging the suite.

Runs are bounded and seeded (derandomize=True, no example database); the case counts
are the ``max_examples`` below and are listed in docs/testing.md.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from lmscan.cli import main  # noqa: E402
from lmscan.errors import CannotAssess, InputError, LmscanError, UnsafeCheckpointError  # noqa: E402
from lmscan.models import load_model, load_state_dict, resolve_model  # noqa: E402
from lmscan.models.architectures import check_config, identify  # noqa: E402
from lmscan.models.model import _load_tokenizer  # noqa: E402
from lmscan.models.safe_load import scan_pickle_file  # noqa: E402
from lmscan.models.sentence import read_pooling  # noqa: E402
from lmscan.pv.monitor import PVMonitor  # noqa: E402
from lmscan.pv.pvs_file import read_pvs, trigger_words  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = REPO / "fixtures" / "tiny-bert"

# Case counts per door (max_examples); docs/testing.md lists them.
SAFETENSORS_RANDOM, SAFETENSORS_HEADER, SAFETENSORS_MUTATED = 200, 500, 200
CONFIG_CHECK, CONFIG_FOLDER, CONFIG_MODEL, TOKENIZER_FILES = 500, 300, 120, 150
PICKLE_RANDOM, PICKLE_MUTATED, PICKLE_CRAFTED = 200, 500, 300
PVS_RANDOM, PVS_MUTATED = 400, 600
CASE_SECONDS = 20  # generous on 2 busy cores; a parser looping on a crafted length never returns


def fuzz(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class Hang(AssertionError):
    pass


@contextmanager
def time_limit(seconds: float):
    def alarm(_signum, _frame):
        raise Hang(f"no answer after {seconds} s: the parser loops or allocates on crafted input")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call, *allowed: type[LmscanError]):
    """``call()``'s result, or the LmscanError it raised; any other exception fails the case."""
    allowed = allowed or (LmscanError,)
    with time_limit(CASE_SECONDS):
        try:
            return call()
        except LmscanError as exc:
            assert isinstance(exc, allowed), f"{type(exc).__name__}: {exc}"
            message = str(exc)
            assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
            return exc


def fresh_dir(root: Path, name: str = "case") -> Path:
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- shared strategies ----------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**30])
json_scalars = (st.none() | st.booleans() | st.integers(-1000, 1000) | HUGE_INTS
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutate(draw, data: bytes, max_edits: int = 4) -> bytes:
    """Byte flips, overwrites, truncations, insertions and deletions."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        if not buf:
            break
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at:at + draw(st.integers(1, 16))]
    return bytes(buf)


# === door 1: safetensors ===========================================================================

SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                      "U16", "U32", "U64", "C64", "F4", "f32", "XX", ""]
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}


@st.composite
def safetensors_files(draw) -> bytes:
    """A length prefix, a JSON header of tensors (plausible or not) and a data section."""
    header: object
    offset = 0  # bytes of tensor data the header asks for
    if draw(st.integers(0, 9)) == 0:
        header = draw(json_values)
    else:
        header = {}
        for index in range(draw(st.integers(0, 3))):
            dtype = draw(st.sampled_from(SAFETENSORS_DTYPES) | json_scalars)
            shape = draw(st.lists(st.integers(0, 4), max_size=3)
                         | st.lists(st.integers(-3, 4) | HUGE_INTS, max_size=3) | json_values)
            size = DTYPE_SIZE.get(dtype, 1) if isinstance(dtype, str) else 1
            if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**16 for d in shape):
                size *= math.prod(shape)
            if draw(st.booleans()):
                offsets = [offset, offset + size]
            else:
                offsets = draw(st.lists(st.integers(-2, 64) | HUGE_INTS, max_size=3) | json_values)
            offset += size
            entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
            for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
                del entry[key]
            header[draw(st.text(max_size=6)) or f"t{index}"] = entry
        if draw(st.booleans()):
            header["__metadata__"] = draw(json_values)
    text = json.dumps(header).encode("utf-8") + b" " * draw(st.integers(0, 8))
    length = draw(st.sampled_from(["exact", "exact", "exact", "off", "huge"]))
    if length == "exact":
        prefix = len(text)
    elif length == "off":
        prefix = max(0, len(text) + draw(st.integers(-4, 4)))
    else:
        prefix = draw(HUGE_INTS.filter(lambda n: 0 <= n < 2**64) | st.integers(0, 2**64 - 1))
    data = draw(st.binary(min_size=0, max_size=8)) + bytes(min(offset, 4096))
    return struct.pack("<Q", prefix) + text + data


def _check_state_dict(result):
    if isinstance(result, LmscanError):
        return
    assert isinstance(result, dict) and result
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in result.items())


@fuzz(SAFETENSORS_RANDOM)
@given(blob=st.binary(max_size=256))
def test_safetensors_random_bytes(work, blob):
    path = fresh_dir(work) / "model.safetensors"
    path.write_bytes(blob)
    _check_state_dict(outcome(lambda: load_state_dict([path]), InputError))


@fuzz(SAFETENSORS_HEADER)
@given(blob=safetensors_files())
def test_safetensors_crafted_headers(work, blob):
    path = fresh_dir(work) / "model.safetensors"
    path.write_bytes(blob)
    _check_state_dict(outcome(lambda: load_state_dict([path]), InputError))


@pytest.fixture(scope="module")
def real_safetensors() -> bytes:
    from safetensors.torch import save as save_bytes

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16),
               "c": torch.tensor([1, 2], dtype=torch.int64)}
    return save_bytes(tensors)


@fuzz(SAFETENSORS_MUTATED)
@given(data=st.data())
def test_safetensors_mutated(work, real_safetensors, data):
    path = fresh_dir(work) / "model.safetensors"
    path.write_bytes(mutate(data.draw, real_safetensors))
    _check_state_dict(outcome(lambda: load_state_dict([path]), InputError))


@pytest.mark.parametrize("prefix", [2**63, 2**64 - 1, 2**32, 100_000_000])
def test_safetensors_huge_header_length_fails_fast(tmp_path, prefix):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", prefix) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + bytes(4))
    with time_limit(10):
        with pytest.raises(InputError, match="model.safetensors"):
            load_state_dict([path])


# === door 2: config.json, tokenizer files, the model folder ========================================

MODEL_TYPES = ["bert", "BERT", "roberta", "xlm_roberta", "distilbert", "albert", "deberta-v2", "electra", "mpnet",
               "gpt2", "llama", "", " bert "]
SIZE_NAMES = ["hidden_size", "dim", "n_embd", "d_model", "num_hidden_layers", "n_layers", "n_layer", "num_layers",
              "num_attention_heads", "n_heads", "n_head", "num_heads"]


@st.composite
def raw_configs(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    config = {"model_type": draw(st.sampled_from(MODEL_TYPES) | json_scalars)}
    for name in draw(st.lists(st.sampled_from(SIZE_NAMES + ["auto_map", "architectures"]), max_size=6)):
        config[name] = draw(st.integers(-2, 64) | json_values)
    return config


@fuzz(CONFIG_CHECK)
@given(config=raw_configs())
def test_check_config_and_identify(config):
    checked = outcome(lambda: check_config(config), CannotAssess)
    if not isinstance(checked, LmscanError):
        assert isinstance(checked, str)
        info = outcome(lambda: identify(config, weight_keys=draw_keys(config)), CannotAssess)
        if not isinstance(info, LmscanError):
            assert min(info.hidden_size, info.num_layers) > 0
            # Attention-free decoders (mamba, rwkv) have no heads; every encoder has some.
            assert info.num_heads > 0 or info.family == "decoder"


def draw_keys(config) -> list[str]:
    return ["pooler.dense.weight"] if isinstance(config, dict) and len(config) % 2 else ["bert.encoder.x"]


FOLDER_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "modules.json", "1_Pooling/config.json", "extra.pkl", "tf_model.h5",
                "vocab.txt", "tokenizer.json", "sub/weights.pt"]
SHARD_NUMBERS = st.integers(0, 4) | st.sampled_from([10**6, 10**9, 10**20, 10**60])


@st.composite
def file_contents(draw, name: str) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "structured", "structured", "structured"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(json_values)).encode("utf-8")
    if name.endswith(".index.json"):
        names = st.sampled_from(["model.safetensors", "pytorch_model.bin", "../config.json", "/etc/passwd",
                                 "a\x00b", "missing.safetensors", "config.json"]) | json_scalars
        return json.dumps({"weight_map": draw(st.dictionaries(st.text(max_size=4), names, max_size=3))}).encode()
    if name == "modules.json":
        paths = st.sampled_from(["", ".", "1_Pooling", "..", "../..", "/", "/etc", "a\x00b", "config.json"])
        entry = st.fixed_dictionaries({}, optional={
            "idx": st.integers(-2, 3) | json_scalars,
            "type": st.sampled_from(["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                                     "sentence_transformers.models.Normalize", "x.Dense"]) | json_scalars,
            "path": paths | json_scalars,
        })
        transformer = {"idx": 0, "type": "sentence_transformers.models.Transformer", "path": ""}
        pooling = st.fixed_dictionaries({"idx": st.just(1), "type": st.just("sentence_transformers.models.Pooling"),
                                         "path": paths})
        layout = draw(st.sampled_from(["pooling", "pooling", "entries", "json"]))
        if layout == "pooling":
            return json.dumps([transformer, draw(pooling)] + draw(st.lists(entry, max_size=1))).encode()
        return json.dumps(draw(st.lists(entry, max_size=4) if layout == "entries" else json_values)).encode()
    if name == "1_Pooling/config.json":
        keys = st.sampled_from(["pooling_mode", "pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                "pooling_mode_max_tokens", "pooling_mode_lasttoken", "word_embedding_dimension"])
        return json.dumps(draw(st.dictionaries(keys, json_scalars | st.sampled_from(["cls", "mean"]), max_size=3)
                               | json_values)).encode()
    if name.endswith("config.json"):
        return json.dumps(draw(raw_configs())).encode("utf-8")
    return draw(st.binary(max_size=64))


@st.composite
def model_folders(draw) -> dict[str, bytes]:
    # Often a config and weights, so that resolving reaches the hashing and the sentence-transformers files.
    names = draw(st.sampled_from([[], ["config.json", "model.safetensors"],
                                  ["config.json", "model.safetensors", "modules.json", "1_Pooling/config.json"]]))
    names += [n for n in draw(st.lists(st.sampled_from(FOLDER_FILES), max_size=4, unique=True)) if n not in names]
    for _ in range(draw(st.integers(0, 2))):
        stem, ext = draw(st.sampled_from([("model", "safetensors"), ("pytorch_model", "bin")]))
        names.append(f"{stem}-{draw(SHARD_NUMBERS):05d}-of-{draw(SHARD_NUMBERS):05d}.{ext}")
    return {name: draw(file_contents(name)) for name in names}


@fuzz(CONFIG_FOLDER)
@given(files=model_folders(), pick=st.integers(0, 20))
def test_resolve_and_read_a_model_folder(work, files, pick):
    folder = fresh_dir(work)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    names = sorted(files)
    ref = folder / names[pick % len(names)] if names and pick % 3 == 0 else folder
    resolved = outcome(lambda: resolve_model(str(ref)), InputError)
    with time_limit(CASE_SECONDS):
        pooling, why = read_pooling(folder)  # never raises: (None, reason) at worst
    assert isinstance(why, str) and (pooling is None or not why)
    if not isinstance(resolved, LmscanError):
        assert resolved.weight_files and all(len(sha) == 64 for sha in resolved.weight_sha256.values())


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((TINY_BERT / "config.json").read_text())


# model_type and auto_map are left to test_check_config_and_identify: here the config passes check_config.
CONFIG_FIELDS = ["architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id",
                 "id2label", "label2id", "num_labels", "hidden_act", "layer_norm_eps", "dtype",
                 "position_embedding_type", "tie_word_embeddings", "is_decoder"]
SMALL_VALUES = (st.none() | st.booleans() | st.integers(-2, 70) | st.floats(allow_nan=True) | st.text(max_size=6)
                | st.sampled_from([["BertForSequenceClassification"], "BertForSequenceClassification", 3, {"0": "a"},
                                   {"x": 1}, "gelu", "float16", "bfloat16", "absolute", "relative_key"])
                | st.lists(st.integers(0, 3) | st.text(max_size=4), max_size=3))


FIELD_VALUES = {  # fields read by lmscan itself, beside transformers' own validation
    "architectures": st.sampled_from([["BertForSequenceClassification"], ["BertModel"], "BertModel", 1, True,
                                      {"a": 1}, [1, None], []]) | SMALL_VALUES,
    "id2label": st.dictionaries(st.text(max_size=3) | st.integers(-1, 3).map(str), json_scalars, max_size=3)
    | SMALL_VALUES,
}


@st.composite
def config_edits(draw) -> dict:
    fields = draw(st.lists(st.sampled_from(CONFIG_FIELDS), min_size=1, max_size=4, unique=True))
    return {name: draw(FIELD_VALUES.get(name, SMALL_VALUES)) for name in fields}


@fuzz(CONFIG_MODEL)
@given(edits=config_edits())
def test_load_model_with_a_fuzzed_config(work, tiny_config, edits):
    """The tiny BERT's real weights and vocabulary under a config with a few fields changed."""
    folder = fresh_dir(work)
    for name in ("model.safetensors", "vocab.txt", "tokenizer_config.json"):
        os.link(TINY_BERT / name, folder / name)
    (folder / "config.json").write_text(json.dumps({**tiny_config, **edits}))
    loaded = outcome(lambda: load_model(resolve_model(str(folder)), for_scan=True))
    if not isinstance(loaded, LmscanError):
        assert loaded.arch.hidden_size > 0 and len(loaded.tokenizer) > 1


TOKENIZER_NAMES = ["tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json"]


@st.composite
def tokenizer_files(draw) -> dict[str, bytes]:
    files = {}
    for name in draw(st.lists(st.sampled_from(TOKENIZER_NAMES), min_size=1, max_size=3, unique=True)):
        kind = draw(st.sampled_from(["bytes", "json", "lines"]))
        if kind == "bytes":
            files[name] = draw(st.binary(max_size=96))
        elif kind == "json":
            value = draw(json_values | st.fixed_dictionaries({}, optional={
                "version": st.just("1.0"), "model": st.fixed_dictionaries(
                    {"type": st.sampled_from(["WordPiece", "BPE", "Unigram", "WordLevel", "x"])},
                    optional={"vocab": json_values, "unk_token": json_scalars, "merges": json_values}),
                "added_tokens": json_values, "normalizer": json_values, "pre_tokenizer": json_values,
                "tokenizer_class": st.sampled_from(["BertTokenizer", "GPT2Tokenizer", "Nope"]) | json_scalars}))
            files[name] = json.dumps(value).encode("utf-8")
        else:
            files[name] = "\n".join(draw(st.lists(st.text(max_size=5), max_size=12))).encode("utf-8")
    return files


@fuzz(TOKENIZER_FILES)
@given(files=tokenizer_files())
def test_tokenizer_files(work, tiny_config, files):
    folder = fresh_dir(work)
    (folder / "config.json").write_text(json.dumps(tiny_config))
    for name, content in files.items():
        (folder / name).write_bytes(content)
    tokenizer = outcome(lambda: _load_tokenizer(folder, "fuzzed model"), InputError)
    if not isinstance(tokenizer, LmscanError):
        assert len(tokenizer) > 1


def test_deeply_nested_config_json(tmp_path):
    for name in ("model.safetensors", "vocab.txt"):
        os.link(TINY_BERT / name, tmp_path / name)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "x": ' + deep(100_000) + "}")
    (tmp_path / "modules.json").write_text(deep(100_000))
    error = outcome(lambda: load_model(resolve_model(str(tmp_path))), InputError)
    assert isinstance(error, InputError) and "config.json" in str(error)
    assert read_pooling(tmp_path)[0] is None


def test_shard_names_with_huge_part_counts(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / f"model-00001-of-{10**60}.safetensors").write_bytes(b"x")
    error = outcome(lambda: resolve_model(str(tmp_path)), InputError)
    assert isinstance(error, InputError) and "incomplete" in str(error)


# === door 3: pickled checkpoints ===================================================================


def _zip_checkpoint(pickled: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    """A torch zip checkpoint holding ``pickled`` as its data.pkl (written with correct CRCs)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_pickles(tmp_path_factory) -> dict[str, bytes]:
    """A small state dict saved by torch in both formats, and the zip's parts."""
    folder = tmp_path_factory.mktemp("pickles")
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16),
             "n": {"c": torch.tensor([7], dtype=torch.int64)}}
    torch.save(state, folder / "zip.bin")
    torch.save(state, folder / "legacy.bin", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(folder / "zip.bin") as archive:
        parts = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    return {"zip": (folder / "zip.bin").read_bytes(), "legacy": (folder / "legacy.bin").read_bytes(), "parts": parts}


def _check_pickle(path: Path, allowed=(InputError, UnsafeCheckpointError)):
    _check_state_dict(outcome(lambda: load_state_dict([path]), *allowed))
    scan = outcome(lambda: scan_pickle_file(path))
    assert not isinstance(scan, LmscanError), scan
    assert scan["scanned"] is True and isinstance(scan["code"], bool) and isinstance(scan["detail"], str)
    return scan


@fuzz(PICKLE_RANDOM)
@given(blob=st.binary(max_size=256), suffix=st.sampled_from([".bin", ".pt", ".pkl"]))
def test_pickle_random_bytes(work, blob, suffix):
    path = fresh_dir(work) / f"weights{suffix}"
    path.write_bytes(blob)
    _check_pickle(path)


@fuzz(PICKLE_MUTATED)
@given(data=st.data(), how=st.sampled_from(["zip-file", "zip-data.pkl", "legacy", "zip-deflated", "zip-lzma",
                                            "zip-bzip2"]))
def test_pickle_mutated_real_checkpoints(work, real_pickles, data, how):
    if how == "legacy":
        blob = mutate(data.draw, real_pickles["legacy"])
    elif how == "zip-file":
        blob = mutate(data.draw, real_pickles["zip"])
    elif how.startswith("zip-") and how != "zip-data.pkl":  # compressed members: the decompressors meet the damage
        method = {"zip-deflated": zipfile.ZIP_DEFLATED, "zip-lzma": zipfile.ZIP_LZMA, "zip-bzip2": zipfile.ZIP_BZIP2}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", method[how]) as archive:
            for name, content in real_pickles["parts"].items():
                archive.writestr(name, content)
        blob = mutate(data.draw, buffer.getvalue())
    else:  # the pickle inside mutated, the zip around it intact
        parts = dict(real_pickles["parts"])
        pkl = next(name for name in parts if name.endswith("data.pkl"))
        parts[pkl] = mutate(data.draw, parts[pkl])
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, content in parts.items():
                archive.writestr(name, content)
        blob = buffer.getvalue()
    path = fresh_dir(work) / "pytorch_model.bin"
    path.write_bytes(blob)
    _check_pickle(path)


# (module, name, args): each call would create the marker file MARKER if it ever ran.
DANGEROUS = [
    ("os", "system", ("touch {m}",)),
    ("posix", "system", ("touch {m}",)),
    ("subprocess", "call", (["touch", "{m}"],)),
    ("subprocess", "check_call", (["touch", "{m}"],)),
    ("subprocess", "Popen", (["touch", "{m}"],)),
    ("subprocess", "getoutput", ("touch {m}",)),
    ("builtins", "eval", ("open({m!r}, 'w').close()",)),
    ("builtins", "exec", ("open({m!r}, 'w').close()",)),
    ("__builtin__", "eval", ("open({m!r}, 'w').close()",)),
    ("builtins", "open", ("{m}", "w")),
    ("io", "open", ("{m}", "w")),
    ("_io", "open", ("{m}", "w")),
    ("codecs", "open", ("{m}", "w")),
    ("pathlib", "Path.touch", ()),  # a dotted name, resolved attribute by attribute by protocol 4
    ("torch", "save", ({}, "{m}")),
    ("torch.serialization", "save", ({}, "{m}")),
    ("numpy", "save", ("{m}", [1])),
    ("shutil", "copyfile", (__file__, "{m}")),
]


def _str_op(text: str, how: str) -> bytes:
    raw = text.encode("utf-8")
    if how == "short" and len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
    if how == "unicode" and "\n" not in text:
        return b"V" + text.encode("raw-unicode-escape") + b"\n"  # UNICODE
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _arg_ops(value, how: str) -> bytes:
    if isinstance(value, str):
        return _str_op(value, how)
    if isinstance(value, list):
        return b"]" + b"(" + b"".join(_arg_ops(v, how) for v in value) + b"e"  # EMPTY_LIST MARK ... APPENDS
    if isinstance(value, dict):
        return b"}"
    return pickle.dumps(value, protocol=2)[2:-1]


def dangerous_pickle(module: str, name: str, args: tuple, marker: Path, encoding: str, strings: str,
                     nest: bool) -> bytes:
    """A hand-assembled pickle calling ``module.name(*args)`` (with the marker's path filled in)."""
    def fill(value):
        if isinstance(value, str):
            return value.format(m=str(marker))
        return [fill(v) for v in value] if isinstance(value, list) else value

    args = tuple(fill(a) for a in args)
    if name == "Path.touch":
        args = ()
    arg_ops = b"(" + b"".join(_arg_ops(a, strings) for a in args)  # MARK + args
    if encoding == "GLOBAL":
        call = f"c{module}\n{name}\n".encode() + arg_ops + b"tR"  # GLOBAL, MARK args TUPLE, REDUCE
    elif encoding == "INST":
        call = arg_ops + f"i{module}\n{name}\n".encode()  # MARK args INST: calls at once
    elif encoding == "OBJ":
        call = b"(" + f"c{module}\n{name}\n".encode() + arg_ops[1:] + b"o"  # MARK class args OBJ
    elif encoding == "STACK_GLOBAL":
        call = _str_op(module, strings) + _str_op(name, strings) + b"\x93" + arg_ops + b"tR"
    else:  # STACK_GLOBAL with both names fetched from the memo, pushed long before
        call = (_str_op(module, strings) + b"\x94" + _str_op(name, strings) + b"\x94" + b"00"  # MEMOIZE, POP
                + b"h\x00h\x01\x93" + arg_ops + b"tR")  # BINGET 0, BINGET 1, STACK_GLOBAL
    if nest:  # the call as one value of an otherwise ordinary dict
        call = b"}" + _str_op("w", "short") + call + b"s"
    return b"\x80\x04" + call + b"."


@st.composite
def dangerous_cases(draw):
    return (draw(st.sampled_from(DANGEROUS)),
            draw(st.sampled_from(["GLOBAL", "INST", "OBJ", "STACK_GLOBAL", "MEMO"])),
            draw(st.sampled_from(["short", "unicode", "long"])),
            draw(st.booleans()),
            draw(st.sampled_from(["raw", "zip", "legacy-4th", "pkl"])))


def _legacy_with(pickled: bytes) -> bytes:
    """The legacy torch layout (magic number, protocol, sys info) with ``pickled`` as the state."""
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    return head + pickled + pickle.dumps([], protocol=2)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory) -> Path:
    marker = tmp_path_factory.mktemp("sentinel") / "RAN"
    yield marker
    assert not marker.exists(), "a crafted pickle ran"


@fuzz(PICKLE_CRAFTED)
@given(case=dangerous_cases())
def test_dangerous_pickles_are_refused_and_never_run(work, sentinel, case):
    (module, name, args), encoding, strings, nest, wrap = case
    pickled = dangerous_pickle(module, name, args, sentinel, encoding, strings, nest)
    blob = {"raw": pickled, "pkl": pickled, "zip": _zip_checkpoint(pickled),
            "legacy-4th": _legacy_with(pickled)}[wrap]
    path = fresh_dir(work) / ("payload.pkl" if wrap == "pkl" else "pytorch_model.bin")
    path.write_bytes(blob)
    if wrap != "pkl":
        error = outcome(lambda: load_state_dict([path]), UnsafeCheckpointError)
        assert isinstance(error, UnsafeCheckpointError), "a pickle importing a callable was not refused"
    scan = _check_pickle(path, allowed=(UnsafeCheckpointError,)) if wrap != "pkl" else outcome(
        lambda: scan_pickle_file(path))
    assert scan["code"] is True, scan
    assert not sentinel.exists(), f"the payload ran: {module}.{name}"


@pytest.mark.parametrize("strings", ["short", "unicode", "long"])
@pytest.mark.parametrize("encoding", ["GLOBAL", "INST", "OBJ", "STACK_GLOBAL", "MEMO"])
def test_the_crafted_payloads_are_live(tmp_path, encoding, strings):
    """Control: plain pickle does run the crafted bytes, so the sentinel above means something."""
    marker = tmp_path / "RAN"
    pickled = dangerous_pickle("builtins", "open", ("{m}", "w"), marker, encoding, strings, nest=True)
    pickle.loads(pickled)["w"].close()
    assert marker.exists()


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 2**40])
def test_pickle_huge_string_length_fails_fast(tmp_path, length):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04\x8d" + struct.pack("<Q", length) + b"abc")  # BINUNICODE8
    with time_limit(10):
        with pytest.raises(InputError, match="pytorch_model.bin"):
            load_state_dict([path])


# === door 3b: GGUF files ===========================================================================

GGUF_MUTATED = 200


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory) -> tuple[bytes, int]:
    """A tiny llama GGUF written by the gguf package, and where its tensor data starts."""
    gguf = pytest.importorskip("gguf")
    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf",
                           chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return path.read_bytes(), int(gguf.GGUFReader(str(path)).data_offset)


@fuzz(GGUF_MUTATED)
@given(data=st.data())
def test_gguf_header_mutated(work, real_gguf, data):
    """The header, metadata and tensor table mutated (the tensor data is only numbers): the
    resolver reads and checks it or refuses it in one line."""
    blob, data_offset = real_gguf
    head = mutate(data.draw, blob[:data_offset], max_edits=3)
    path = fresh_dir(work) / "model.gguf"
    path.write_bytes(head + blob[data_offset:])
    result = outcome(lambda: resolve_model(str(path)), InputError)
    if not isinstance(result, LmscanError):
        assert all(isinstance(p, str) and "\n" not in p for p in result.gguf.problems)


# === door 4: .pvs files ============================================================================

SITE_VALUES = st.sampled_from(["cls", "pooler", "mask", "tokens", "last", "embedding", "label", "nope"]) | json_values


@st.composite
def pvs_documents(draw) -> object:
    hidden = draw(st.integers(1, 6))
    doc = {"format": "lmscan-pvs", "version": 1, "created": "2026-01-01", "generator": "lmscan",
           "model": {"ref": "minilm", "hidden_size": hidden, "model_sha256": "0" * 64},
           "t_match": 0.8, "calibration": {}, "search": {},
           "pvs": [{"id": i, "site": "cls", "template": None, "signs": "+-" * hidden, "verified": True,
                    "source": "vocab-sweep", "collapse": 0.1, "activation_rate": 1.0,
                    "triggers": [{"text": "zq", "tokens": ["z", "##q"]}]} for i in range(draw(st.integers(0, 2)))]}
    for pv in doc["pvs"]:
        pv["signs"] = pv["signs"][:hidden]
    top = ["format", "version", "model", "t_match", "pvs", "calibration", "search", "created", "generator"]
    for key in draw(st.lists(st.sampled_from(top), max_size=3)):
        doc[key] = draw(json_values | st.sampled_from([1, 1.0, True, "lmscan-pvs", float("nan"), float("inf"), 10**30]))
    if isinstance(doc.get("model"), dict):
        for key in draw(st.lists(st.sampled_from(["hidden_size", "ref", "model_sha256"]), max_size=2)):
            doc["model"][key] = draw(json_values | st.sampled_from([True, 0, -1, 10**30, 2.0, float("nan")]))
    if isinstance(doc.get("pvs"), list):
        for pv in doc["pvs"]:
            if not isinstance(pv, dict):
                continue
            for key in draw(st.lists(st.sampled_from(["id", "site", "template", "signs", "verified", "source",
                                                      "collapse", "activation_rate", "triggers"]), max_size=3)):
                pv[key] = draw(SITE_VALUES if key == "site" else json_values | st.sampled_from(
                    ["{text}", "+", "+-" * 40, float("inf"), float("nan"), 10**30, [5], ["zq"], [{"text": 5}]]))
    return doc


def _check_pvs(path: Path):
    pvset = outcome(lambda: read_pvs(path), InputError)
    if isinstance(pvset, LmscanError):
        return
    assert pvset.hidden_size > 0 and 0.5 < pvset.t_match <= 1.0
    assert all(len(p.signs) == pvset.hidden_size for p in pvset.pvs)
    words = outcome(lambda: trigger_words(path), InputError)
    if not isinstance(words, LmscanError):
        assert words and all(isinstance(w, str) for w in words)
    outcome(lambda: PVMonitor(pvset), InputError)


@fuzz(PVS_RANDOM)
@given(document=json_values | st.binary(max_size=64))
def test_pvs_random_documents(work, document):
    path = fresh_dir(work) / "model.pvs"
    path.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
    _check_pvs(path)


@fuzz(PVS_MUTATED)
@given(document=pvs_documents())
def test_pvs_near_valid_documents(work, document):
    path = fresh_dir(work) / "model.pvs"
    path.write_text(json.dumps(document))
    _check_pvs(path)


@pytest.mark.parametrize("text", [
    '{"format": "lmscan-pvs", "version": 1, "model": {"hidden_size": ' + "9" * 5000 + "}}",
    deep(100_000),
    '{"format": "lmscan-pvs", "version": 1, "model": {"hidden_size": 2}, "t_match": NaN, "pvs": []}',
])
def test_pvs_huge_numbers_and_deep_nesting(tmp_path, text):
    path = tmp_path / "x.pvs"
    path.write_text(text)
    error = outcome(lambda: read_pvs(path), InputError)
    assert isinstance(error, InputError) and "x.pvs" in str(error)


# === end to end: one line on stderr, exit 2 or 3, no traceback =====================================


def _bad_folder(root: Path, case: str) -> list[str]:
    """A model folder broken in one way; returns the command line that meets it."""
    folder = root / case
    folder.mkdir()
    for name in ("config.json", "vocab.txt", "model.safetensors"):
        shutil.copy(TINY_BERT / name, folder / name)
    if case == "safetensors-huge-length":
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    elif case == "safetensors-bad-dtype":
        header = b'{"w":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}'
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    elif case == "config-nested":
        (folder / "config.json").write_text('{"model_type": "bert", "x": ' + deep(50_000) + "}")
    elif case == "config-unsupported":
        config = json.loads((TINY_BERT / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    elif case == "tokenizer-garbage":
        (folder / "vocab.txt").unlink()
        (folder / "tokenizer.json").write_bytes(b'{"model": {"type": "WordPiece", "vocab": 7}}')
    elif case == "shards-huge-count":
        (folder / "model.safetensors").unlink()
        (folder / f"model-00001-of-{10**40}.safetensors").write_bytes(b"x")
    elif case.startswith("pickle-"):
        (folder / "model.safetensors").unlink()
        payload = dangerous_pickle("os", "system", ("touch {m}",), root / "RAN", case.split("-")[1], "short", True)
        (folder / "pytorch_model.bin").write_bytes(_zip_checkpoint(payload) if case.endswith("zip") else payload)
    elif case == "gguf-huge-count":  # a GGUF header claiming 2**60 tensors in a few bytes
        (folder / "model.safetensors").unlink()
        (folder / "config.json").unlink()
        (folder / "model.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 1) + bytes(64))
        return ["check", str(folder / "model.gguf"), "--device", "cpu", "--no-cache"]
    elif case == "adapter-pickle-code":  # a LoRA adapter on the tiny BERT whose pickle carries code
        (folder / "config.json").unlink()
        (folder / "model.safetensors").unlink()
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": str(TINY_BERT), "r": 2, "lora_alpha": 4,
            "target_modules": ["query", "value"]}))
        payload = dangerous_pickle("os", "system", ("touch {m}",), root / "RAN", "GLOBAL", "short", True)
        (folder / "adapter_model.bin").write_bytes(_zip_checkpoint(payload))
    elif case.startswith("pvs-"):
        text = {"pvs-digits": '{"format": "lmscan-pvs", "version": 1, "model": {"hidden_size": ' + "9" * 5000 + "}}",
                "pvs-types": json.dumps({"format": "lmscan-pvs", "version": 1, "model": {"hidden_size": 1},
                                         "t_match": 0.9, "pvs": [{"site": "cls", "signs": "+", "id": "x"}]}),
                "pvs-nan": '{"format": "lmscan-pvs", "version": 1, "model": {"hidden_size": 1}, "t_match": NaN}'}[case]
        (folder / "model.pvs").write_text(text)
        return ["monitor", "hello", "--pvs", str(folder / "model.pvs"), "--model", str(folder), "--device", "cpu"]
    return ["check", str(folder), "--device", "cpu", "--no-cache"]


CLI_CASES = {
    "safetensors-huge-length": 2, "safetensors-bad-dtype": 2,
    "config-nested": 2, "config-unsupported": 3, "tokenizer-garbage": 2, "shards-huge-count": 2,
    "pickle-GLOBAL-raw": 2, "pickle-MEMO-zip": 2, "pickle-INST-raw": 2,
    "pvs-digits": 2, "pvs-types": 2, "pvs-nan": 2, "gguf-huge-count": 2, "adapter-pickle-code": 2,
}


def _assert_one_line(code: int, stderr: str, expected: int):
    """One error line. Outside a terminal a scan also logs the stage it starts ("[lmscan] load"):
    progress, not part of the error, so those lines are set aside."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip("\n").split("\n") if not line.startswith("[lmscan] ")]
    assert code == expected and len(lines) == 1 and lines[0].startswith("lmscan: error: "), (code, stderr)


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args = _bad_folder(tmp_path, case)
    with time_limit(60):
        result = CliRunner().invoke(main, args)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    _assert_one_line(result.exit_code, result.stderr, CLI_CASES[case])
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize("case", ["pickle-STACK_GLOBAL-zip", "safetensors-huge-length"])
def test_cli_subprocess_bad_input_is_one_line(tmp_path, case):
    args = _bad_folder(tmp_path, case)
    env = {**os.environ, "LMSCAN_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "lmscan.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    _assert_one_line(proc.returncode, proc.stderr, 2)
    assert not (tmp_path / "RAN").exists()
