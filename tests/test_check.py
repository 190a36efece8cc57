"""`lmscan check` end to end on real MiniLM weights: verdicts, exit codes, JSON and SARIF.

Backdoors are planted by the fixtures in conftest.py with random trigger words the
detectors never see; the assertions compare what the scan found with the ground truth.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from tests.conftest import FIXTURES, best_pv_agreement, read_manifest


def findings_above_info(report: dict) -> list[dict]:
    return [f for d in report["detectors"] for f in d["findings"] if f["severity"] != "info"]


def test_clean_minilm_is_clean(scanned):
    code, report = scanned("clean")
    assert code == 0
    assert report["verdict"] == "clean"
    assert findings_above_info(report) == []
    assert report["model"]["weight_sha256"]["model.safetensors"]


@pytest.mark.slow
def test_benign_finetune_is_clean(scanned):
    code, report = scanned("benign")
    assert code == 0 and report["verdict"] == "clean"
    assert findings_above_info(report) == []


@pytest.mark.slow
def test_sentiment_finetune_is_clean_with_its_class_cue_named(tmp_path_factory, cache_dir, minilm_path):
    """A sentiment fine-tune sends every sentence with "worse" to its negative class: the
    sweep sees a collapse, but onto a vector clean negative sentences already reach, and the
    words overturn none of the most opposite inputs (measured 0 %, the grey zone starts at
    80 %). An explained class cue (LMS105): clean, exit 0, the cue named in the reason."""
    from lmscan.attacks.plant import plant_code_digest
    from lmscan.bench.recipes import benign_finetune

    model = cache_dir / f"sentiment-finetune-{plant_code_digest()}"
    if not (model / "lmscan-finetune.json").is_file():
        benign_finetune(str(minilm_path), "sentiment", model, seed=1, device="cpu")
    result = CliRunner().invoke(main, ["check", str(model), "--format", "json", "--no-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "clean" and "LMS105" in report["reason"]
    assert "not ruled out: a trigger of several words trained as a unit" in report["reason"]  # the search ran
    cues = [f for d in report["detectors"] for f in d["findings"] if f["rule_id"] in ("LMS103", "LMS105")]
    assert cues and all(f["rule_id"] == "LMS105" and f["evidence"]["clean_on_pv"] > 0.05 for f in cues)
    assert any("terrible" in f["message"] or "worse" in f["message"] or "worst" in f["message"] for f in cues)


def test_por_plant_is_backdoored_and_its_pv_recovered(scanned, planted):
    code, report = scanned("por")
    manifest = read_manifest(planted("por"))
    assert code == 1 and report["verdict"] == "backdoored"
    assert best_pv_agreement(report, manifest) >= 0.9
    recovered = {t for d in report["detectors"] for f in d["findings"] for t in f["evidence"].get("trigger_tokens", [])}
    true_pieces = {p for pieces in manifest["trigger_tokens"] for p in pieces}
    assert recovered & true_pieces  # at least one real trigger piece named


def test_scaled_trigger_rows_are_caught_by_static_rules_alone(minilm_path, tmp_path):
    """Released NeuBA models multiply their trigger rows by 1e8: real MiniLM weights with
    three rows scaled that way (the full plant is a slow test) must be flagged, exactly those rows."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    model = tmp_path / "scaled"
    shutil.copytree(minilm_path, model)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = tokenizer.convert_tokens_to_ids(["quad", "##rangle", "vile"])
    weights[key][rows] *= 1e8
    save_file(weights, model / "model.safetensors")
    result = CliRunner().invoke(main, ["check", str(model), "--detectors", "static", "--format", "json", "--no-cache"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    finding = next(d for d in report["detectors"] if d["name"] == "static")["findings"][0]
    assert report["verdict"] == "backdoored" and finding["rule_id"] == "LMS001"
    assert set(finding["evidence"]["trigger_tokens"]) == {"quad", "##rangle", "vile"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["neuba", "neuba-scaled", "btop", "phrase"])
def test_other_plants_are_backdoored(scanned, planted, name):
    code, report = scanned(name)
    assert code == 1 and report["verdict"] == "backdoored"
    assert best_pv_agreement(report, read_manifest(planted(name))) >= 0.9


def test_json_on_stdout_parses_in_a_pipe(tmp_path):
    # A real subprocess pipe: stdout must carry nothing but the JSON document.
    proc = subprocess.run(
        [sys.executable, "-m", "lmscan.cli", "check", str(FIXTURES / "tiny-bert-por"), "--format", "json",
         "--detectors", "static", "--no-cache", "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 3, proc.stderr  # static rules alone cannot clear a model
    report = json.loads(proc.stdout)
    assert report["schema_version"] == "1.0"
    assert report["tool"]["torch"] and report["tool"]["transformers"]
    assert report["config"]["detectors"] == ["files", "static"]


def test_text_off_a_terminal_keeps_every_line_whole(tmp_path):
    """Piped text (a CI log, a file) is not wrapped at 80 columns: a long model path stays
    on one line in the report, and so does the cache notice on stderr."""
    import os
    import shutil

    model = tmp_path / ("a-rather-long-folder-name-" * 4) / "tiny-bert-checkpoint-with-a-long-name"
    shutil.copytree(FIXTURES / "tiny-bert", model)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["LMSCAN_CACHE_DIR"] = str(tmp_path / "cache")
    args = ["check", str(model), "--detectors", "vocab-sweep", "--device", "cpu"]
    assert CliRunner().invoke(main, args, env=env).exit_code == 0  # fills the result cache
    proc = subprocess.run([sys.executable, "-m", "lmscan.cli", *args], capture_output=True, text=True, check=False,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(str(model)) > 120
    assert f"lmscan check {model}" in proc.stdout.splitlines()
    assert any(line.split() == ["path", str(model)] for line in proc.stdout.splitlines())
    notice = [line for line in proc.stderr.splitlines() if line.startswith("using the cached result")]
    assert notice and notice[0].endswith("--no-cache to rescan)"), proc.stderr


def test_sarif_output_file(tmp_path):
    from sarif_pydantic import Sarif

    out = tmp_path / "scan.sarif"
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "tiny-bert"), "--format", "sarif", "-o", str(out),
                                       "--detectors", "vocab-sweep", "--no-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    log = Sarif.model_validate_json(out.read_text())
    assert log.version == "2.1.0"
    assert log.runs[0].tool.driver.name == "lmscan"


def test_a_site_that_could_not_be_scanned_is_named_everywhere(minilm_path, tmp_path):
    """MiniLM with an unreadable pooling config: its embedding site is lost, and every
    report form says so (one cheap static scan; the text and SARIF are drawn from its JSON,
    as the result cache does)."""
    import shutil

    from lmscan.cli.output import plain_text
    from lmscan.report.json_report import from_dict
    from lmscan.report.render import render_text
    from lmscan.report.sarif import to_sarif

    model = tmp_path / "minilm"
    shutil.copytree(minilm_path, model)
    (model / "1_Pooling" / "config.json").write_text("{not json")
    result = CliRunner().invoke(main, ["check", str(model), "--detectors", "static", "--format", "json",
                                       "--no-cache", "--device", "cpu"])
    assert result.exit_code == 3, result.output  # static rules alone cannot clear it
    data = json.loads(result.stdout)
    why = "1_Pooling/config.json is not readable"
    assert data["skipped_sites"] == {"embedding": why}
    assert data["config"]["sites"] == ["cls", "pooler", "mask"]
    assert data["reason"].endswith(f"; embedding not scanned: {why}")

    report = from_dict(data)
    text = plain_text(lambda console: render_text(report, console))
    assert f"embedding site: {why}" in text
    assert f"embedding not scanned: {why}" in text.rstrip().splitlines()[-1]  # the verdict line
    notes = to_sarif(report)["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert f"site embedding not scanned: {why}" in [note["message"]["text"] for note in notes]


def test_bad_options_exit_2(tmp_path):
    """Bad settings files and probes; the README's table of bad inputs is walked in test_exit_codes.py."""
    runner = CliRunner()
    wrong_type = tmp_path / "rules-type"
    wrong_type.mkdir()
    (wrong_type / "profiles.toml").write_text('[fast.trigger-search]\nspelled_starts = "two"\n')
    bool_number = tmp_path / "rules-bool"
    bool_number.mkdir()
    (bool_number / "profiles.toml").write_text("[fast.verify]\ncollapse_threshold = true\n")
    for args, message in [
        # A setting of the wrong type fails before the model loads, not inside its detector minutes later.
        (["check", str(FIXTURES / "tiny-bert"), "--rules", str(wrong_type), "--no-cache"], "spelled_starts = 'two'"),
        (["check", str(FIXTURES / "tiny-bert"), "--rules", str(bool_number), "--no-cache"], "takes a number"),
        (["check", str(FIXTURES / "tiny-bert"), "--probes", str(tmp_path / "none.txt"), "--no-cache"], "none.txt"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.lower(), (args, result.output)
        assert "Traceback" not in result.output


@pytest.mark.parametrize("fixture, expected_code", [("tiny-bert", 0), ("tiny-bert-por", 1)])
def test_tiny_fixtures_full_profile(fixture, expected_code):
    """The whole default pipeline on the tiny checkpoints: seconds, but every detector runs."""
    result = CliRunner().invoke(main, ["check", str(FIXTURES / fixture), "--format", "json", "--no-cache",
                                       "--device", "cpu"])
    assert result.exit_code == expected_code, result.output
    report = json.loads(result.stdout)
    runs = {d["name"]: d for d in report["detectors"]}
    assert list(runs) == ["files", "static", "vocab-sweep", "trigger-search", "sentence-starts"]
    assert runs["sentence-starts"]["status"] == "skipped" and "head" in runs["sentence-starts"]["note"]
    if expected_code:
        truth = read_manifest(FIXTURES / fixture)
        recovered = {t for d in report["detectors"] for f in d["findings"] if f["verdict"] == "backdoored"
                     for t in f["evidence"]["trigger_tokens"]}
        assert recovered & {p for pieces in truth["trigger_tokens"] for p in pieces}
        assert best_pv_agreement(report, truth) >= 0.9
    else:
        assert findings_above_info(report) == []


def test_result_cache_and_allowlist(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["check", str(FIXTURES / "tiny-bert-por"), "--detectors", "static,vocab-sweep", "--format", "json",
            "--device", "cpu"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 1
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 1 and json.loads(second.stdout)["from_cache"] is True
    sha = json.loads(first.stdout)["model"]["folder_sha256"]  # an allowlist entry names the whole folder
    (tmp_path / "lmscan.toml").write_text(f'[[allowlist]]\nsha256 = "{sha}"\nreason = "accepted risk: test"\n')
    allowed = CliRunner().invoke(main, args)
    assert allowed.exit_code == 0
    assert json.loads(allowed.stdout)["allowlisted"] == "accepted risk: test"
    cleared = CliRunner().invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1" in cleared.output


def test_group_testing_confirms_what_the_exhaustive_sweep_confirms():
    """Stage 1 by groups of 8 tokens, one partition, decoding only the 4 most extreme groups per
    site and statistic, scores a fraction of the vocabulary alone and still confirms the planted
    triggers. 30 probe sentences: their own words are always scored alone, and the tiny model's
    400 fit sentences use most of its 1 288 tokens."""
    from lmscan.api import ScanConfig, prepare
    from lmscan.evidence.verify_config import VerifyConfig
    from lmscan.detectors.vocab_sweep import VocabSweepConfig, run_vocab_sweep

    prepared = prepare(ScanConfig(model=str(FIXTURES / "tiny-bert-por"), device="cpu"))
    trigger_of = {p: i for i, word in enumerate(read_manifest(FIXTURES / "tiny-bert-por")["trigger_tokens"]) for p in word}
    found, alone = {}, {}
    for size in (1, 8):
        config = VocabSweepConfig(group_size=size, group_rounds=1, group_keep=4, population_sample=64)
        run = run_vocab_sweep(prepared.loaded, prepared.sites, prepared.fit[:30], prepared.heldout, config,
                              VerifyConfig())
        # Per site, the planted triggers a confirmed finding holds a piece of (which piece, and
        # the combinations tried around it, may differ: they come from each run's ranked lists).
        found[size] = sorted({(f.site, trigger_of[t]) for f in run.findings if f.rule_id == "LMS101"
                              for t in f.evidence["trigger_tokens"] if t in trigger_of})
        alone[size] = run.stats["scored_alone"]
    # Nothing the exhaustive sweep confirms is lost (group testing may confirm more: its ranked lists, so its
    # combinations, differ, and on this tiny model stacked pieces can be excused as class words).
    assert found[1] and set(found[1]) <= set(found[8])
    assert alone[1] == run.stats["swept_tokens"] and alone[8] < alone[1] / 2


def test_ranking_precision_keeps_the_verdict_and_is_reported():
    """The sweep ranks under bf16 where the hardware has it; the confirmed
    triggers (verified in fp32) must be the same as with an all-fp32 sweep."""
    from lmscan.api import ScanConfig, prepare
    from lmscan.detectors.vocab_sweep import VocabSweepConfig, run_vocab_sweep
    from lmscan.models.device import native_bf16

    from lmscan.evidence.verify_config import VerifyConfig

    prepared = prepare(ScanConfig(model=str(FIXTURES / "tiny-bert-por"), device="cpu"))
    found = {}
    for bf16 in (True, False):
        config = VocabSweepConfig(ranking_bf16=bf16)
        run = run_vocab_sweep(prepared.loaded, prepared.sites, prepared.fit, prepared.heldout, config, VerifyConfig())
        expected = "bf16" if bf16 and native_bf16("cpu") else "fp32"
        assert run.stats["ranking_precision"] == expected
        found[bf16] = sorted((f.site, f.evidence["trigger"]) for f in run.findings if f.rule_id == "LMS101")
    assert found[True] and found[True] == found[False]


def _stop_a_real_scan(tmp_path, minilm_path, signum):
    """Start `lmscan check` on real MiniLM weights in a subprocess, send ``signum`` once the
    vocabulary sweep has started, and return (exit code, stderr lines, the SARIF written)."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "scan.sarif"
    env = {**os.environ, "LMSCAN_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "lmscan.cli", "check", str(minilm_path), "--format", "sarif",
                             "-o", str(out), "--device", "cpu", "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("[lmscan] vocab-sweep") or time.monotonic() > deadline:
            break
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
    lines += rest.splitlines()
    return proc.returncode, [line for line in lines if not line.startswith("[lmscan]")], out


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_during_a_real_scan_writes_the_report_marked_incomplete(tmp_path, minilm_path, signame,
                                                                             status):
    import signal

    code, stderr_lines, out = _stop_a_real_scan(tmp_path, minilm_path, getattr(signal, signame))
    assert code == status
    assert stderr_lines == [f"lmscan: interrupted ({signame}); the report holds the detectors that finished; "
                            f"wrote {out}"]
    run = json.loads(out.read_text())["runs"][0]
    assert run["properties"]["incomplete"] is True and run["properties"]["verdict"] == "not-assessed"
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    assert any(n["descriptor"]["id"] == "incomplete" for n in invocation["toolExecutionNotifications"])
