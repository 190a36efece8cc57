"""Progress display on stderr.

On a terminal: transient rich bars with the stage name, count, elapsed time and ETA.
Anywhere else (a CI log, a file): plain lines, one when a stage (or a part of it) starts,
at most one every ``LOG_INTERVAL`` seconds per stage, and a heartbeat line whenever
nothing was printed for ``HEARTBEAT`` seconds, e.g.
``[lmscan] vocab-sweep 12400/29523, 2m10s, ETA 3m``, so a long scan is never silent.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

LOG_INTERVAL = 30.0  # seconds between two lines of the same stage in a log
HEARTBEAT = 25.0  # a log line at least this often, whatever the stage reports (CI kills silent jobs)


def duration(seconds: float) -> str:
    """``seconds`` the way a log line says it: 45s, 2m10s, 1h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StageClock:
    """Where each stage stands. A stage whose total changes has started a new part (the
    vocabulary sweep's second round of groups is smaller than its first): the part is
    numbered and its ETA measured from the part's own start, so it never jumps."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started: dict[str, float] = {}
        self.part_started: dict[str, float] = {}
        self.part: dict[str, int] = {}
        self.state: dict[str, tuple[int, int, str]] = {}
        self.current: str | None = None

    def record(self, stage: str, done: int, total: int, info: str) -> bool:
        """Note an update; True when it begins a stage or a part of one."""
        now = self.clock()
        new_part = stage not in self.started or self.state[stage][1] != total
        if stage not in self.started:
            self.started[stage] = now
            self.part[stage] = 0
        if new_part:
            self.part_started[stage] = now
            self.part[stage] += 1
        self.state[stage] = (done, total, info)
        self.current = stage
        return new_part

    def label(self, stage: str) -> str:
        return stage if self.part.get(stage, 1) <= 1 else f"{stage} (part {self.part[stage]})"

    def eta(self, stage: str) -> float | None:
        """Seconds left in the current part, None when it cannot be estimated (or its count is
        done and the stage is finishing work it does not count)."""
        done, total, _ = self.state[stage]
        if not 0 < done < total:
            return None
        return (self.clock() - self.part_started[stage]) * (total - done) / done


class StageLog:
    """Progress as plain lines: ``update(stage, done, total, info)`` prints when a stage (or a
    part of it) starts and then at most every ``interval`` seconds; :meth:`tick`, called by a
    timer thread (:func:`heartbeat`), prints the current stage again when nothing was printed
    for ``heartbeat`` seconds, so a log never goes quiet while a stage computes uncounted work."""

    def __init__(self, console: Console, label: str | None = None, interval: float = LOG_INTERVAL,
                 clock=time.monotonic, heartbeat: float = HEARTBEAT):
        self.console = console
        self.prefix = f"{label}: " if label else ""
        self.interval = interval
        self.heartbeat = heartbeat
        self.stages = StageClock(clock)
        self.last_line: dict[str, float] = {}
        self.printed: dict[str, tuple] = {}  # the state each stage's last line showed
        self.last_any = clock()
        self._lock = threading.Lock()

    def update(self, stage: str, done: int, total: int, info: str = "") -> None:
        with self._lock:
            new = self.stages.record(stage, done, total, info)
            now = self.stages.clock()
            if not new and now - self.last_line[stage] < self.interval:
                return
            self._print(stage, now)

    def tick(self) -> None:
        """Print the current stage if the log has been quiet for ``heartbeat`` seconds."""
        with self._lock:
            stage, now = self.stages.current, self.stages.clock()
            if stage is not None and now - self.last_any >= self.heartbeat:
                # "still working" only when the count has not moved since the last line
                self._print(stage, now, still=self.stages.state[stage] == self.printed.get(stage))

    def _print(self, stage: str, now: float, still: bool = False) -> None:
        self.last_line[stage] = self.last_any = now
        self.printed[stage] = self.stages.state[stage]
        done, total, info = self.stages.state[stage]
        text = self.line(self.stages.label(stage), done, total, info, now - self.stages.started[stage],
                         self.stages.eta(stage))
        if still:
            text += ", still working"
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def line(self, stage: str, done: int, total: int, info: str, elapsed: float, eta: float | None = None) -> str:
        text = f"[lmscan] {self.prefix}{stage}"
        if total > 1:
            text += f" {done}/{total}"
        if info:
            text += f" {info}"
        if elapsed >= 1:
            text += f", {duration(elapsed)}"
            if eta is not None:
                text += f", ETA {duration(eta)}"
        return text


@contextmanager
def heartbeat(log: StageLog, every: float = 5.0):
    """Call ``log.tick()`` every ``every`` seconds from a daemon thread while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            log.tick()

    thread = threading.Thread(target=beat, name="lmscan-progress-heartbeat", daemon=True)
    thread.start()
    try:
        yield log
    finally:
        stop.set()
        thread.join(timeout=every + 1)


class StageElapsedColumn(ProgressColumn):
    """Time since the stage began; unlike rich's elapsed column it keeps running when the
    count is complete but the stage still works (the sweep verifies after its last group)."""

    def render(self, task: Task) -> Text:
        started = task.fields.get("started")
        seconds = 0.0 if started is None else task.get_time() - started
        return Text(duration(seconds), style="progress.elapsed")


class PartEtaColumn(ProgressColumn):
    """ETA of the stage's current part, or "finishing" once its count is complete."""

    def render(self, task: Task) -> Text:
        started = task.fields.get("part_started")
        done, total = task.completed, task.total
        if started is None or not total or done <= 0:
            return Text("ETA -", style="progress.remaining")
        if done >= total:
            return Text("finishing", style="progress.remaining")
        return Text(f"ETA {duration((task.get_time() - started) * (total - done) / done)}", style="progress.remaining")


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        StageElapsedColumn(), PartEtaColumn(), console=console, transient=True,
    )


def _plain(console: Console, plain: bool | None) -> bool:
    return not console.is_terminal if plain is None else plain


@contextmanager
def step_progress(console: Console, title: str, plain: bool | None = None):
    """Yield a ``progress(done, total, loss)`` callback drawing one bar (or logging ``title``)."""
    if _plain(console, plain):
        with heartbeat(StageLog(console)) as log:
            yield lambda done, total, loss: log.update(title, done, total, f"loss {loss:.4f}")
        return
    with _bars(console) as bar:
        now = bar.get_time()
        task = bar.add_task(title, total=None, info="", started=now, part_started=now)

        def update(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, info=f"loss {loss:.4f}")

        yield update


@contextmanager
def detector_progress(console: Console, label: str | None = None, plain: bool | None = None):
    """Yield a ``progress(stage, done, total, info="")`` callback with one bar per stage.
    ``label`` (a model, in a fleet scan) prefixes every bar and line; ``plain`` forces
    lines (True) or bars (False) instead of choosing by whether ``console`` is a terminal."""
    if _plain(console, plain):
        with heartbeat(StageLog(console, label)) as log:
            yield log.update
        return
    with _bars(console) as bar:
        stages = StageClock(bar.get_time)
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, info: str = "") -> None:
            previous = stages.current
            new_part = stages.record(stage, done, total, info)
            if previous is not None and previous != stage and previous in tasks:
                bar.remove_task(tasks.pop(previous))  # a finished stage's clock stops with it
            name = stages.label(stage)
            description = f"{label}: {name}" if label else name
            if stage not in tasks:
                tasks[stage] = bar.add_task(description, total=total, info="", started=stages.started[stage],
                                            part_started=stages.part_started[stage])
            elif new_part:
                bar.update(tasks[stage], description=description, part_started=stages.part_started[stage])
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
