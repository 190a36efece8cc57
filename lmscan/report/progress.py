"""Progress display on stderr.

On a terminal: transient rich bars with the stage name, count, elapsed time and ETA.
Anywhere else (a CI log, a file): plain lines, one when a stage starts and at most one
every ``LOG_INTERVAL`` seconds per stage, e.g.
``[lmscan] vocab-sweep 12400/29523, 2m10s, ETA 3m``, so a long scan is never silent.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

LOG_INTERVAL = 30.0  # seconds between two lines of the same stage in a log


def duration(seconds: float) -> str:
    """``seconds`` the way a log line says it: 45s, 2m10s, 1h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StageLog:
    """Progress as plain lines: ``update(stage, done, total, info)`` prints when a stage
    starts and then at most every ``interval`` seconds for that stage."""

    def __init__(self, console: Console, label: str | None = None, interval: float = LOG_INTERVAL,
                 clock=time.monotonic):
        self.console = console
        self.prefix = f"{label}: " if label else ""
        self.interval = interval
        self.clock = clock
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}

    def update(self, stage: str, done: int, total: int, info: str = "") -> None:
        now = self.clock()
        if stage not in self.started:
            self.started[stage] = now
        elif now - self.last_line[stage] < self.interval:
            return
        self.last_line[stage] = now
        self.console.print(self.line(stage, done, total, info, now - self.started[stage]),
                           markup=False, highlight=False, soft_wrap=True)

    def line(self, stage: str, done: int, total: int, info: str, elapsed: float) -> str:
        text = f"[lmscan] {self.prefix}{stage}"
        if total > 1:
            text += f" {done}/{total}"
        if info:
            text += f" {info}"
        if elapsed >= 1:
            text += f", {duration(elapsed)}"
            if 0 < done < total:
                text += f", ETA {duration(elapsed * (total - done) / done)}"
        return text


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
    )


def _plain(console: Console, plain: bool | None) -> bool:
    return not console.is_terminal if plain is None else plain


@contextmanager
def step_progress(console: Console, title: str, plain: bool | None = None):
    """Yield a ``progress(done, total, loss)`` callback drawing one bar (or logging ``title``)."""
    if _plain(console, plain):
        log = StageLog(console)
        yield lambda done, total, loss: log.update(title, done, total, f"loss {loss:.4f}")
        return
    with _bars(console) as bar:
        task = bar.add_task(title, total=None, info="")

        def update(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, info=f"loss {loss:.4f}")

        yield update


@contextmanager
def detector_progress(console: Console, label: str | None = None, plain: bool | None = None):
    """Yield a ``progress(stage, done, total, info="")`` callback with one bar per stage.
    ``label`` (a model, in a fleet scan) prefixes every bar and line; ``plain`` forces
    lines (True) or bars (False) instead of choosing by whether ``console`` is a terminal."""
    if _plain(console, plain):
        yield StageLog(console, label).update
        return
    with _bars(console) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, info: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{label}: {stage}" if label else stage, total=total, info="")
            bar.update(tasks[stage], completed=done, total=total, info=info)

        yield update


@contextmanager
def count_progress(console: Console, title: str, total: int, describe=str, plain: bool | None = None):
    """Yield ``finished(item)`` counting ``total`` items done (models of a fleet): one bar, or a
    line per item such as ``[lmscan] models 2/3: org/name: clean in 7.4 s``."""
    if _plain(console, plain):
        done = 0

        def finished(item) -> None:
            nonlocal done
            done += 1
            console.print(f"[lmscan] {title} {done}/{total}: {describe(item)}", markup=False, highlight=False,
                          soft_wrap=True)

        yield finished
        return
    with _bars(console) as bar:
        task = bar.add_task(title, total=total, info="")
        yield lambda item: bar.update(task, advance=1, info=describe(item))
