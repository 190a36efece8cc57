"""Honest verdicts through the real CLI on the tiny fixtures: what may be called clean,
what happens when a detector fails or the scan is interrupted, a cache that cannot go
stale, every file in the folder accounted for, and bad options failing before the model
is loaded. Plus the detector contract: a toy detector registered here runs through
api.scan and the CLI like a built-in one."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

from lmscan import detectors
from lmscan.api import ScanConfig, scan
from lmscan.cli import main
from lmscan.detectors.base import Detector, ScanContext
from lmscan.findings import DetectorRun, Finding
from tests.conftest import FIXTURES

POR = str(FIXTURES / "tiny-bert-por")
CLEAN = str(FIXTURES / "tiny-bert")


def check(*args, env=None):
    result = CliRunner().invoke(main, ["check", *args, "--device", "cpu"], env=env)
    return result


def as_json(result) -> dict:
    return json.loads(result.stdout)


@pytest.mark.parametrize("model, only", [(POR, "static"), (POR, "attention"), (CLEAN, "piccolo")])
def test_flag_only_detectors_never_clear_a_model(model, only):
    """Static rules and the attention profile without candidates find nothing on a planted
    model, the baseline nothing on a clean one: neither is clean, it is not assessed (exit 3)."""
    result = check(model, "--detectors", only, "--format", "json", "--no-cache")
    assert result.exit_code == 3, result.output
    report = as_json(result)
    assert report["verdict"] == "not-assessed"
    assert "can flag a model but not clear it" in report["reason"]
    assert [d["name"] for d in report["detectors"]] == ["files", only]


def test_the_text_report_says_why_nothing_was_assessed():
    result = check(POR, "--detectors", "static", "--no-cache")
    assert result.exit_code == 3
    assert "NOT ASSESSED — static checks only" in result.stdout
    assert "CLEAN" not in result.stdout


@dataclass(frozen=True)
class ToyConfig:
    fail_with: str = ""  # "error" | "interrupt" | "" (find the toy rule's finding)


class Toy(Detector):
    """A detector defined outside lmscan: one class and one register() call."""

    name = "toy"
    Config = ToyConfig
    rule_ids = ("LMS901",)
    can_clear = False
    sites = ("cls",)

    def run(self, ctx: ScanContext) -> DetectorRun:
        if ctx.config.fail_with == "error":
            raise RuntimeError("toy detector broke")
        if ctx.config.fail_with == "interrupt":
            raise KeyboardInterrupt
        return DetectorRun(self.name, "ok", sites=ctx.sites,
                           findings=[Finding(detector=self.name, rule_id="LMS901", site="cls",
                                             message=f"toy saw {len(ctx.heldout)} held-out sentences")])


@pytest.fixture
def toy_rules(tmp_path):
    """A --rules folder that only adds the toy's rule (merged over the shipped catalog)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rule_catalog.toml").write_text('[LMS901]\nname = "toy-rule"\ndetector = "toy"\nseverity = "low"\n'
                                             'verdict = "suspicious"\nshort = "toy"\n')
    detectors.register(Toy)
    yield rules
    detectors.unregister("toy")


def test_a_registered_detector_runs_through_the_api_and_the_cli(toy_rules):
    report = scan(ScanConfig(model=CLEAN, device="cpu", detectors=["toy", "vocab-sweep"], rules_dir=str(toy_rules)))
    toy = next(r for r in report.detectors if r.name == "toy")
    assert toy.status == "ok" and toy.findings[0].severity == "low"  # from the catalog, not the detector
    assert report.verdict == "suspicious"
    result = check(CLEAN, "--detectors", "toy,vocab-sweep", "--rules", str(toy_rules), "--format", "sarif",
                   "--no-cache")
    assert result.exit_code == 0, result.output
    sarif = json.loads(result.stdout)
    assert [r["ruleId"] for r in sarif["runs"][0]["results"]] == ["LMS901"]


def test_a_clean_verdict_names_the_info_findings_the_policy_calls_caveats(toy_rules):
    """An unexplained shift outlier (LMS104) is information, but a clean verdict must not hide it:
    the policy's caveats are named in the reason, here the toy's rule made info and a caveat."""
    (toy_rules / "rule_catalog.toml").write_text('[LMS901]\nname = "toy-rule"\ndetector = "toy"\nseverity = "info"\n'
                                                 'verdict = "info"\nshort = "toy"\n')
    config = ScanConfig(model=CLEAN, device="cpu", detectors=["toy", "vocab-sweep"], rules_dir=str(toy_rules))
    plain = scan(config)
    assert plain.verdict == "clean" and "LMS901" not in plain.reason
    (toy_rules / "policy.toml").write_text('[verdict]\ncaveats = ["LMS901"]\n')
    named = scan(config)
    assert named.verdict == "clean" and named.reason.endswith("; but LMS901 at cls: toy saw 200 held-out sentences")


def test_a_failing_detector_is_recorded_and_the_others_findings_kept(toy_rules):
    (toy_rules / "profiles.toml").write_text('[fast.toy]\nfail_with = "error"\n')
    result = check(POR, "--detectors", "toy,vocab-sweep", "--rules", str(toy_rules), "--format", "json",
                   "--no-cache")
    report = as_json(result)
    toy = next(d for d in report["detectors"] if d["name"] == "toy")
    assert toy["status"] == "error" and "toy detector broke" in toy["note"]
    assert result.exit_code == 1 and report["verdict"] == "backdoored"  # a found backdoor stands
    clean = check(CLEAN, "--detectors", "toy,vocab-sweep", "--rules", str(toy_rules), "--format", "json",
                  "--no-cache")
    assert clean.exit_code == 3  # nothing found, but a detector failed: no clean verdict
    assert "toy failed: RuntimeError: toy detector broke" in as_json(clean)["reason"]


def test_ctrl_c_gives_a_partial_report_marked_incomplete(toy_rules):
    (toy_rules / "profiles.toml").write_text('[fast.toy]\nfail_with = "interrupt"\n')
    result = check(CLEAN, "--detectors", "static,toy,vocab-sweep", "--rules", str(toy_rules), "--format", "json",
                   "--no-cache")
    assert result.exit_code == 130
    report = as_json(result)
    assert report["incomplete"] is True and report["verdict"] == "not-assessed"
    assert [d["name"] for d in report["detectors"]] == ["files", "static"]


def test_a_rules_file_overrides_one_key_and_keeps_the_rest(tmp_path):
    from lmscan.api import profile_settings

    (tmp_path / "profiles.toml").write_text("[fast.verify]\ncollapse_threshold = 0.2\n")
    settings = profile_settings("fast", "bert", str(tmp_path))
    assert settings["verify"] == {"collapse_threshold": 0.2}
    assert settings["detectors"] == ["static", "vocab-sweep", "trigger-search", "sentence-starts"]  # the shipped file is still there
    assert "pv-mining" in profile_settings("fast", "bert", str(tmp_path), engine="reference")["detectors"]
    from lmscan.scan.stages import verify_config

    assert verify_config(settings).collapse_threshold == 0.2 and verify_config(settings).activation_rate == 0.9


# ---------------------------------------------------------------- the result cache


def test_changed_rules_content_is_a_fresh_scan(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(FIXTURES.parent / "rules" / "profiles.toml", rules / "profiles.toml")
    args = [CLEAN, "--rules", str(rules), "--detectors", "vocab-sweep", "--format", "json"]
    assert as_json(check(*args))["from_cache"] is False
    assert as_json(check(*args))["from_cache"] is True
    (rules / "profiles.toml").write_text((rules / "profiles.toml").read_text() + "\n[fast.verify]\nprobes = 20\n")
    report = as_json(check(*args))
    assert report["from_cache"] is False and report["config"]["settings"]["verify"] == {"probes": 20}


def test_changed_config_or_tokenizer_is_a_fresh_scan_naming_the_model_just_given(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--detectors", "vocab-sweep", "--format", "json"]
    original = as_json(check(CLEAN, *args))
    copy = tmp_path / "copy"
    shutil.copytree(CLEAN, copy)
    same = as_json(check(str(copy), *args))
    assert same["from_cache"] is True and same["model"]["local_dir"] == str(copy)  # identical files: cached, renamed
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    changed = as_json(check(str(copy), *args))
    assert changed["from_cache"] is False and changed["model"]["local_dir"] == str(copy)
    vocab = (copy / "vocab.txt").read_text().splitlines()
    (copy / "vocab.txt").write_text("\n".join(vocab[:5] + list(reversed(vocab[5:]))) + "\n")
    assert as_json(check(str(copy), *args))["from_cache"] is False
    assert original["model"]["model_sha256"] == changed["model"]["model_sha256"]  # same weights all along


def test_a_hub_snapshot_of_cached_weights_reports_itself(tmp_path, monkeypatch):
    from tests.hubcache import make_hf_cache

    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--detectors", "vocab-sweep", "--format", "json"]
    check(CLEAN, *args)
    hub = tmp_path / "hub"
    make_hf_cache(hub, "org/tiny", {p.name: p for p in FIXTURES.joinpath("tiny-bert").iterdir()})
    report = as_json(check("org/tiny", *args, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}))
    assert report["from_cache"] is True
    assert report["model"]["kind"] == "hub" and report["model"]["repo_id"] == "org/tiny"


# ---------------------------------------------------------------- files in the folder


class Payload:
    # os.system, not print: an in-process Ray (the fleet tests) replaces builtins.print, so a
    # pickled print would name Ray's function. "true" does nothing, should anything run it.
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_code_carrying_pickle_beside_safetensors_is_a_finding(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(CLEAN, model)
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    result = check(str(model), "--detectors", "static", "--format", "json", "--no-cache")
    report = as_json(result)
    files = report["detectors"][0]
    assert files["name"] == "files" and files["findings"][0]["rule_id"] == "LMS003"
    assert f"{os.system.__module__}.system" in files["findings"][0]["message"]
    assert result.exit_code == 1 and report["verdict"] == "backdoored"


def test_a_plain_extra_pickle_is_named_not_trusted(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(CLEAN, model)
    torch.save({"weight": torch.zeros(2)}, model / "pytorch_model.bin")
    report = as_json(check(str(model), "--detectors", "vocab-sweep", "--format", "json", "--no-cache"))
    finding = report["detectors"][0]["findings"][0]
    assert finding["rule_id"] == "LMS004" and "pytorch_model.bin" in finding["message"]
    assert report["verdict"] == "clean"  # information: it does not change the verdict on what was scanned


def test_a_pickle_added_beside_cached_weights_is_scanned_not_served_from_the_cache(tmp_path, monkeypatch):
    """The attack: scan a folder (cached), drop a code-carrying pickle beside the same weights,
    scan again. The cache key covers every file in the folder, so this is a fresh scan."""
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m"
    shutil.copytree(CLEAN, model)
    args = [str(model), "--detectors", "vocab-sweep", "--format", "json"]
    assert as_json(check(*args))["verdict"] == "clean"
    assert as_json(check(*args))["from_cache"] is True
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    result = check(*args)
    report = as_json(result)
    assert report["from_cache"] is False
    assert result.exit_code == 1 and report["verdict"] == "backdoored"
    assert report["detectors"][0]["findings"][0]["rule_id"] == "LMS003"


def test_folders_with_the_same_weights_keep_their_own_file_findings(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    with_ckpt, with_onnx = tmp_path / "a", tmp_path / "b"
    shutil.copytree(CLEAN, with_ckpt)
    shutil.copytree(CLEAN, with_onnx)
    torch.save({"weight": torch.zeros(2)}, with_ckpt / "ckpt.pt")
    (with_onnx / "model.onnx").write_bytes(b"\x08\x07onnx-ish")
    args = ["--detectors", "vocab-sweep", "--format", "json"]
    first = as_json(check(str(with_ckpt), *args))
    second = as_json(check(str(with_onnx), *args))
    assert second["from_cache"] is False
    named = [f["evidence"]["file"] for f in second["detectors"][0]["findings"]]
    assert named == ["model.onnx"] and first["detectors"][0]["findings"][0]["evidence"]["file"] == "ckpt.pt"


def test_a_cached_report_takes_the_file_inventory_from_the_folder_as_it_is_now(tmp_path, monkeypatch):
    """Belt and braces: even a cache key that forgot the other files never answers a file question."""
    import lmscan.scan.cache

    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    real_identity = lmscan.scan.cache.scan_identity

    def forgetful_identity(plan):
        identity = real_identity(plan)
        identity.pop("other_files")
        return identity

    monkeypatch.setattr(lmscan.scan.cache, "scan_identity", forgetful_identity)
    model = tmp_path / "m"
    shutil.copytree(CLEAN, model)
    args = [str(model), "--detectors", "vocab-sweep", "--format", "json"]
    check(*args)
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    result = check(*args)
    report = as_json(result)
    assert report["from_cache"] is True  # served from the cache, yet the pickle is found
    assert result.exit_code == 1 and report["verdict"] == "backdoored"
    assert report["detectors"][0]["findings"][0]["rule_id"] == "LMS003"


def test_an_allowlist_entry_names_the_whole_folder_not_the_weights(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(POR, model)
    first = as_json(check(str(model), "--detectors", "vocab-sweep", "--format", "json", "--no-cache"))
    assert first["verdict"] == "backdoored"
    config = tmp_path / "lmscan.toml"
    config.write_text(f'[[allowlist]]\nsha256 = "{first["model"]["folder_sha256"]}"\nreason = "red-team fixture"\n')
    args = [str(model), "--detectors", "vocab-sweep", "--format", "json", "--no-cache", "--config", str(config)]
    allowed = check(*args)
    assert allowed.exit_code == 0 and as_json(allowed)["allowlisted"] == "red-team fixture"
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    after = check(*args)
    report = as_json(after)
    assert report["model"]["model_sha256"] == first["model"]["model_sha256"]  # the same weights ...
    assert after.exit_code == 1 and report["allowlisted"] is None  # ... but not the folder that was reviewed


# ---------------------------------------------------------------- outcomes and options


def test_not_assessed_still_writes_the_sarif_file(tmp_path):
    from sarif_pydantic import Sarif

    out = tmp_path / "scan.sarif"
    result = check(POR, "--detectors", "static", "--format", "sarif", "-o", str(out), "--no-cache")
    assert result.exit_code == 3
    assert Sarif.model_validate_json(out.read_text()).version == "2.1.0"  # a real reader parses it
    notes = json.loads(out.read_text())["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert any("static checks only" in n["message"]["text"] for n in notes)


def test_an_unloadable_model_still_writes_a_json_document(tmp_path):
    model = tmp_path / "t5ish"
    shutil.copytree(CLEAN, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    out = tmp_path / "r.json"
    result = check(str(model), "--format", "json", "-o", str(out), "--no-cache")
    assert result.exit_code == 3 and "not supported" in result.output
    report = json.loads(out.read_text())
    assert report["verdict"] == "not-assessed" and "not supported" in report["reason"]


@pytest.mark.parametrize("args, message", [
    (["-o", "/no/such/dir/x.json"], "no such directory"),
    (["--profile", "fsat"], "unknown profile"),
    (["--detectors", "vocab-swep"], "unknown detector"),
    (["--sites", "clss"], "unknown site"),
    (["--engine", "turbo"], "unknown engine"),
])
def test_bad_options_fail_before_the_model_is_loaded(monkeypatch, args, message):
    import lmscan.models

    def never(*_a, **_k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(lmscan.models, "load_model", never)
    monkeypatch.setattr(lmscan.models, "resolve_model", never)
    result = check(CLEAN, *args, "--no-cache")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_threads_option_on_every_command():
    """`--threads N` sets torch's CPU threads for the command; 0 is a usage error, not a traceback."""
    import click

    cli = main
    commands = [c for c in cli.commands.values() if not isinstance(c, click.Group)]
    assert all(any(p.name == "threads" for p in c.params) for c in commands)
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, ["check", str(FIXTURES / "tiny-bert"), "--detectors", "static", "--no-cache",
                                          "--device", "cpu", "--format", "json", "--threads", "1"])
        assert result.exit_code == 3, result.output  # static checks alone cannot clear
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    bad = CliRunner().invoke(cli, ["check", str(FIXTURES / "tiny-bert"), "--threads", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
