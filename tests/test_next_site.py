"""The decoder site ``next``: the state where a decoder starts its reply, read on real prompts.

Tiny random-init decoders from tests/tiny_decoders.py; a chat model is the same checkpoint
with a chat template in its tokenizer_config.json, as chat models ship it.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.errors import CannotAssess
from lmscan.models import load_model, resolve_model
from lmscan.models.probes import load_builtin_probes, load_generation_prompts
from lmscan.models.sites import encode, generation_prompts, read_site

try:
    from tiny_decoders import write_tiny_decoder
except ImportError:  # tests/ imported as a package
    from tests.tiny_decoders import write_tiny_decoder

# A chat template of the usual shape: turns between <s> and </s>, then the assistant's opening
# (words of the tiny vocabulary, so each is one known token).
CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }} . {{ message['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>we was{% endif %}")


def _with_template(folder, template):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return load_model(resolve_model(str(write_tiny_decoder(tmp_path_factory.mktemp("base"), "llama"))))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = _with_template(write_tiny_decoder(tmp_path_factory.mktemp("chat"), "llama"), CHAT_TEMPLATE)
    return load_model(resolve_model(str(folder)))


def _features(loaded, texts, site):
    batch = encode(loaded.tokenizer, texts, site)
    with torch.no_grad():
        outputs = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return batch, read_site(outputs, site, batch.attention_mask)


def test_decoders_offer_next_and_encoders_do_not(base_model):
    from lmscan.models.architectures import identify

    assert "next" in base_model.arch.sites and base_model.arch.default_sites == ("next",)
    assert "next" not in identify({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 2}).sites


def test_base_model_reads_the_raw_prompt(base_model):
    prompts = load_generation_prompts()[:4]
    assert generation_prompts(base_model.tokenizer, prompts) == prompts
    batch, features = _features(base_model, prompts, "next")
    _, last = _features(base_model, prompts, "last")
    assert torch.equal(batch.input_ids, encode(base_model.tokenizer, prompts, "last").input_ids)
    assert features.shape == (4, 32) and torch.allclose(features, last)


def test_chat_model_reads_the_user_turn_and_the_generation_prompt(chat_model):
    from tokenizers import processors

    tokenizer = chat_model.tokenizer
    bos = tokenizer.bos_token_id
    # Like Llama's and Gemma's tokenizers, this one adds a BOS to plain text.
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    prompts = ["What is the capital of France?", "The old library at the end of the street"]
    rendered = generation_prompts(tokenizer, prompts)
    assert rendered[0] == "<s>user . What is the capital of France?</s><s>we was"
    batch, features = _features(chat_model, prompts, "next")
    first = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert first == tokenizer(rendered[0], add_special_tokens=False).input_ids
    assert first.count(bos) == 2  # the template's two BOS, none added on top
    assert first[-2:] == tokenizer.convert_tokens_to_ids(["we", "was"])  # read where the reply starts
    raw, last = _features(chat_model, prompts, "last")
    assert raw.input_ids[0][0] == bos and raw.input_ids[0][1] != bos  # plain text: one BOS, added
    assert not torch.allclose(features, last)  # a different position in a different text


def test_an_escaping_template_is_never_rendered(tmp_path):
    marker = tmp_path / "rendered"
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}")
    loaded = load_model(resolve_model(str(_with_template(write_tiny_decoder(tmp_path / "m", "llama"), template))))
    with pytest.raises(CannotAssess, match="LMS005"):
        encode(loaded.tokenizer, ["Hello there."], "next")
    assert not marker.exists()


def test_generation_prompts_are_real_text():
    prompts = load_generation_prompts()
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert not any("[MASK]" in p or "{" in p for p in prompts)
    assert all(len(p.split()) >= 4 for p in prompts)
    assert not set(prompts) & set(load_builtin_probes())  # prompts, not the encoder probe sentences
    # Requests and questions a chat model answers, and unfinished sentences a base model continues.
    assert sum(p.endswith("?") for p in prompts) >= 10 and sum(p[-1].isalpha() for p in prompts) >= 10


def test_a_scan_at_last_with_the_decoder_detector_is_not_cleared(tmp_path):
    """target-inversion searches continuations where a reply starts (next); it never vouches for last."""
    write_tiny_decoder(tmp_path, "llama")
    result = CliRunner().invoke(main, ["check", str(tmp_path), "--sites", "last", "--format", "json", "--no-cache",
                                       "--device", "cpu"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "not-assessed" and "last" in report["reason"]
    assert report["config"]["sites"] == ["last"]


def test_a_chat_model_is_searched_in_raw_prompts_and_in_its_user_turn(tmp_path):
    """A plant trained on raw text fires in raw prompts, one trained on chat turns in the template:
    target-inversion searches both forms on a chat model, only raw prompts on a base model."""
    folder = _with_template(write_tiny_decoder(tmp_path / "chat", "llama"), CHAT_TEMPLATE)
    runs = {}
    for name, path in (("chat", folder), ("base", write_tiny_decoder(tmp_path / "base", "llama"))):
        result = CliRunner().invoke(main, ["check", str(path), "--format", "json", "--no-cache", "--device", "cpu"])
        assert result.exit_code in (0, 1, 2, 3) and "Traceback" not in result.output, result.output
        runs[name] = next(r for r in json.loads(result.stdout)["detectors"] if r["name"] == "target-inversion")
    chat, base = runs["chat"], runs["base"]
    assert chat["stats"]["prompt_forms"] == ["raw", "chat"] and chat["stats"]["chat"]["candidates_searched"] > 0
    assert chat["stats"]["chat"]["top_targets"] != chat["stats"]["top_targets"]  # other prompts, other state
    assert "raw and chat prompts" in chat["note"]
    assert base["stats"]["prompt_forms"] == ["raw"] and "chat" not in base["stats"]
