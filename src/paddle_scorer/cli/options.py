"""How the CLI hears from a task (:class:`~paddle_scorer.tasks.job.Hooks`: notes, progress bar, spinner) and the lines
it prints about a run's resume."""

from __future__ import annotations

import contextlib

from paddle_scorer.cli.common import err
from paddle_scorer.tasks.job import Hooks


def _note(text: str) -> None:
    err.print(f"note: {text}" + ("" if text.endswith(".") else "."), highlight=False, markup=False)


def _info(text: str) -> None:
    err.print(text, highlight=False, markup=False)


def _busy(what: str):
    return err.status(what, spinner="dots") if err.is_terminal else contextlib.nullcontext()


LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal (a log file, a batch job)


@contextlib.contextmanager
def progress_bar(what: str, total: int):
    """A rich progress bar on stderr on a terminal (done/total, records per second, elapsed, time left); elsewhere a
    line every :data:`LOG_EVERY` seconds while it runs (none for a short run). Yields ``advance(n)``."""
    if not err.is_terminal:
        yield _log_lines(what, total)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn(f"{what}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task(what, total=total, rate="")

        def advance(n: int) -> None:
            progress.advance(task, n)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:,.0f} rec/s" if speed else "")

        yield advance


def _log_lines(what: str, total: int):
    import time

    start = last = time.monotonic()
    done = 0

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= LOG_EVERY and done < total:
            last = now
            rate = done / max(now - start, 1e-9)
            left = (total - done) / rate if rate else float("nan")
            err.print(f"{what}: {done}/{total} records, {rate:,.0f} records/s, about {left / 60:.1f} min left",
                      highlight=False, markup=False)

    return advance


def hooks() -> Hooks:
    """The CLI's hooks: notes and messages on stderr, a progress bar and a spinner on a terminal."""
    return Hooks(note=_note, info=_info, progress=progress_bar, busy=_busy)


def resume_line(con, stats) -> None:
    """After --resume: what was done with the previous results when the input had changed since."""
    r = stats.resume
    if r.changed or r.removed:
        con.print(f"resume: {r.changed} record(s) rescored because their input changed since they were scored, "
                  f"{r.removed} dropped because their id is no longer in the input (kept {r.kept}).", highlight=False)
