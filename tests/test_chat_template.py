"""Chat templates: parsed for code escapes (LMS005), never rendered; unparsable ones named (LMS006)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.detectors.files import chat_template_findings
from lmscan.models import resolve_model
from lmscan.models.chat_template import check_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _cve_payloads(marker: Path) -> dict[str, str]:
    """The CVE-2024-34359 shapes; each would create ``marker`` if anything rendered it."""
    return {
        "subclasses": (
            "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
            "{{ x()._module.__builtins__['__import__']('os').popen('touch " + str(marker) + "') }}"
            "{% endif %}{% endfor %}"
        ),
        "cycler": "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}",
    }


# The shape of the Llama 3 and Gemma templates on the Hub.
LLAMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set ns = namespace(first=true) %}{% set roles = {'user': 'user', 'assistant': 'model', 'system': 'user'} %}"
    "{% for message in messages %}{% set role = roles[message['role']] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% set ns.first = false %}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _bert_with(tmp_path: Path, chat_template=None, files: dict[str, str] | None = None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-bert", folder)
    if chat_template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _check(folder: Path):
    result = CliRunner().invoke(main, ["check", str(folder), "--format", "json", "--no-cache", "--device", "cpu",
                                       "--detectors", "static"])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("shape", ["subclasses", "cycler"])
def test_cve_payload_is_flagged_and_never_rendered(shape, tmp_path):
    marker = tmp_path / "RENDERED"
    folder = _bert_with(tmp_path, _cve_payloads(marker)[shape])
    code, report = _check(folder)
    assert code == 1 and report["verdict"] == "backdoored" and report["severity"] == "high"
    finding = next(f for f in report["detectors"][0]["findings"] if f["rule_id"] == "LMS005")
    assert finding["severity"] == "high" and finding["evidence"]["file"] == "tokenizer_config.json"
    expressions = [e["expression"] for e in finding["evidence"]["expressions"]]
    assert any("popen" in e for e in expressions)
    if shape == "cycler":
        assert expressions[0].startswith("cycler.__init__.__globals__.os.popen(")
        assert finding["evidence"]["expressions"][0]["gadget"] == "cycler"
    else:
        assert expressions[0] == "().__class__.__base__.__subclasses__()"
    assert not marker.exists()


def test_template_files_and_named_lists_are_checked(tmp_path):
    marker = tmp_path / "RENDERED"
    payload = _cve_payloads(marker)["cycler"]
    folder = _bert_with(tmp_path, [{"name": "default", "template": LLAMA_STYLE}, {"name": "tool_use", "template": payload}],
                        files={"chat_template.jinja": payload,
                               "chat_template.json": json.dumps({"chat_template": payload}),
                               "additional_chat_templates/rag.jinja": payload})
    found, findings = chat_template_findings(folder)
    assert sorted(found) == sorted(["tokenizer_config.json:default", "tokenizer_config.json:tool_use",
                                    "chat_template.json:default", "chat_template.jinja:default",
                                    "additional_chat_templates/rag.jinja:rag"])
    flagged = sorted((f.evidence["file"], f.evidence["template"]) for f in findings if f.rule_id == "LMS005")
    assert flagged == sorted([("tokenizer_config.json", "tool_use"), ("chat_template.json", "default"),
                              ("chat_template.jinja", "default"), ("additional_chat_templates/rag.jinja", "rag")])
    assert not marker.exists()


@pytest.mark.parametrize("template", [LLAMA_STYLE, GEMMA_STYLE], ids=["llama", "gemma"])
def test_real_style_templates_raise_nothing(template, tmp_path):
    assert check_template(template) == []
    code, report = _check(_bert_with(tmp_path, template))
    assert not report["detectors"][0]["findings"] and report["verdict"] != "backdoored"
    assert report["detectors"][0]["stats"]["chat_templates"] == ["tokenizer_config.json:default"]


@pytest.mark.parametrize("text, expected", [
    ("{{ ()|attr('__class__') }}", "__class__"),
    ("{{ self._TemplateReference__context }}", "_TemplateReference__context"),
    ("{{ joiner.__init__.__globals__['os'] }}", "__init__"),
    ("{{ lipsum.__globals__ }}", "__globals__"),
    ("{{ x.subprocess.run('id') }}", "subprocess"),
    ("{{ eval('1+1') }}", "eval"),
])
def test_escape_shapes(text, expected):
    hits = check_template(text)
    assert hits and expected in hits[0].why


def test_own_variables_are_not_modules():
    assert check_template("{% set system = messages[0]['content'] %}{{ system }}{{ roles['system'] }}") == []


def test_unparsable_template_is_information(tmp_path):
    folder = _bert_with(tmp_path, "{% for message in messages %}{{ message['content'] }")
    found, findings = chat_template_findings(folder)
    assert [f.rule_id for f in findings] == ["LMS006"] and "does not parse" in findings[0].message
    _, findings = chat_template_findings(_bert_with(tmp_path / "b", {"not": "a template"}))
    assert [f.rule_id for f in findings] == ["LMS006"]


def test_chat_templates_are_computation_files(tmp_path):
    folder = _bert_with(tmp_path, files={"chat_template.jinja": LLAMA_STYLE,
                                         "additional_chat_templates/rag.jinja": GEMMA_STYLE})
    resolved = resolve_model(str(folder))
    assert {"chat_template.jinja", "additional_chat_templates/rag.jinja"} <= set(resolved.file_sha256)
    before = resolved.folder_sha256
    (folder / "chat_template.jinja").write_text(LLAMA_STYLE + " ")
    assert resolve_model(str(folder)).folder_sha256 != before
