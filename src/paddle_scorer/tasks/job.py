"""What every file-running task shares: where the records come from (``Source``), where the results go
(``Destination``), the checks of both before anything is loaded, and how a task talks to its caller (``Hooks``: the
CLI prints, a Python caller may collect or ignore; tasks never print)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

from paddle_scorer.errors import UsageError


def _ignore(_text: str) -> None:
    pass


@contextlib.contextmanager
def _no_progress(_what: str, _total: int):
    yield lambda n: None


@dataclass
class Hooks:
    """``note``: a line the user should read (a default chosen for them, a mapping, a streamed run); ``info``: what is
    going on (blocks, worker parts); ``progress(what, total)``: a context that yields ``advance(n)``; ``busy(what)``:
    a context around a long step with no progress to show (loading)."""

    note: Callable[[str], None] = _ignore
    info: Callable[[str], None] = _ignore
    progress: Callable[[str, int], ContextManager[Callable[[int], None]]] = _no_progress
    busy: Callable[[str], ContextManager] = field(default=lambda _what: contextlib.nullcontext())


@dataclass
class Source:
    """The records of a run: ``prompts`` (ids 0, 1, ...) or an ``input`` JSONL file (ids from ``id_field``)."""

    prompts: list[str] | None = None
    input: Path | None = None
    id_field: str = "id"
    limit: int | None = None
    max_line_size: int | str | None = None  # bytes, or a size like "8MB" (default: jsonio.MAX_LINE_BYTES)

    @property
    def max_line_bytes(self) -> int:
        from paddle_scorer import jsonio
        from paddle_scorer.model.memory_budget import parse_size

        if self.max_line_size is None:
            return jsonio.MAX_LINE_BYTES
        if isinstance(self.max_line_size, int) and not isinstance(self.max_line_size, bool):
            if self.max_line_size < 1:
                raise UsageError(f"--max-line-size must be positive, got {self.max_line_size}.")
            return self.max_line_size
        return parse_size(str(self.max_line_size), "--max-line-size")

    def rows(self) -> list[tuple[object, dict, str]]:
        """``[(id, record, where)]``, every record checked (:func:`paddle_scorer.jsonio.read_jsonl`), all in memory."""
        from paddle_scorer import jsonio

        if self.input is not None:
            rows = jsonio.read_jsonl(self.input, self.id_field, self.max_line_bytes)
        else:
            rows = [(i, {"query": p}, f"--prompt #{i + 1}") for i, p in enumerate(self.prompts)]
        return rows if self.limit is None else rows[: self.limit]

    @contextlib.contextmanager
    def records(self):
        """The records as an iterable that can be read again (a run reads its input twice: an index, then the
        windows it scores), one record in memory at a time. An input that is not a regular file (a pipe,
        ``<(zcat data.jsonl.gz)``) is copied once to a temporary file, removed at the end."""
        if self.input is None:
            yield _Prompts(self.prompts, self.limit)
            return
        from paddle_scorer import jsonio

        path = Path(self.input)
        jsonio.check_input_path(path)
        spool = None
        try:
            if not path.is_file():  # in $TMPDIR; with --limit only the lines it reads
                fd, spool = tempfile.mkstemp(prefix="paddle-scorer-input-", suffix=".jsonl")
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    _copy_lines(src, out, self.limit)
            yield _JsonlRecords(Path(spool) if spool else path, str(path), self.id_field, self.limit, self.max_line_bytes)
        finally:
            if spool:
                Path(spool).unlink(missing_ok=True)


def _copy_lines(src, out, limit: int | None) -> None:
    """All of ``src``, or its lines up to the ``limit``-th that is not blank (what a run with ``--limit`` reads)."""
    if limit is None:
        shutil.copyfileobj(src, out, 1 << 20)
        return
    records, blank = 0, True
    for piece in iter(lambda: src.readline(1 << 20), b""):  # a line arrives in 1 MB pieces: none is held whole
        out.write(piece)
        blank = blank and not piece.strip()
        if piece.endswith(b"\n"):
            records += not blank
            blank = True
            if records >= limit:
                return


@dataclass
class _Prompts:
    prompts: list[str]
    limit: int | None

    def __iter__(self):
        for i, p in enumerate(self.prompts if self.limit is None else self.prompts[: self.limit]):
            yield i, {"query": p}, f"--prompt #{i + 1}"


@dataclass
class _JsonlRecords:
    path: Path
    name: str
    id_field: str
    limit: int | None
    max_line_bytes: int

    def __iter__(self):
        from paddle_scorer import jsonio

        for n, row in enumerate(jsonio.iter_jsonl(self.path, self.id_field, self.name, self.max_line_bytes)):
            if self.limit is not None and n >= self.limit:
                return
            yield row


@dataclass
class Destination:
    """Where results go: ``output`` (None: returned only), continued with ``resume`` or replaced with ``overwrite``."""

    output: Path | None = None
    resume: bool = False
    overwrite: bool = False


def check_io(source: Source, dest: Destination) -> None:
    """The input/output combinations the file-running tasks refuse, before anything is loaded."""
    from paddle_scorer.runs.output_file import check_output_path

    if (source.prompts is None) == (source.input is None):
        raise UsageError("give either --prompt TEXT (repeatable) or --input data.jsonl.")
    if dest.resume and dest.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one.")
    if dest.resume and dest.output is None:
        raise UsageError("--resume needs --output (the file to continue).")
    if dest.overwrite and dest.output is None:
        raise UsageError("--overwrite needs --output (the file to replace).")
    if source.limit is not None and source.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {source.limit}.")
    source.max_line_bytes  # noqa: B018 - an unreadable --max-line-size is refused before anything runs
    if dest.output is not None:
        inputs = [Path(source.input)] if source.input is not None else []
        check_output_path(Path(dest.output), inputs, resume=dest.resume, overwrite=dest.overwrite)


_NUMBER_RULES = {"batch_size": (1, "--batch-size"), "max_length": (2, "--max-length"), "show": (0, "--show"),
                 "max_new_tokens": (1, "--max-new-tokens"), "top_k": (0, "--top-k"), "limit": (1, "--limit"),
                 "stream_block_records": (1, "--stream-block-records")}


def check_numbers(**values) -> None:
    """Range checks of integer options (before anything is loaded): batch sizes >= 1, counts >= 0, ..."""
    for name, value in values.items():
        if value is None:
            continue
        low, flag = _NUMBER_RULES[name]
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}.")


def template_note(template: str | None, source: str, hooks: Hooks) -> None:
    """One note when a template holds a literal backslash-n (see :func:`paddle_scorer.tasks.prompts.literal_escape_note`)."""
    from paddle_scorer.tasks.prompts import literal_escape_note

    note = literal_escape_note(template, source)
    if note:
        hooks.note(note)
