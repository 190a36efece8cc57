"""Progress a CI log can read: plain lines on a stderr that is not a terminal."""

from __future__ import annotations

import io
import json

from click.testing import CliRunner
from rich.console import Console

from lmscan.cli import main
from lmscan.report.progress import StageLog
from tests.conftest import FIXTURES


def test_a_scan_logs_plain_stage_lines_when_stderr_is_not_a_terminal():
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "tiny-bert-por"), "--detectors", "vocab-sweep",
                                       "--device", "cpu", "--format", "json", "--no-cache"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert "[lmscan] load" in lines  # before the model loads, which takes a while on a large one
    assert any(line.startswith("[lmscan] vocab-sweep ") for line in lines)
    assert json.loads(result.stdout)["verdict"] == "backdoored"  # stdout holds only the report


def test_stage_log_prints_a_stage_start_then_at_most_every_interval():
    out, now = io.StringIO(), [0.0]
    log = StageLog(Console(file=out, width=40), "org/name", interval=30, clock=lambda: now[0])
    for second, done in ((0, 0), (10, 100), (31, 200), (50, 300), (130, 400)):
        now[0] = second
        log.update("vocab-sweep", done, 1000)
    assert out.getvalue().splitlines() == ["[lmscan] org/name: vocab-sweep 0/1000",
                                           "[lmscan] org/name: vocab-sweep 200/1000, 31s, ETA 2m04s",
                                           "[lmscan] org/name: vocab-sweep 400/1000, 2m10s, ETA 3m15s"]
