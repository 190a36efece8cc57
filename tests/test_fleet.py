"""Fleet scans (lmscan check on many models; lmscan.scan.fleet) on the real tiny checkpoints:
combined reports, resuming from the result cache, local workers and Ray."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.scan.fleet import parse_models_file
from lmscan.report.verdict import fleet_exit_code
from tests.conftest import FIXTURES
from tests.test_report import assert_sarif_structure, read_with_sarif_pydantic

CLEAN, PLANTED = str(FIXTURES / "tiny-bert"), str(FIXTURES / "tiny-bert-por")
# The cheapest scan that still gives both verdicts on the tiny checkpoints.
SCAN = ["--detectors", "vocab-sweep", "--device", "cpu"]


def by_ref(document: dict) -> dict:
    return {entry["ref"]: entry for entry in document["models"]}


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no project config from the repository


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_fleet_reports_every_model_and_resumes_from_the_cache(local_ray, cache_env, tmp_path):
    missing = str(tmp_path / "no-such-model")
    fleet = ["check", CLEAN, PLANTED, missing, *SCAN]
    first = CliRunner().invoke(main, [*fleet, "--format", "json", "--ray"])
    assert first.exit_code == 2, first.output  # an error wins over a backdoor
    models = by_ref(json.loads(first.stdout))
    assert [models[ref]["verdict"] for ref in (CLEAN, PLANTED, missing)] == ["clean", "backdoored", "error"]
    assert "no such file" in models[missing]["error"] and "\n" not in models[missing]["error"]
    assert not models[CLEAN]["cached"] and models[PLANTED]["report"]["verdict"] == "backdoored"

    again = CliRunner().invoke(main, [*fleet, "--format", "json", "--ray"])
    assert again.exit_code == 2, again.output
    resumed = by_ref(json.loads(again.stdout))
    for ref in (CLEAN, PLANTED):  # the same scans, served from the cache
        assert resumed[ref]["cached"] and resumed[ref]["report"]["from_cache"]
        assert resumed[ref]["report"]["started_at"] == models[ref]["report"]["started_at"]
    assert not resumed[missing]["cached"]

    sarif = CliRunner().invoke(main, [*fleet, "--format", "sarif", "-o", str(tmp_path / "fleet.sarif"), "--ray"])
    assert sarif.exit_code == 2, sarif.output
    log = json.loads((tmp_path / "fleet.sarif").read_text())
    assert_sarif_structure(log)
    read_with_sarif_pydantic(log, tmp_path)
    (run,) = log["runs"]
    assert [m["verdict"] for m in run["properties"]["models"]] == ["clean", "backdoored", "error"]
    assert len(run["artifacts"]) == 2
    assert any(r["properties"]["model"] == PLANTED and r["level"] == "error" for r in run["results"])
    assert any(missing in note["message"]["text"] for note in run["invocations"][0]["toolExecutionNotifications"])


def test_jobs_scan_models_at_the_same_time(cache_env, tmp_path):
    fleet = tmp_path / "models.txt"
    fleet.write_text(f"# the two tiny checkpoints\n{CLEAN}\n\n{PLANTED}  # planted\n")
    result = CliRunner().invoke(main, ["check", "--models-file", str(fleet), *SCAN, "--format", "json", "--jobs", "2",
                                       "--out-dir", str(tmp_path / "reports"), "--no-cache"])
    assert result.exit_code == 1, result.output  # a backdoor, no error
    models = by_ref(json.loads(result.stdout))
    clean, planted = models[CLEAN], models[PLANTED]
    assert (clean["verdict"], planted["verdict"]) == ("clean", "backdoored")
    start, end = (max(datetime.fromisoformat(m["started_at"]) for m in (clean, planted)),
                  min(datetime.fromisoformat(m["finished_at"]) for m in (clean, planted)))
    assert start < end, "the two scans did not overlap"
    written = sorted((tmp_path / "reports").iterdir())
    assert [p.name[:3] for p in written] == ["01-", "02-"] and written[1].name.endswith("tiny-bert-por.json")
    assert json.loads(written[1].read_text())["verdict"] == "backdoored"  # the usual per-model report


def test_models_file_skips_comments_and_keeps_revisions(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("# registry\norg/a@v2\n\n  ./local-model   # copied in\norg/b\n   \n")
    assert parse_models_file(path) == ["org/a@v2", "./local-model", "org/b"]
    result = CliRunner().invoke(main, ["check", "--models-file", str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and "none.txt" in result.stderr and "Traceback" not in result.output


def test_ray_missing_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    result = CliRunner().invoke(main, ["check", CLEAN, "--ray", "--no-cache"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["lmscan: error: Ray is not installed; it is an optional extra: "
                                                  "pip install 'lmscan-backdoor[ray]'"]


def test_fleet_exit_code_is_the_worst_error_then_finding_then_not_assessed():
    assert fleet_exit_code([0, 3, 1, 2]) == 2
    assert fleet_exit_code([0, 3, 1]) == 1
    assert fleet_exit_code([0, 3]) == 3
    assert fleet_exit_code([0, 0]) == 0 and fleet_exit_code([]) == 0
