"""Verdict aggregation, exit codes and the JSON / SARIF / text reporters.

Reports are built by hand here: these are unit tests of aggregation and rendering,
independent of any detector or model.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sarif_pydantic  # the test extra's SARIF 2.1.0 reader
from rich.console import Console

from lmscan.errors import InputError
from lmscan.findings import SEVERITIES, DetectorRun, Finding, Report
from lmscan.report.json_report import SCHEMA_VERSION, from_dict, summarize_evidence, to_dict, to_json
from lmscan.report.render import render_text
from lmscan.report.sarif import to_sarif
from lmscan.report.verdict import aggregate, check_fail_on, exit_code, fail_on_choices, load_policy
from tests.conftest import FIXTURES

SHA_A = "a" * 64
SHA_B = "b" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def policy() -> dict:
    return load_policy()


def trigger_finding(**over) -> Finding:
    values = dict(
        detector="vocab-sweep", rule_id="LMS101", title="trigger-token-collapses-features", severity="critical",
        verdict="backdoored", message="Inserting 'zq' collapses 16 different sentences onto one vector.", site="cls",
        score=0.019, threshold=0.2,
        evidence={"triggers": ["zq", "vx"], "activation_rate": np.float32(0.97), "sign_agreement": np.float64(0.995),
                  "pv": np.ones(384, dtype=np.float32), "token_ids": np.array([1234, 987])},
    )
    values.update(over)
    return Finding(**values)


def shift_finding(**over) -> Finding:
    values = dict(
        detector="vocab-sweep", rule_id="LMS102", title="feature-shift-outlier", severity="medium", verdict="suspicious",
        message="Token '##q' moves the [MASK] feature 6x further than any ordinary word.", site="mask", score=6.2,
        threshold=3.0, evidence={"tokens": ["##q", "[MASK]"], "shift": 0.23},
    )
    values.update(over)
    return Finding(**values)


def run(name="vocab-sweep", status="ok", sites=("cls",), findings=(), note="", seconds=1.5, cleared=None,
        why="") -> DetectorRun:
    """A detector run; an "ok" run of a clearing detector clears its sites unless told otherwise."""
    cleared = list(sites) if cleared is None and status == "ok" and name in ("vocab-sweep", "pv-mining") else cleared
    return DetectorRun(name=name, status=status, seconds=seconds, sites=list(sites), findings=list(findings), note=note,
                       stats={"median_shift": np.float64(0.01), "bad": float("nan")}, cleared_sites=list(cleared or []),
                       uncleared_reason=why, can_clear=name in ("vocab-sweep", "pv-mining"))


def hub_model(sha=SHA_A) -> dict:
    return {
        "ref": "org/bert-thing", "kind": "hub", "repo_id": "org/bert-thing", "revision": None, "commit": COMMIT,
        "local_dir": f"/cache/models--org--bert-thing/snapshots/{COMMIT}",
        "weight_sha256": {"model.safetensors": "c" * 64}, "model_sha256": sha, "architecture": "bert",
        "sites": ["cls", "pooler"],
    }


def local_model(tmp: Path, sha=SHA_B) -> dict:
    return {
        "ref": str(tmp), "kind": "local", "repo_id": None, "revision": None, "commit": None, "local_dir": str(tmp),
        "weight_sha256": {"model.safetensors": "d" * 64}, "model_sha256": sha, "architecture": "bert", "sites": ["cls"],
    }


def make_report(detectors, policy, model=None, allowlisted=None, skipped_sites=None) -> Report:
    verdict, severity, reason = aggregate(detectors, ["cls"], policy, skipped=skipped_sites)
    return Report(
        schema_version=SCHEMA_VERSION,
        tool={"name": "lmscan", "version": "0.1.0", "torch": "2.13.0", "python": "3.11"},
        model=model or hub_model(), config={"profile": "default", "detectors": ["vocab-sweep"], "sites": ["cls"]},
        seed=0, device="cpu", detectors=detectors, verdict=verdict, severity=severity,
        timings={"load": 0.5, "total": 2.0, "vocab-sweep": np.float32(1.5)}, allowlisted=allowlisted,
        started_at="2026-11-23T13:00:00Z", reason=reason, skipped_sites=dict(skipped_sites or {}),
    )


# ----------------------------------------------------------------- aggregation


def verdict_of(runs, policy, sites=("cls",), incomplete=False):
    return aggregate(runs, list(sites), policy, incomplete)


def test_aggregate_backdoored_wins_and_takes_highest_severity(policy):
    runs = [run(findings=[shift_finding()]), run(name="pv-mining", findings=[trigger_finding(severity="high")])]
    assert verdict_of(runs, policy)[:2] == ("backdoored", "high")


def test_aggregate_suspicious(policy):
    assert verdict_of([run(findings=[shift_finding()])], policy)[:2] == ("suspicious", "medium")


def test_clean_needs_every_scanned_site_cleared_by_a_clearing_detector(policy):
    info = shift_finding(verdict="info", severity="info")
    assert verdict_of([run(findings=[info]), run(name="static", sites=("weights",))], policy)[:2] == ("clean", "info")
    # pv-mining looked at pooler but every loop there was abandoned: pooler is open
    runs = [run(name="pv-mining", sites=("cls", "pooler"), cleared=["cls"], why="no loop converged at pooler")]
    verdict, _, reason = verdict_of(runs, policy, sites=("cls", "pooler"))
    assert verdict == "not-assessed" and "pooler" in reason and "no loop converged at pooler" in reason
    # the sweep clears both
    assert verdict_of([*runs, run(sites=("cls", "pooler"))], policy, sites=("cls", "pooler"))[0] == "clean"


@pytest.mark.parametrize("runs, says", [
    ([], "no detector ran"),
    ([run(name="static", sites=("weights",))], "static checks only"),
    ([run(name="attention", sites=("attention",)), run(name="piccolo", sites=("cls",))], "flag-only"),
    ([run(status="error", sites=("cls",), note="out of memory")], "vocab-sweep failed: out of memory"),
    ([run(status="ok", sites=(), cleared=[])], "not searched"),
])
def test_not_assessed_says_why(policy, runs, says):
    verdict, severity, reason = verdict_of(runs, policy)
    assert (verdict, severity) == ("not-assessed", "info") and says in reason


def test_an_error_leaves_no_verdict_but_never_hides_a_backdoor(policy):
    failed = run(name="pv-mining", status="error", note="RuntimeError: boom")
    assert verdict_of([run(findings=[shift_finding()]), failed], policy)[0] == "not-assessed"
    assert verdict_of([run(), failed], policy)[0] == "not-assessed"
    assert verdict_of([run(findings=[trigger_finding()]), failed], policy)[:2] == ("backdoored", "critical")
    # findings a detector made before it failed still count
    assert verdict_of([run(status="error", findings=[trigger_finding()])], policy)[:2] == ("backdoored", "critical")


def test_an_interrupted_scan_is_not_assessed_unless_a_backdoor_was_found(policy):
    assert verdict_of([run()], policy, incomplete=True)[0] == "not-assessed"
    assert verdict_of([run(findings=[trigger_finding()])], policy, incomplete=True)[0] == "backdoored"


# ------------------------------------------------------------------ exit codes


def test_exit_code_paths(policy):
    backdoored = make_report([run(findings=[trigger_finding()])], policy)
    suspicious = make_report([run(findings=[shift_finding()])], policy)
    clean = make_report([run()], policy)
    not_assessed = make_report([run(status="skipped", sites=())], policy)
    allowlisted = make_report([run(findings=[trigger_finding()])], policy, allowlisted="red-team fixture")

    assert clean.verdict == "clean" and exit_code(clean, "backdoored") == 0
    assert exit_code(backdoored, "backdoored") == 1
    assert exit_code(backdoored, None) == 1  # policy default is "backdoored"
    assert exit_code(suspicious, "backdoored") == 0
    assert exit_code(suspicious, None) == 0
    assert exit_code(suspicious, "suspicious") == 1
    assert exit_code(backdoored, "suspicious") == 1
    assert not_assessed.verdict == "not-assessed"
    for fail_on in fail_on_choices(policy):
        assert exit_code(not_assessed, fail_on) == 3
        assert exit_code(allowlisted, fail_on) == 0
    not_assessed.allowlisted = "known"
    assert exit_code(not_assessed, "backdoored") == 3


def test_exit_code_severity_thresholds(policy):
    suspicious_medium = make_report([run(findings=[shift_finding()])], policy)
    backdoored_high = make_report([run(findings=[trigger_finding(severity="high")])], policy)
    assert exit_code(suspicious_medium, "low") == 1
    assert exit_code(suspicious_medium, "medium") == 1
    assert exit_code(suspicious_medium, "high") == 0
    assert exit_code(backdoored_high, "high") == 1
    assert exit_code(backdoored_high, "critical") == 0
    assert exit_code(make_report([run()], policy), "low") == 0


def test_fail_on_values_come_from_policy(policy):
    assert fail_on_choices(policy) == ["backdoored", "suspicious", "low", "medium", "high", "critical"]
    assert policy["fail_on"]["default"] == "backdoored"
    assert check_fail_on(None, policy) == "backdoored"
    assert check_fail_on("HIGH", policy) == "high"
    with pytest.raises(InputError, match="expected one of"):
        check_fail_on("info", policy)
    with pytest.raises(InputError):
        exit_code(make_report([run()], policy), "sometimes")


def test_user_policy_in_rules_dir_is_checked(tmp_path):
    (tmp_path / "policy.toml").write_text('[verdict]\nprecedence = ["backdoored"]\n[fail_on]\ndefault = "nope"\n')
    with pytest.raises(InputError, match="policy.toml"):
        load_policy(tmp_path)


POOLING_UNREADABLE = {"embedding": "1_Pooling/config.json is not readable"}


@pytest.mark.parametrize("runs, verdict", [
    ([run(sites=("cls", "pooler"))], "clean"),
    ([run(findings=[trigger_finding()])], "backdoored"),
    ([run(name="static", sites=("weights",))], "not-assessed"),
])
def test_every_verdict_names_the_sites_it_did_not_scan(policy, runs, verdict):
    got, _, reason = aggregate(runs, ["cls", "pooler"], policy, skipped=POOLING_UNREADABLE)
    assert got == verdict
    assert reason.endswith("; embedding not scanned: 1_Pooling/config.json is not readable")
    if verdict == "clean":
        assert reason == ("no backdoor evidence at cls, pooler; "
                          "embedding not scanned: 1_Pooling/config.json is not readable")


def test_a_clean_verdict_says_what_the_detectors_that_ran_do_not_rule_out(policy, tmp_path):
    runs = [run(sites=("cls",)), run(name="trigger-search", cleared=[])]
    verdict, _, reason = aggregate(runs, ["cls"], policy)
    assert verdict == "clean"
    assert reason.startswith("no backdoor evidence at cls; not ruled out: a trigger of several words trained as a unit")
    # Only the detectors that ran speak, and a user policy may state its own limits.
    assert "not ruled out" not in aggregate([run(sites=("cls",))], ["cls"], policy)[2]
    (tmp_path / "policy.toml").write_text('[verdict.not_ruled_out]\ntrigger-search = "triggers of two pieces"\n')
    user = load_policy(tmp_path)
    assert aggregate(runs, ["cls"], user)[2] == "no backdoor evidence at cls; not ruled out: triggers of two pieces"
    (tmp_path / "policy.toml").write_text('[verdict.not_ruled_out]\ntrigger-search = ""\n')
    assert aggregate(runs, ["cls"], load_policy(tmp_path))[2] == "no backdoor evidence at cls"
    (tmp_path / "policy.toml").write_text('[verdict.not_ruled_out]\nvocab-sweep = 3\n')
    with pytest.raises(InputError, match="not_ruled_out"):
        load_policy(tmp_path)


def test_skipped_sites_in_json_sarif_and_text(policy, tmp_path):
    report = make_report([run()], policy, skipped_sites=POOLING_UNREADABLE)
    data = to_dict(report)
    assert data["skipped_sites"] == POOLING_UNREADABLE
    assert to_dict(from_dict(json.loads(to_json(report)))) == data  # the result cache keeps them
    log = to_sarif(report)
    read_with_sarif_pydantic(log, tmp_path)
    notes = log["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert {"level": "warning", "message": {"text": "site embedding not scanned: 1_Pooling/config.json is not readable"},
            "descriptor": {"id": "site-not-scanned"}} in notes
    text = rendered(report)
    assert "not scanned  embedding site: 1_Pooling/config.json is not readable" in text
    assert "embedding not scanned: 1_Pooling/config.json is not readable" in text.rstrip().splitlines()[-1]
    data["skipped_sites"] = {"embedding": 3}
    with pytest.raises(InputError, match="skipped_sites"):
        from_dict(data)


# ------------------------------------------------------------------------ JSON


def test_json_round_trip_and_strict_json(policy):
    report = make_report([run(findings=[trigger_finding(score=float("nan")), shift_finding(threshold=float("inf"))]),
                          run(name="static", status="skipped", sites=(), note="disabled")], policy)
    text = to_json(report)
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["schema_version"] == "1.0"
    assert list(data)[0] == "schema_version"
    finding = data["detectors"][0]["findings"][0]
    assert finding["score"] is None
    assert data["detectors"][0]["findings"][1]["threshold"] is None
    assert data["detectors"][0]["stats"]["bad"] is None
    assert isinstance(finding["evidence"]["activation_rate"], float)
    assert finding["evidence"]["token_ids"] == [1234, 987]
    assert len(finding["evidence"]["pv"]) == 384
    assert data["timings"]["vocab-sweep"] == 1.5

    back = from_dict(data)
    assert isinstance(back, Report)
    assert to_dict(back) == data
    assert back.detectors[0].findings[0].rule_id == "LMS101"
    assert back.detectors[1].status == "skipped" and back.detectors[1].note == "disabled"
    assert back.verdict == report.verdict == "backdoored"


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d.update(schema_version="2.0"), "schema_version"),
    (lambda d: d.update(verdict="maybe"), "verdict"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d["detectors"][0].update(status="done"), "status"),
    (lambda d: d["detectors"][0]["findings"][0].update(severity="urgent"), "severity"),
    (lambda d: d["detectors"][0]["findings"][0].pop("rule_id"), "rule_id"),
    (lambda d: d["detectors"][0]["findings"][0].update(score="high"), "score"),
])
def test_from_dict_rejects_bad_reports(policy, mutate, match):
    data = to_dict(make_report([run(findings=[trigger_finding()])], policy))
    mutate(data)
    with pytest.raises(InputError, match=match):
        from_dict(data)
    with pytest.raises(InputError):
        from_dict(["not", "a", "report"])


def test_evidence_summary_keeps_key_items_and_drops_vectors():
    summary = summarize_evidence(trigger_finding().evidence)
    assert list(summary)[:3] == ["triggers", "activation_rate", "sign_agreement"]
    assert "pv" not in summary  # 384 numbers are not a summary
    assert summary["token_ids"] == [1234, 987]


# ----------------------------------------------------------------------- SARIF

SARIF_LEVELS = {"none", "note", "warning", "error"}


# SARIF 2.1.0 properties that sarif-pydantic 0.6 does not model (it has a singular
# result "suppression"); their shape is checked in assert_sarif_structure.
NOT_MODELLED = {"toolExecutionNotifications", "suppressions"}


def assert_no_unknown_properties(model, path="sarif"):
    """sarif-pydantic accepts unknown keys; a misspelt SARIF property must not slip through."""
    from pydantic import BaseModel

    if isinstance(model, BaseModel):
        extra = set(model.model_extra or {}) - NOT_MODELLED
        assert not extra, f"{path}: properties unknown to SARIF 2.1.0: {sorted(extra)}"
        for name in type(model).model_fields:
            if name == "properties":  # property bags hold anything
                continue
            assert_no_unknown_properties(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for i, item in enumerate(model):
            assert_no_unknown_properties(item, f"{path}[{i}]")


def assert_sarif_structure(log: dict):
    """The SARIF 2.1.0 required fields (spec §3), and what GitHub code scanning needs."""
    assert log["version"] == "2.1.0"
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert isinstance(log["runs"], list) and len(log["runs"]) == 1
    run_ = log["runs"][0]
    driver = run_["tool"]["driver"]
    assert driver["name"] == "lmscan" and driver["version"] and driver["informationUri"].startswith("https://")
    rules = driver["rules"]
    ids = [rule["id"] for rule in rules]
    assert len(ids) == len(set(ids))
    for rule in rules:
        assert rule["id"].strip()
        for key in ("shortDescription", "fullDescription", "help"):
            assert rule[key]["text"].strip(), (rule["id"], key)
        assert rule["name"]
        severity = rule["properties"]["security-severity"]
        assert isinstance(severity, str) and 0.0 <= float(severity) <= 10.0
        assert rule["defaultConfiguration"]["level"] in SARIF_LEVELS
    assert run_["invocations"] and all(isinstance(i["executionSuccessful"], bool) for i in run_["invocations"])
    for invocation in run_["invocations"]:
        for note in invocation.get("toolExecutionNotifications", []):
            assert note["message"]["text"].strip() and note["level"] in SARIF_LEVELS
    for result in run_["results"]:
        assert result["message"]["text"].strip()
        assert result["level"] in SARIF_LEVELS
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        location = result["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"].strip()
        assert location["region"]["startLine"] >= 1
        assert re.fullmatch(r"[0-9a-f]{64}", result["partialFingerprints"]["lmscan/v1"])
        for suppression in result.get("suppressions", []):
            assert suppression["kind"] in ("inSource", "external")
            assert suppression.get("status", "accepted") in ("accepted", "underReview", "rejected")
    json.dumps(log, allow_nan=False)  # strict JSON


def read_with_sarif_pydantic(log: dict, tmp_path: Path):
    path = tmp_path / "lmscan.sarif"
    path.write_text(json.dumps(log, indent=2))
    parsed = sarif_pydantic.load(path)
    assert_no_unknown_properties(parsed)
    return parsed


def test_sarif_is_valid_and_complete(policy, tmp_path):
    report = make_report([run(findings=[trigger_finding(), shift_finding()]),
                          run(name="static", status="skipped", sites=(), note="disabled")], policy)
    log = to_sarif(report)
    assert_sarif_structure(log)
    parsed = read_with_sarif_pydantic(log, tmp_path)

    assert parsed.version == "2.1.0"
    (sarif_run,) = parsed.runs
    assert [r.id for r in sarif_run.tool.driver.rules] == ["LMS101", "LMS102"]
    lms101 = sarif_run.tool.driver.rules[0]
    assert lms101.name == "trigger-token-collapses-features"
    assert lms101.properties["security-severity"] == "9.5"
    assert lms101.default_configuration.level == "error"
    assert sarif_run.tool.driver.rules[1].properties["security-severity"] == "5.5"
    first, second = sarif_run.results
    assert (first.rule_id, first.level.value, second.level.value) == ("LMS101", "error", "warning")
    uri = first.locations[0].physical_location.artifact_location.uri
    assert uri == f"hf://org/bert-thing@{COMMIT}/model.safetensors"
    assert first.properties["evidence"]["triggers"] == ["zq", "vx"]
    assert first.properties["score"] == pytest.approx(0.019)
    assert sarif_run.invocations[0].execution_successful is True
    assert sarif_run.properties["verdict"] == "backdoored"
    assert sarif_run.properties["model_sha256"] == SHA_A
    assert log["runs"][0]["artifacts"][0]["hashes"]["sha-256"] == "c" * 64
    notes = log["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert "static skipped" in notes[0]["message"]["text"]


@pytest.mark.parametrize("severity, expected, level", [
    ("critical", "9.5", "error"), ("high", "8.0", "error"), ("medium", "5.5", "warning"), ("low", "3.0", "note"),
    ("info", "0.0", "note"),
])
def test_sarif_security_severity_per_severity(policy, severity, expected, level):
    log = to_sarif(make_report([run(findings=[trigger_finding(severity=severity)])], policy))
    rule = log["runs"][0]["tool"]["driver"]["rules"][0]
    assert rule["properties"]["security-severity"] == expected
    assert log["runs"][0]["results"][0]["level"] == level


def test_sarif_local_model_uses_absolute_file_uri(policy, tmp_path):
    report = make_report([run(findings=[trigger_finding()])], policy, model=local_model(tmp_path))
    log = to_sarif(report)
    assert_sarif_structure(log)
    read_with_sarif_pydantic(log, tmp_path)
    uri = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == (tmp_path / "model.safetensors").resolve().as_uri()
    assert uri.startswith("file:///")


def test_sarif_fingerprints_stable_and_model_specific(policy, tmp_path):
    def fingerprints(report):
        return [r["partialFingerprints"]["lmscan/v1"] for r in to_sarif(report)["runs"][0]["results"]]

    findings = [trigger_finding(), shift_finding()]
    report_a = make_report([run(findings=findings)], policy, model=hub_model(SHA_A))
    again = make_report([run(findings=[trigger_finding(score=0.02, evidence={**trigger_finding().evidence,
                                                                              "activation_rate": 0.9})],
                              seconds=9.0), run(findings=[shift_finding()])], policy, model=hub_model(SHA_A))
    report_b = make_report([run(findings=findings)], policy, model=hub_model(SHA_B))
    assert fingerprints(report_a) == fingerprints(report_a)
    assert fingerprints(report_a) == fingerprints(again)  # scores and rates are not part of the identity
    assert len(set(fingerprints(report_a))) == 2
    assert not set(fingerprints(report_a)) & set(fingerprints(report_b))
    other_trigger = make_report([run(findings=[trigger_finding(evidence={"triggers": ["cf"]})])], policy)
    assert fingerprints(other_trigger)[0] != fingerprints(report_a)[0]


def test_sarif_unknown_rule_and_no_findings(policy, tmp_path):
    odd = Finding(detector="piccolo", rule_id="LMS901", title="piccolo-trigger-word", severity="low",
                  verdict="suspicious", message="Word 'cf' moves the feature.", site="cls")
    log = to_sarif(make_report([run(findings=[odd])], policy))
    assert_sarif_structure(log)
    read_with_sarif_pydantic(log, tmp_path)
    rule = log["runs"][0]["tool"]["driver"]["rules"][0]
    assert rule["id"] == "LMS901" and rule["name"] == "piccolo-trigger-word"
    assert rule["properties"]["security-severity"] == "3.0"

    empty = to_sarif(make_report([run()], policy))
    assert_sarif_structure(empty)
    assert empty["runs"][0]["results"] == [] and empty["runs"][0]["tool"]["driver"]["rules"] == []
    read_with_sarif_pydantic(empty, tmp_path)


def test_sarif_allowlisted_results_are_suppressed(policy, tmp_path):
    log = to_sarif(make_report([run(findings=[trigger_finding()])], policy, allowlisted="red-team fixture"))
    assert_sarif_structure(log)
    read_with_sarif_pydantic(log, tmp_path)
    result = log["runs"][0]["results"][0]
    assert result["suppressions"] == [{"kind": "external", "status": "accepted", "justification": "red-team fixture"}]
    assert result["ruleId"] == "LMS101"  # still reported, as suppressed
    assert log["runs"][0]["properties"]["allowlisted"] == "red-team fixture"


# ------------------------------------------------------------------------ text


def rendered(report: Report, **console_kwargs) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, **console_kwargs)
    render_text(report, console)
    return buffer.getvalue()


def test_text_report_shows_verdict_trigger_and_evidence(policy):
    report = make_report([run(findings=[trigger_finding(), shift_finding()]),
                          run(name="static", status="skipped", sites=(), note="disabled by config")], policy)
    text = rendered(report)
    assert "\x1b[" not in text  # not a terminal: plain text
    assert "org/bert-thing" in text and COMMIT in text and SHA_A[:16] in text
    assert "bert" in text and "cpu" in text and "default" in text
    assert "vocab-sweep" in text and "skipped" in text and "disabled by config" in text
    assert "LMS101" in text and "'zq'" in text and "'vx'" in text
    assert "activation rate 0.97" in text and "sign agreement 0.995" in text
    assert "[MASK]" in text  # detector strings are not rich markup
    assert text.rstrip().splitlines()[-1].startswith("Verdict: BACKDOORED (severity critical)")
    assert text.index("CRITICAL") < text.index("MEDIUM")


@pytest.mark.parametrize("detectors, label", [
    ([run()], "Verdict: CLEAN"),
    ([run(findings=[shift_finding()])], "Verdict: SUSPICIOUS"),
    ([run(status="skipped", sites=(), note="no usable site")], "Verdict: NOT ASSESSED"),
    ([], "Verdict: NOT ASSESSED"),
])
def test_text_report_verdict_lines(policy, detectors, label):
    text = rendered(make_report(detectors, policy))
    last = text.rstrip().splitlines()[-1]
    assert last.startswith(label)
    if "NOT ASSESSED" in label:
        assert "no usable site" in last or "no detector ran" in last


def test_text_report_allowlisted_and_cached(policy):
    report = make_report([run(findings=[trigger_finding()])], policy, allowlisted="red-team fixture")
    report.from_cache = True
    text = rendered(report)
    assert "BACKDOORED" in text and "allowlisted: red-team fixture" in text and "LMS101" in text
    assert "cache" in text


def _colour_codes(text: str) -> list[str]:
    codes = []
    for params in re.findall(r"\x1b\[([0-9;]*)m", text):
        for p in params.split(";"):
            if p and (30 <= int(p) <= 49 or 90 <= int(p) <= 107):
                codes.append(p)
    return codes


def test_text_report_honours_no_color(policy, monkeypatch):
    report = make_report([run(findings=[trigger_finding()])], policy)
    assert _colour_codes(rendered(report, force_terminal=True, color_system="standard"))  # colour on a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    text = rendered(report, force_terminal=True, color_system="standard")
    assert not _colour_codes(text)
    assert "BACKDOORED" in text


def test_severities_and_policy_tables_agree(policy):
    assert set(policy["sarif"]["security_severity"]) == set(SEVERITIES)
    assert all(math.isfinite(v) for v in policy["sarif"]["security_severity"].values())


def test_sarif_checks_reject_broken_logs(policy, tmp_path):
    """The reader and the structural checks are not vacuous: broken logs fail them."""
    from pydantic import ValidationError

    good = to_sarif(make_report([run(findings=[trigger_finding()])], policy))
    no_message = json.loads(json.dumps(good))
    del no_message["runs"][0]["results"][0]["message"]
    with pytest.raises(ValidationError):
        read_with_sarif_pydantic(no_message, tmp_path)
    no_driver_name = json.loads(json.dumps(good))
    del no_driver_name["runs"][0]["tool"]["driver"]["name"]
    with pytest.raises(ValidationError):
        read_with_sarif_pydantic(no_driver_name, tmp_path)
    misspelt = json.loads(json.dumps(good))
    misspelt["runs"][0]["results"][0]["ruleID"] = misspelt["runs"][0]["results"][0].pop("ruleId")
    with pytest.raises(AssertionError, match="ruleID"):
        read_with_sarif_pydantic(misspelt, tmp_path)
    empty_uri = json.loads(json.dumps(good))
    empty_uri["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] = ""
    with pytest.raises(AssertionError):
        assert_sarif_structure(empty_uri)
    numeric_severity = json.loads(json.dumps(good))
    numeric_severity["runs"][0]["tool"]["driver"]["rules"][0]["properties"]["security-severity"] = 9.5
    with pytest.raises(AssertionError):
        assert_sarif_structure(numeric_severity)


def test_gpu_out_of_memory_retries_with_smaller_batches_then_cpu():
    """Fault injection: a registered detector raises the CUDA out-of-memory error until the
    batch is small enough; the runner retries, and the run says what happened."""
    from dataclasses import dataclass

    import torch

    from lmscan import detectors
    from lmscan.detectors.base import Detector, ScanContext
    from lmscan.scan.stages import run_detector
    from lmscan.models import load_model, resolve_model

    @dataclass(frozen=True)
    class Settings:
        batch_size: int = 512

    seen = []

    class Greedy(Detector):
        name, Config, can_clear, sites = "greedy", Settings, True, ("cls",)

        def run(self, ctx):
            seen.append((ctx.config.batch_size, ctx.loaded.device.type))
            if ctx.loaded.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return DetectorRun(self.name, "ok", sites=ctx.sites, cleared_sites=ctx.sites)

    loaded = load_model(resolve_model(str(FIXTURES / "tiny-bert")), device="cpu")
    loaded.device = torch.device("cuda")  # as if it had been loaded on a GPU
    detectors.register(Greedy)
    try:
        ctx = ScanContext(loaded=loaded, sites=["cls"], fit=[], heldout=[], config=Settings(), verify=None)
        run = run_detector("greedy", ctx, catalog={})
    finally:
        detectors.unregister("greedy")
    assert seen == [(512, "cuda"), (256, "cuda"), (128, "cuda"), (128, "cpu")]
    assert run.status == "ok" and "finished on the CPU" in run.note and "batch size 128" in run.note
