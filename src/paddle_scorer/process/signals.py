"""Stop signals around the moments that publish a result: SIGINT/SIGTERM held for the few renames that make an
output complete (so a stop cannot separate results from their provenance), and whether a process is alive."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C/SIGTERM that arrived while a finished result was being moved into place: the move was completed
    first (the message says what is complete), then the interrupt is honoured."""


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT/SIGTERM for the few renames that publish a result, so a stop signal cannot leave an output
    without its provenance (or a merge folder half moved). Yields the list of signals that arrived. SIGKILL
    cannot be held: see :func:`run_state` and ``report`` for what is left then."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True
