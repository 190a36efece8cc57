"""GGUF files: read by their header, checked, dequantised by transformers, scanned end to end.

Every file here is written by the gguf package's own GGUFWriter (tests/tiny_gguf.py); broken
ones are that file with bytes patched through the package's reader in r+ mode.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.models import load_model, resolve_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

try:
    from tiny_gguf import write_tiny_gguf
except ImportError:  # tests/ imported as a package
    from tests.tiny_gguf import write_tiny_gguf

# The shape of the CVE-2024-34359 payload: a Jinja global's __init__.__globals__ reaches os.
def _payload(marker) -> str:
    return ("{% for message in messages %}{{ message['content'] }}{% endfor %}"
            "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}")


def _check(target, *extra):
    result = CliRunner().invoke(main, ["check", str(target), "--format", "json", "--no-cache", "--device", "cpu",
                                       *extra])
    return result


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, ValueError, TypeError))
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmscan: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / "tiny-llama-f32.gguf")


def test_header_is_read_and_the_file_is_the_weights(tiny_gguf):
    resolved = resolve_model(str(tiny_gguf))
    info = resolved.gguf
    assert (info.architecture, info.version, info.tensor_count, info.problems) == ("llama", 3, 21, ())
    assert list(resolved.weight_sha256) == [tiny_gguf.name] and resolved.unloaded == {}
    # The folder holding one GGUF file names the same model.
    assert resolve_model(str(tiny_gguf.parent)).model_sha256 == resolved.model_sha256


def test_tiny_gguf_loads_as_its_decoder(tiny_gguf):
    loaded = load_model(resolve_model(str(tiny_gguf)))
    assert loaded.arch.model_type == "llama" and loaded.arch.family == "decoder"
    assert (loaded.arch.hidden_size, loaded.arch.num_layers) == (32, 2) and not loaded.missing_keys
    assert type(loaded.model).__name__ == "LlamaModel" and loaded.stored_dtypes == ["F32"]
    assert len(loaded.tokenizer) == 200
    # The dequantised weights are the file's: the embedding matrix equals the stored tensor.
    reader = gguf.GGUFReader(str(tiny_gguf))
    stored = next(t for t in reader.tensors if t.name == "token_embd.weight")
    import numpy as np

    assert np.allclose(loaded.model.embed_tokens.weight.detach().numpy(), np.asarray(stored.data))


@pytest.mark.parametrize("as_folder", [False, True])
def test_gguf_scan_reaches_the_decoder_detector(tiny_gguf, as_folder):
    # The tiny file has no LM head and does not tie one: the decoder detector runs and says why it cannot read
    # next-token probabilities, so the verdict stays not-assessed for that reason, not for the format.
    result = _check(tiny_gguf.parent if as_folder else tiny_gguf)
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "not-assessed" and "target-inversion" in report["reason"]
    assert "ships no LM head" in report["reason"]
    assert "not supported" not in report["reason"]
    model = report["model"]
    assert model["architecture"] == "llama" and model["gguf"]["architecture"] == "llama"
    assert list(model["weight_sha256"]) == [tiny_gguf.name] and model["weight_dtypes"] == ["F32"]
    assert "Converting" not in result.stderr  # transformers' own progress bar stays off lmscan's stderr


def test_gguf_chat_template_payload_is_flagged_and_never_rendered(tmp_path):
    marker = tmp_path / "rendered"
    path = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=_payload(marker))
    result = _check(path)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    files = next(run for run in report["detectors"] if run["name"] == "files")
    hits = [f for f in files["findings"] if f["rule_id"] == "LMS005"]
    assert len(hits) == 1 and hits[0]["severity"] == "high" and hits[0]["evidence"]["file"] == "chat.gguf"
    assert "__globals__" in hits[0]["message"] and report["verdict"] == "backdoored"
    assert not marker.exists()


def test_a_plain_gguf_chat_template_is_no_finding(tmp_path):
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    path = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=template)
    resolved = resolve_model(str(path))
    assert resolved.gguf.chat_templates == (("tokenizer.chat_template", template),)
    from lmscan.detectors.files import run_files

    run = run_files(resolved)
    assert run.findings == [] and run.stats["chat_templates"] == ["chat.gguf:default"]


def _patch_tensor_offset(path, index: int, value: int) -> None:
    reader = gguf.GGUFReader(str(path), "r+")
    reader.tensors[index].field.parts[-1][0] = value  # the tensor info's data offset, in place
    reader.data.flush()
    del reader


def test_tensor_data_past_the_end_of_the_file_is_one_line_exit_2(tiny_gguf, tmp_path):
    path = shutil.copy(tiny_gguf, tmp_path / "broken.gguf")
    _patch_tensor_offset(path, -1, 10**9)
    line = _one_line_error(_check(path), 2)
    assert "not a valid GGUF file" in line and "broken.gguf" in line


def test_an_absurd_tensor_count_is_one_line_exit_2(tiny_gguf, tmp_path):
    path = shutil.copy(tiny_gguf, tmp_path / "count.gguf")
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(struct.pack("<Q", 2**40))
    line = _one_line_error(_check(path), 2)
    assert "claims 1099511627776 tensors" in line


def test_tensors_sharing_bytes_are_a_file_finding(tiny_gguf, tmp_path):
    path = shutil.copy(tiny_gguf, tmp_path / "overlap.gguf")
    reader = gguf.GGUFReader(str(path))
    # blk.0.attn_q and blk.0.attn_output have the same shape: point one at the other's bytes.
    names = [t.name for t in reader.tensors]
    q, out = names.index("blk.0.attn_q.weight"), names.index("blk.0.attn_output.weight")
    offset = int(reader.tensors[q].field.parts[-1][0])
    del reader
    _patch_tensor_offset(path, out, offset)
    resolved = resolve_model(str(path))
    assert any("share bytes" in p for p in resolved.gguf.problems)
    result = _check(path)
    report = json.loads(result.stdout)
    files = next(run for run in report["detectors"] if run["name"] == "files")
    assert [f["rule_id"] for f in files["findings"]] == ["LMS007"]
    assert files["findings"][0]["verdict"] == "suspicious" and "share bytes" in files["findings"][0]["message"]


def test_a_block_count_that_disagrees_with_the_tensors_is_a_problem(tmp_path):
    path = write_tiny_gguf(tmp_path / "blocks.gguf")
    reader = gguf.GGUFReader(str(path), "r+")
    reader.fields["llama.block_count"].parts[-1][0] = 3
    reader.data.flush()
    del reader
    problems = resolve_model(str(path)).gguf.problems
    assert problems == ("the metadata names 3 blocks (llama.block_count) but the tensors hold 2",)


def test_a_gguf_architecture_transformers_cannot_load_is_exit_3(tmp_path):
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = _one_line_error(_check(path), 3)
    assert "GGUF architecture 'frobnicator' cannot be dequantised by transformers" in line


def test_several_gguf_files_in_a_folder_must_be_named(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf, tmp_path / "a.gguf")
    shutil.copy(tiny_gguf, tmp_path / "b.gguf")
    line = _one_line_error(_check(tmp_path), 2)
    assert "holds 2 GGUF files (a.gguf, b.gguf); name the one to scan" in line
    # Named, the other one is a weight file nobody scanned (and it is part of the folder's identity).
    resolved = resolve_model(str(tmp_path / "a.gguf"))
    assert resolved.unloaded == {"b.gguf": {"kind": "gguf", "scanned": False}}
    assert "b.gguf" in resolved.other_files


def test_a_folder_with_a_config_json_and_one_gguf_is_the_gguf(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    resolved = resolve_model(str(tmp_path))
    assert resolved.gguf is not None and list(resolved.weight_sha256) == ["m.gguf"]
    assert "config.json" in resolved.file_sha256  # not read, but part of the folder's identity


def test_the_folder_identity_covers_the_gguf_file(tiny_gguf, tmp_path):
    path = shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    (tmp_path / "README.md").write_text("a model\n")
    before = resolve_model(str(path))
    assert "README.md" in before.other_files and "m.gguf" in before.weight_sha256
    with open(path, "r+b") as handle:  # one byte of tensor data changes
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    after = resolve_model(str(path))
    assert after.folder_sha256 != before.folder_sha256 and after.model_sha256 != before.model_sha256


def test_without_the_gguf_extra_the_error_names_it(tiny_gguf):
    # A Python in which the gguf package cannot be imported (sys.modules entry None).
    code = "import sys; sys.modules['gguf'] = None; from lmscan.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "check", str(tiny_gguf), "--device", "cpu", "--no-cache"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("lmscan: error: reading GGUF files needs the gguf extra: "
                                                    "pip install 'lmscan-backdoor[gguf]'")


def test_export_pvs_refuses_a_decoder(tiny_gguf, tmp_path):
    result = CliRunner().invoke(main, ["export-pvs", str(tmp_path / "out.pvs"), "--model", str(tiny_gguf),
                                       "--device", "cpu"])
    line = _one_line_error(result, 3)
    assert "PV export needs an encoder" in line and not (tmp_path / "out.pvs").exists()
