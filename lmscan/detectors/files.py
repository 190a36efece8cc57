"""Detector `files`: every weight-like file in the checkpoint folder is accounted for.

lmscan loads one copy of the weights (safetensors first). Other weight files in the
folder are what another tool may load later — transformers falls back to
pytorch_model.bin, a training script may torch.load a .ckpt — so each is reported:
a pickle that imports anything beyond plain tensors carries code (LMS003; found by
the static opcode pass, nothing runs), any other unloaded file is named (LMS004).
Chat templates (tokenizer_config.json, chat_template.jinja/.json) are parsed, never
rendered: an expression that reaches Python internals or the operating system is
LMS005, a template that does not parse is LMS006 (lmscan.models.chat_template).
It always runs first and can only flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmscan.detectors.base import Detector, ScanContext
from lmscan.findings import DetectorRun, Finding
from lmscan.models.chat_template import check_template, find_templates

NAME = "files"


@dataclass(frozen=True)
class FilesConfig:
    pass


def run_files(resolved) -> DetectorRun:
    started = time.perf_counter()
    findings = []
    loaded = ", ".join(resolved.weight_sha256) or "the weights"
    for name, entry in resolved.unloaded.items():
        if entry.get("code"):
            findings.append(Finding(
                detector=NAME, rule_id="LMS003", site=None,
                message=(f"{name} is a pickle that carries code ({entry['detail']}); lmscan did not run it, but "
                         "transformers or torch.load may"),
                evidence={"file": name, "detail": entry["detail"]},
            ))
        else:
            what = "plain tensors" if entry.get("scanned") and "plain" in entry.get("detail", "") else (
                entry.get("detail") or f"a {entry.get('kind')} file lmscan does not read")
            findings.append(Finding(
                detector=NAME, rule_id="LMS004", site=None,
                message=(f"{name} ({what}) was not scanned: lmscan assessed {loaded}; a tool that loads "
                         f"{name} instead runs weights nobody checked"),
                evidence={"file": name, "kind": entry.get("kind"), "detail": entry.get("detail", "")},
            ))
    templates, template_findings = chat_template_findings(resolved.local_dir)
    findings.extend(template_findings)
    stats = {"loaded": list(resolved.weight_sha256), "other_files": sorted(resolved.file_sha256),
             "unloaded": resolved.unloaded, "chat_templates": templates}
    return DetectorRun(NAME, "ok", time.perf_counter() - started, ["files"], stats, findings)


def chat_template_findings(model_dir) -> tuple[list[str], list[Finding]]:
    """The chat templates found ("file:name") and a finding per template that escapes or does not parse."""
    from jinja2 import TemplateSyntaxError  # noqa: PLC0415

    sources, malformed = find_templates(model_dir)
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
    rule_ids = ("LMS003", "LMS004", "LMS005", "LMS006")
    can_clear = False
    sites = ()
    summary = ("weight files in the folder that lmscan did not load, with a static opcode pass on pickles, and chat "
               "templates parsed (never rendered) for code escapes (always runs)")

    def run(self, ctx: ScanContext) -> DetectorRun:
        return run_files(ctx.loaded.resolved)
