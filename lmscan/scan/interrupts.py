"""Stop requests: Ctrl-C (SIGINT), SIGTERM and SIGHUP all end a command the same way.

`timeout`, `docker stop`, Kubernetes and CI cancellation send SIGTERM; a closed terminal
sends SIGHUP. Python turns only SIGINT into KeyboardInterrupt, so without this a TERM
kills the process before any report is written. Inside :func:`stop_signals_handled`
each of them raises :class:`Stopped` (a KeyboardInterrupt, so every place that keeps a
partial result on Ctrl-C keeps it here too) and the exit status is 128 + the signal
number, as a shell reports it (130 INT, 143 TERM, 129 HUP).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_received: list[int] = []


class Stopped(KeyboardInterrupt):
    """A stop request by signal ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, _frame):
    first = not _received
    _received.append(signum)
    # A second INT still stops at once (an impatient Ctrl-C); a repeated TERM or HUP while the
    # partial report is being written is ignored, so the document is finished.
    if first or signum == signal.SIGINT:
        raise Stopped(signum)


@contextmanager
def stop_signals_handled():
    """Within the block, SIGINT/SIGTERM/SIGHUP raise :class:`Stopped` (main thread only;
    elsewhere the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_signal() -> int:
    """The first stop signal received (SIGINT when a KeyboardInterrupt came some other way)."""
    return _received[0] if _received else int(signal.SIGINT)


def stop_exit_status() -> int:
    """128 + the stop signal: what a shell reports for a process that signal ended."""
    return 128 + stop_signal()


def stop_name() -> str:
    return signal.Signals(stop_signal()).name
