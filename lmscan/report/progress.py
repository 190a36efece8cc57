"""Progress display on stderr; transient, and silent when stderr is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def step_progress(console: Console, title: str):
    """Yield a ``progress(done, total, loss)`` callback drawing one bar."""
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task(title, total=None, info="")

        def update(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, info=f"loss {loss:.4f}")

        yield update


@contextmanager
def detector_progress(console: Console):
    """Yield a ``progress(detector, done, total, info="")`` callback with one bar per detector."""
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        tasks: dict[str, int] = {}

        def update(detector: str, done: int, total: int, info: str = "") -> None:
            if detector not in tasks:
                tasks[detector] = bar.add_task(detector, total=total, info="")
            bar.update(tasks[detector], completed=done, total=total, info=info)

        yield update
