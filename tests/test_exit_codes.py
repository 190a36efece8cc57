"""The README's table of bad inputs, walked: each row is run through the real CLI.

Every row names a case, its exit code and (part of) the one line lmscan prints; this
test builds each case in a temporary folder, runs `lmscan check` on it and holds the
CLI to the row: that exit code, exactly one line on stderr (progress lines aside), no
traceback, and where a JSON document is still written, a reason that ends with the
same exit code. No case gets as far as a scan: each fails before or right after the load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from tests.conftest import FIXTURES, REPO
from tests.test_loading import _write_malicious
from tests.tiny_decoders import DECODER_CONFIGS, write_tiny_decoder

TABLE_START = "<!-- exit-code-table -->"


def readme_rows() -> list[tuple[str, int, str]]:
    """(case, exit code, example message) for each row of the README's exit-code table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text[text.index(TABLE_START):].splitlines()[1:]
    rows = []
    for line in lines[2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        case, code, message = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((case, int(code), message.strip("`")))
    return rows


def tiny_bert(tmp: Path) -> Path:
    model = tmp / "model"
    shutil.copytree(FIXTURES / "tiny-bert", model)
    return model


def edit_config(model: Path, **changes) -> Path:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return model


def symlink_loop(tmp: Path) -> Path:
    loop = tmp / "loop"
    os.symlink(loop, loop)
    return loop


def folder_without_config(tmp: Path) -> Path:
    model = tiny_bert(tmp)
    (model / "config.json").unlink()
    return model


def folder_without_weights(tmp: Path) -> Path:
    model = tiny_bert(tmp)
    (model / "model.safetensors").unlink()
    return model


def unreadable_config(tmp: Path) -> Path:
    model = tiny_bert(tmp)
    (model / "config.json").write_text("{not json")
    return model


def code_payload_pickle(tmp: Path) -> Path:
    _write_malicious(tmp / "model", tmp / "PWNED", "zip")
    return tmp / "model"


def unwritable_folder(tmp: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: no folder is unwritable")
    folder = tmp / "read-only"
    folder.mkdir(mode=0o500)
    return folder


def gguf_past_its_end(tmp: Path) -> Path:
    pytest.importorskip("gguf")
    import gguf

    from tests.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp / "broken.gguf")
    reader = gguf.GGUFReader(str(path), "r+")
    reader.tensors[-1].field.parts[-1][0] = 10**9  # the last tensor's data offset, far past the end
    reader.data.flush()
    return path


def gguf_of_unknown_architecture(tmp: Path) -> Path:
    pytest.importorskip("gguf")
    import gguf
    import numpy as np

    path = tmp / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def adapter_of(tmp: Path, base_ref: str | None = None) -> Path:
    from tests.test_adapters import make_adapter, set_base

    adapter, _ = make_adapter(write_tiny_decoder(tmp / "base", "llama"), tmp / "adapter")
    if base_ref is not None:
        set_base(adapter, base_ref)
    return adapter


def wide_llama(tmp: Path) -> Path:
    import transformers

    wide = tmp / "wide"
    config = transformers.AutoConfig.for_model("llama", **{**DECODER_CONFIGS["llama"], "hidden_size": 48})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    write_tiny_decoder(tmp / "tok", "llama")
    shutil.copy(tmp / "tok" / "tokenizer.json", wide / "tokenizer.json")
    return wide


def check(model, *options: str) -> list[str]:
    return ["check", str(model), "--no-cache", "--device", "cpu", *options]


# README case -> how to build it in a temporary folder: a function of tmp_path giving the
# CLI arguments. A model case also asks for JSON, to hold its document to the exit code.
RECIPES = {
    "a path that does not exist": lambda tmp: check(tmp / "missing"),
    "a symlink loop": lambda tmp: check(symlink_loop(tmp)),
    "a folder with neither config.json nor weights": lambda tmp: check(tmp),
    "weights without a config.json": lambda tmp: check(folder_without_config(tmp)),
    "a config.json without weights": lambda tmp: check(folder_without_weights(tmp)),
    "a config.json that is not JSON": lambda tmp: check(unreadable_config(tmp), "--format", "json"),
    "a config.json whose `hidden_size` contradicts the weights":
        lambda tmp: check(edit_config(tiny_bert(tmp), hidden_size=48), "--format", "json"),
    "a pickle with a code payload as the only weights": lambda tmp: check(code_payload_pickle(tmp), "--format", "json"),
    "an architecture lmscan does not support":
        lambda tmp: check(edit_config(tiny_bert(tmp), model_type="t5", architectures=["T5Model"]), "--format", "json"),
    "custom modelling code (`auto_map` in config.json)":
        lambda tmp: check(edit_config(tiny_bert(tmp), auto_map={"AutoModel": "modeling_x.XModel"}),
                          "--format", "json"),
    "a GGUF file whose tensor data lies past its end": lambda tmp: check(gguf_past_its_end(tmp)),
    "a GGUF architecture transformers cannot dequantise":
        lambda tmp: check(gguf_of_unknown_architecture(tmp), "--format", "json"),
    "an adapter whose base model cannot be found": lambda tmp: check(adapter_of(tmp, str(tmp / "gone"))),
    "an adapter for another hidden size than its base":
        lambda tmp: check(adapter_of(tmp), "--base", str(wide_llama(tmp)), "--format", "json"),
    "an unknown `--profile`": lambda tmp: check(FIXTURES / "tiny-bert", "--profile", "nope"),
    "an unknown detector in `--detectors`": lambda tmp: check(FIXTURES / "tiny-bert", "--detectors", "nope"),
    "an unknown site in `--sites`": lambda tmp: check(FIXTURES / "tiny-bert", "--sites", "lst"),
    "a site the checkpoint does not offer": lambda tmp: check(FIXTURES / "tiny-bert", "--sites", "last"),
    "an unknown `--fail-on` value": lambda tmp: check(FIXTURES / "tiny-bert", "--fail-on", "sometimes"),
    "an unknown `--format`": lambda tmp: check(FIXTURES / "tiny-bert", "--format", "xml"),
    "`-o` naming a folder": lambda tmp: check(FIXTURES / "tiny-bert", "-o", str(tmp)),
    "`-o` in a folder that does not exist": lambda tmp: check(FIXTURES / "tiny-bert", "-o", str(tmp / "no" / "r.json")),
    "`-o` in a folder lmscan cannot write":
        lambda tmp: check(FIXTURES / "tiny-bert", "-o", str(unwritable_folder(tmp) / "r.json")),
    "an unknown command": lambda tmp: ["chek", str(FIXTURES / "tiny-bert")],
}


def test_every_recipe_is_in_the_table():
    assert sorted(RECIPES) == sorted(case for case, _, _ in readme_rows())


@pytest.mark.parametrize("case, code, example", readme_rows(), ids=[row[0] for row in readme_rows()])
def test_bad_input_exits_as_documented_in_one_line(case, code, example, tmp_path):
    assert case in RECIPES, f"README row {case!r} has no recipe in this test"
    result = CliRunner().invoke(main, RECIPES[case](tmp_path), prog_name="lmscan")
    assert result.exit_code == code, (case, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[lmscan]")]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("lmscan: error: "), line
    # The example's "…" stands for a path or a detail that differs from run to run.
    pattern = ".*".join(re.escape(piece) for piece in example.split("…"))
    assert re.search(pattern, line), (example, line)
    if result.stdout.strip():  # the model was found: CI still gets a document, which agrees with the exit code
        document = json.loads(result.stdout)
        assert document["verdict"] == "not-assessed" and document["reason"].endswith(f"(exit {code})")
