"""Detector `files`: every weight-like file in the checkpoint folder is accounted for.

lmscan loads one copy of the weights (safetensors first). Other weight files in the
folder are what another tool may load later — transformers falls back to
pytorch_model.bin, a training script may torch.load a .ckpt — so each is reported:
a pickle that imports anything beyond plain tensors carries code (LMS003; found by
the static opcode pass, nothing runs), any other unloaded file is named (LMS004).
It always runs first and can only flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmscan.detectors.base import Detector, ScanContext
from lmscan.findings import DetectorRun, Finding

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
    stats = {"loaded": list(resolved.weight_sha256), "other_files": sorted(resolved.file_sha256),
             "unloaded": resolved.unloaded}
    return DetectorRun(NAME, "ok", time.perf_counter() - started, ["files"], stats, findings)


class CheckpointFiles(Detector):
    name = NAME
    Config = FilesConfig
    rule_ids = ("LMS003", "LMS004")
    can_clear = False
    sites = ()
    summary = "weight files in the folder that lmscan did not load, with a static opcode pass on pickles (always runs)"

    def run(self, ctx: ScanContext) -> DetectorRun:
        return run_files(ctx.loaded.resolved)
