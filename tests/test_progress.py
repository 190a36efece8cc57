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


def test_a_quiet_stage_still_prints_a_heartbeat_line():
    """A stage that stops counting (the sweep verifying after its last group) must not leave
    a CI log silent: tick() prints the current stage once the log was quiet for the heartbeat."""
    out, now = io.StringIO(), [0.0]
    log = StageLog(Console(file=out, width=200), interval=30, heartbeat=25, clock=lambda: now[0])
    log.update("vocab-sweep", 1846, 1846, "candidates alone")
    for second in (10, 20, 24):
        now[0] = second
        log.tick()
    assert len(out.getvalue().splitlines()) == 1  # nothing yet: the log spoke 24 s ago
    now[0] = 26
    log.tick()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "[lmscan] vocab-sweep 1846/1846 candidates alone, 26s, still working"
    now[0] = 40
    log.tick()  # 14 s after the heartbeat: quiet again
    assert len(out.getvalue().splitlines()) == 2
    now[0] = 52
    log.tick()
    assert len(out.getvalue().splitlines()) == 3


def test_a_stage_whose_total_changes_starts_a_numbered_part_with_its_own_eta():
    out, now = io.StringIO(), [0.0]
    log = StageLog(Console(file=out, width=200), interval=30, clock=lambda: now[0])
    log.update("vocab-sweep", 0, 3691, "groups, round 1 of 2")
    now[0] = 20
    log.update("vocab-sweep", 3691, 3691, "groups, round 1 of 2")  # within the interval: no line
    now[0] = 61
    log.update("vocab-sweep", 0, 923, "groups, round 2 of 2")  # a new part: a line at once
    now[0] = 100
    log.update("vocab-sweep", 461, 923, "groups, round 2 of 2")
    lines = out.getvalue().splitlines()
    assert lines[1] == "[lmscan] vocab-sweep (part 2) 0/923 groups, round 2 of 2, 1m01s"
    # ETA from the part's own start (39 s for 461 of 923), not from the stage's 100 s
    assert lines[2] == "[lmscan] vocab-sweep (part 2) 461/923 groups, round 2 of 2, 1m40s, ETA 39s"


def test_the_heartbeat_thread_calls_tick_until_the_block_ends():
    from lmscan.report.progress import heartbeat

    class Counting:
        ticks = 0

        def tick(self):
            self.ticks += 1

    counting = Counting()
    with heartbeat(counting, every=0.01):
        import time

        deadline = time.monotonic() + 5
        while counting.ticks < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    seen = counting.ticks
    assert seen >= 3
    time.sleep(0.05)
    assert counting.ticks == seen  # stopped with the block


def test_a_heartbeat_after_counted_progress_is_a_plain_progress_line():
    out, now = io.StringIO(), [0.0]
    log = StageLog(Console(file=out, width=200), interval=30, heartbeat=25, clock=lambda: now[0])
    log.update("trigger-search", 10, 48)
    now[0] = 20
    log.update("trigger-search", 30, 48)  # throttled: no line, but the count moved
    now[0] = 26
    log.tick()
    assert out.getvalue().splitlines()[-1] == "[lmscan] trigger-search 30/48, 26s, ETA 16s"
