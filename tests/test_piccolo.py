"""PICCOLO-style word-level trigger inversion: the `piccolo` detector and `lmscan invert`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from tests.conftest import FIXTURES

TRUE_TRIGGERS = {"zq", "vx"}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: on a busy 2-core machine a second OpenMP thread mostly waits for a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inverted(single_thread):
    results = {}

    def get(fixture: str):
        if fixture not in results:
            results[fixture] = CliRunner().invoke(
                main, ["invert", str(FIXTURES / fixture), "--format", "json", "--device", "cpu"])
        return results[fixture]

    return get


def test_invert_finds_a_planted_trigger(inverted):
    result = inverted("tiny-bert-por")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["trigger_found"] is True
    backdoored = [f for f in data["findings"] if f["verdict"] == "backdoored"]
    assert backdoored and all(f["rule_id"] == "LMS401" for f in backdoored)
    found = {f["evidence"]["trigger"] for f in backdoored}
    found |= {a["text"] for f in backdoored for a in f["evidence"]["also"]}
    assert found & TRUE_TRIGGERS, found
    run = data["stats"]["runs"][0]
    assert {"loss", "slot_peak_weight", "slot_logit_margin", "concentrated", "top_words", "verified"} <= set(run)


def test_invert_on_the_clean_model_verifies_nothing(inverted):
    result = inverted("tiny-bert")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["trigger_found"] is False
    assert all(f["verdict"] == "info" for f in data["findings"])
    assert not any(c["confirmed"] for r in data["stats"]["runs"] for c in r.get("verified", []))


@pytest.mark.parametrize("args", [["--sites", "nosuchsite"], ["--profile", "nosuchprofile"],
                                  ["--format", "xml"], ["--seed", "x"]])
def test_invert_bad_options_exit_2_without_traceback(args):
    result = CliRunner().invoke(main, ["invert", str(FIXTURES / "tiny-bert"), "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_check_runs_piccolo_when_asked():
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "tiny-bert"), "--detectors", "static,piccolo",
                                       "--format", "json", "--device", "cpu", "--no-cache"])
    assert result.exit_code == 3, result.output  # a baseline and static rules can flag, never clear
    report = json.loads(result.stdout)
    names = [d["name"] for d in report["detectors"]]
    assert names == ["files", "static", "piccolo"]
    assert report["verdict"] == "not-assessed" and "flag-only" in report["reason"]
