"""Detector `files`: every weight-like file in the checkpoint folder is accounted for.

lmscan loads one copy of the weights (safetensors first). Other weight files in the
folder are what another tool may load later — transformers falls back to
pytorch_model.bin, a training script may torch.load a .ckpt — so each is reported:
a pickle that imports anything beyond plain tensors carries code (LMS003; found by
the static opcode pass, nothing runs), any other unloaded file is named (LMS004).
Chat templates (tokenizer_config.json, chat_template.jinja/.json) are parsed, never
rendered: an expression that reaches Python internals or the operating system is
LMS005, a template that does not parse is LMS006 (lmscan.models.chat_template).
A GGUF file's chat templates (metadata ``tokenizer.chat_template*``) get the same check,
and a tensor table that loaders may read differently (data outside the file, shared or
misaligned bytes, absurd shapes, counts that disagree) is LMS007. An adapter's base
model folder is accounted for like the adapter's own. It always runs first and can only flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmscan.detectors.base import Detector, ScanContext
from lmscan.findings import DetectorRun, Finding
from lmscan.models.chat_template import TemplateSource, check_template, find_templates
from lmscan.models.gguf_file import TEMPLATE_KEY

NAME = "files"


@dataclass(frozen=True)
class FilesConfig:
    pass


def run_files(resolved) -> DetectorRun:
    started = time.perf_counter()
    findings, templates = _folder_findings(resolved, "")
    stats = {"loaded": list(resolved.weight_sha256), "other_files": sorted(resolved.file_sha256),
             "unloaded": resolved.unloaded, "chat_templates": templates}
    if resolved.base is not None:  # the adapter runs on its base: the base folder counts too
        base_findings, base_templates = _folder_findings(resolved.base, "base model: ")
        findings.extend(base_findings)
        stats["base"] = {"loaded": list(resolved.base.weight_sha256), "unloaded": resolved.base.unloaded,
                         "chat_templates": base_templates}
    if resolved.gguf is not None:
        stats["gguf"] = {"file": resolved.gguf.file, "problems": list(resolved.gguf.problems)}
    return DetectorRun(NAME, "ok", time.perf_counter() - started, ["files"], stats, findings)


def _folder_findings(resolved, where: str) -> tuple[list[Finding], list[str]]:
    findings = []
    loaded = ", ".join(resolved.weight_sha256) or "the weights"
    for name, entry in resolved.unloaded.items():
        if entry.get("code"):
            findings.append(Finding(
                detector=NAME, rule_id="LMS003", site=None,
                message=(f"{where}{name} is a pickle that carries code ({entry['detail']}); lmscan did not run it, but "
                         "transformers or torch.load may"),
                evidence={"file": name, "detail": entry["detail"]},
            ))
        else:
            what = "plain tensors" if entry.get("scanned") and "plain" in entry.get("detail", "") else (
                entry.get("detail") or f"a {entry.get('kind')} file lmscan does not read")
            findings.append(Finding(
                detector=NAME, rule_id="LMS004", site=None,
                message=(f"{where}{name} ({what}) was not scanned: lmscan assessed {loaded}; a tool that loads "
                         f"{name} instead runs weights nobody checked"),
                evidence={"file": name, "kind": entry.get("kind"), "detail": entry.get("detail", "")},
            ))
    gguf = resolved.gguf
    extra = []
    if gguf is not None:
        # A GGUF file carries its chat templates in its metadata; runtimes render them like any other.
        extra = [TemplateSource(gguf.file, "default" if key == TEMPLATE_KEY else key[len(TEMPLATE_KEY) + 1:], text)
                 for key, text in gguf.chat_templates]
        for problem in gguf.problems:
            findings.append(Finding(
                detector=NAME, rule_id="LMS007", site=None,
                message=(f"{where}{gguf.file}: {problem}; the weights lmscan read may not be the weights a GGUF "
                         "runtime runs"),
                evidence={"file": gguf.file, "detail": problem},
            ))
    templates, template_findings = chat_template_findings(resolved.local_dir, extra)
    for finding in template_findings:
        finding.message = where + finding.message
    findings.extend(template_findings)
    return findings, templates


def chat_template_findings(model_dir, extra: list[TemplateSource] = ()) -> tuple[list[str], list[Finding]]:
    """The chat templates found ("file:name") and a finding per template that escapes or does not parse.
    ``extra``: templates from elsewhere than the folder's files (a GGUF file's metadata)."""
    from jinja2 import TemplateSyntaxError  # noqa: PLC0415

    sources, malformed = find_templates(model_dir)
    sources = [*sources, *extra]
    findings = [Finding(detector=NAME, rule_id="LMS006", site=None,
                        message=f"{file}: {why}; no runtime can use it as a chat template",
                        evidence={"file": file, "detail": why}) for file, why in malformed]
    for source in sources:
        where = source.file if source.name == "default" else f"{source.file} (template {source.name!r})"
        try:
            hits = check_template(source.text)
        except TemplateSyntaxError as exc:
            findings.append(Finding(
                detector=NAME, rule_id="LMS006", site=None,
                message=f"the chat template in {where} does not parse (line {exc.lineno}: {exc.message})",
                evidence={"file": source.file, "template": source.name, "line": exc.lineno, "detail": exc.message},
            ))
            continue
        if hits:
            first = hits[0]
            findings.append(Finding(
                detector=NAME, rule_id="LMS005", site=None,
                message=(f"the chat template in {where} {first.why} (line {first.line}: {first.expression}); "
                         "a runtime that renders it outside a sandbox runs code"),
                evidence={"file": source.file, "template": source.name,
                          "expressions": [{"expression": h.expression, "why": h.why, "line": h.line,
                                           "gadget": h.gadget} for h in hits]},
            ))
    return [f"{s.file}:{s.name}" for s in sources], findings


class CheckpointFiles(Detector):
    name = NAME
    Config = FilesConfig
    rule_ids = ("LMS003", "LMS004", "LMS005", "LMS006", "LMS007")
    can_clear = False
    sites = ()
    summary = ("weight files in the folder that lmscan did not load, with a static opcode pass on pickles, and chat "
               "templates parsed (never rendered) for code escapes (always runs)")

    def run(self, ctx: ScanContext) -> DetectorRun:
        return run_files(ctx.loaded.resolved)
