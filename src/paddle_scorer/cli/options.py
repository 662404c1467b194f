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


@contextlib.contextmanager
def progress_bar(what: str, total: int):
    """A rich progress bar on stderr (only on a terminal); yields ``advance(n)``."""
    if not err.is_terminal:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


def hooks() -> Hooks:
    """The CLI's hooks: notes and messages on stderr, a progress bar and a spinner on a terminal."""
    return Hooks(note=_note, info=_info, progress=progress_bar, busy=_busy)


def resume_line(con, stats) -> None:
    """After --resume: what was done with the previous results when the input had changed since."""
    r = stats.resume
    if r.changed or r.removed:
        con.print(f"resume: {r.changed} record(s) rescored because their input changed since they were scored, "
                  f"{r.removed} dropped because their id is no longer in the input (kept {r.kept}).", highlight=False)
