"""Running a scoring job over an input of any size: an index first, then windows of records prepared and scored,
resume, provenance. No printing (callbacks report).

The input is read twice and never held: :func:`paddle_scorer.runs.input_index.scan` checks every line and keeps 16
bytes a record (id hash, fingerprint); then records are read again and prepared (templated, tokenized) a window at a
time (:data:`WINDOW_RECORDS` records or :data:`WINDOW_TOKENS` prompt tokens), each window ordered (by length, or
so that records sharing a prompt prefix are neighbours) and scored in blocks that are flushed to the working file
(:class:`~paddle_scorer.runs.output_file.RunOutput`). Memory does not grow with the input; the first block is on
disk after the index and one window's preparation. A record that cannot be prepared (a template field missing, a
prompt too long) stops the run at its window: what was scored stays in the working file for ``--resume``.

``execute`` runs one job single-process, or as one worker of ``paddle.distributed.launch`` (the positions
``i % world == rank`` into a part file; the last worker to finish assembles the output).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from paddle_scorer import __version__
from paddle_scorer.errors import UsageError
from paddle_scorer.process.environment import settings as runtime_settings
from paddle_scorer.process.environment import versions
from paddle_scorer.runs.input_index import InputIndex, Shard, check_same_input, fingerprint, scan
from paddle_scorer.runs.output_file import ResumeReport, RunOutput

WINDOW_RECORDS = 16384  # records prepared and ordered together: enough for length-sorted batches and shared prefixes
WINDOW_TOKENS = 1 << 21  # ... or this many prompt tokens (long prompts: a window stays ~100 MB of token lists)
CHUNK = 1024  # records prepared per tokenizer call


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunStats:
    total: int = 0
    skipped: int = 0  # already in the output with unchanged input (resume)
    scored: int = 0
    seconds: float = 0.0
    first_flush_seconds: float | None = None  # from the start of scoring to the first block on disk
    windows: int = 0
    timing: dict = field(default_factory=lambda: dict.fromkeys(("index", "prepare", "score", "write", "finalize"), 0.0))
    records: object = field(default_factory=list)  # the records (a list, or an OutputRecords view of the file)
    resume: ResumeReport = field(default_factory=ResumeReport)


@dataclass
class Task:
    """What a task gives the loop. ``prepare(rows)``: ``[(id, record, where)]`` -> items (with ``context``, and
    settable ``position``/``fingerprint``), every input check made; ``score_block(items)`` -> their output records, in
    order; ``records_per_flush(items)``: the block size for a window; ``order(items)``: a window's scoring order
    (default: longest prompt first); ``window_records(items)``: the window size, asked once with the first chunk."""

    command: str
    prepare: Callable[[list], list]
    score_block: Callable[[list], list[dict]]
    records_per_flush: Callable[[list], int]
    order: Callable[[list], list] | None = None
    window_records: Callable[[list], int] | None = None


def provenance(command: str, loaded, identity: dict, extra: dict) -> dict:
    return {
        "tool": f"paddle-scorer {__version__}",
        "command": command,
        "model": loaded.facts.to_dict(),
        "identity": identity,
        "versions": versions(),
        "cpu_settings": runtime_settings(),
        "started": now(),
        "status": "running",
        **extra,
    }


def _length(item) -> int:
    ctx = getattr(item, "context", None)
    return len(ctx) if ctx is not None else 0


def _windows(task: Task, records, todo, index: InputIndex, timing: dict):
    """Prepared windows of the records still to score, in input order: lists of items with position and fingerprint."""
    size = None
    window, tokens, chunk = [], 0, []
    per_chunk = min(CHUNK, 64)  # the first chunk small: its prompts' length sets the next chunks' size

    def flush_chunk():
        nonlocal size, tokens, per_chunk
        t = time.perf_counter()
        items = task.prepare([row for _, _, row in chunk])
        timing["prepare"] += time.perf_counter() - t
        for it, (pos, fp, _) in zip(items, chunk, strict=True):
            it.position, it.fingerprint = pos, fp
        if size is None:
            size = task.window_records(items) if task.window_records else WINDOW_RECORDS
        window.extend(items)
        got = sum(_length(it) for it in items)
        tokens += got
        mean = max(1, got // max(1, len(items)))
        per_chunk = max(1, min(CHUNK, WINDOW_TOKENS // (8 * mean)))  # a chunk of long prompts stays 1/8 window
        chunk.clear()

    seen = 0
    for pos, row in enumerate(records):
        seen = pos + 1
        if pos >= index.n:
            break
        if not todo[pos]:
            continue
        fp = fingerprint(row[1])
        check_same_input(index, pos, fp, row[2])
        chunk.append((pos, fp, row))
        if len(chunk) >= per_chunk:
            flush_chunk()
            while len(window) >= size:  # windows of exactly ``size`` (streamed: one block each, whole)
                yield window[:size]
                window = window[size:]
                tokens = sum(_length(it) for it in window)
            if tokens >= WINDOW_TOKENS:
                yield window
                window, tokens = [], 0
    if seen != index.n:
        raise UsageError(f"the input changed while this run was reading it ({index.n} records at first, "
                         f"{'more' if seen > index.n else seen} now); let the input settle, then rerun with --resume.")
    if chunk:
        flush_chunk()
    while window:
        yield window[:size]
        window = window[size:]


def _score_window(task: Task, window: list, out: RunOutput | None, results: dict | None, stats: RunStats,
                  on_progress, t0: float) -> None:
    order = task.order(window) if task.order else sorted(window, key=_length, reverse=True)
    block = max(1, task.records_per_flush(window))
    for start in range(0, len(order), block):
        items = order[start:start + block]
        t = time.perf_counter()
        recs = task.score_block(items)
        stats.timing["score"] += time.perf_counter() - t
        for r, it in zip(recs, items, strict=True):
            r["input_fingerprint"] = it.fingerprint
        if out is not None:
            t = time.perf_counter()
            out.write_batch(recs, [it.position for it in items])
            stats.timing["write"] += time.perf_counter() - t
        else:
            for r, it in zip(recs, items):
                results[it.position] = r
        if stats.first_flush_seconds is None:
            stats.first_flush_seconds = time.perf_counter() - t0
        stats.scored += len(recs)
        if on_progress:
            on_progress(len(recs))


def _collector_quiet() -> None:
    """Python's cycle collector out of the scoring loop's way: the objects alive when the loop starts (the model, the
    tokenizer, the libraries: hundreds of thousands) live as long as the process, yet every full collection walked
    them again (a third of preparing a record on the demo: 113 -> 90 us). They are frozen for the loop
    (``gc.freeze``: still freed by their reference counts, only not walked by the collector)."""
    import gc

    gc.freeze()


def _collector_normal() -> None:
    import gc

    gc.unfreeze()


def run_job(task: Task, records, index: InputIndex, shard: Shard, out: RunOutput | None, meta: dict | None,
            on_progress: Callable[[int], None] | None = None, index_seconds: float = 0.0) -> RunStats:
    """Score the records of ``shard`` still to do (skipping those done with unchanged input), window by window, each
    block flushed; the working file is closed at the end (finalising is :func:`finish`'s)."""
    import numpy as np

    stats = RunStats(total=shard.count(index.n))
    stats.timing["index"] = index_seconds
    if out is not None:
        todo = out.reconcile(index, shard)
        stats.resume = out.report
    else:
        todo = np.zeros(index.n, dtype=bool)
        todo[shard.rank::shard.world] = True
    stats.skipped = stats.total - int(todo.sum())
    if on_progress and stats.skipped:
        on_progress(stats.skipped)
    if out is not None and meta is not None:
        meta["counts"] = {"total": stats.total, "resumed": stats.skipped}
        out.start(meta)
    t0 = time.perf_counter()
    results: dict | None = {} if out is None else None
    try:
        _collector_quiet()
        windows = _windows(task, records, todo, index, stats.timing)
        while True:
            try:
                window = next(windows, None)
            except UsageError as exc:
                kept = stats.scored + stats.skipped
                if out is not None and kept:
                    exc.args = (f"{exc.args[0].rstrip('.')}; the {kept} record(s) scored before it are kept: fix "
                                "the input and rerun with --resume.",)
                raise
            if window is None:
                break
            stats.windows += 1
            _score_window(task, window, out, results, stats, on_progress, t0)
    finally:
        _collector_normal()
        stats.seconds = time.perf_counter() - t0
        if out is not None:
            out.close()
    if out is None:
        stats.records = [results[p] for p in shard.positions(index.n)]
    return stats


def finish(out: RunOutput, meta: dict, stats: RunStats, index: InputIndex, shard: Shard, extra: dict,
           summarise=None) -> None:
    meta.update(extra)
    meta["finished"] = now()
    meta["finished_ts"] = time.time()
    meta["counts"] = {"total": stats.total, "resumed": stats.skipped, "scored_this_run": stats.scored}
    meta["seconds"] = round(stats.seconds, 3)
    meta["seconds_per_record"] = round(stats.seconds / stats.scored, 6) if stats.scored else None
    meta["windows"] = stats.windows
    meta["timing"] = {k: round(v, 3) for k, v in stats.timing.items()}
    ids = index.ids_sha256 if shard.world == 1 else index.shard_ids_sha256
    t = time.perf_counter()
    out.finalize(shard.positions(index.n), ids, meta, summarise)
    stats.timing["finalize"] = time.perf_counter() - t
    stats.records = OutputRecords(out.output, stats.total)


class OutputRecords:
    """The records of a published output, read from the file when asked (a million-record run is not held in
    memory): ``len()``, iteration, ``[i]`` and slices."""

    def __init__(self, path: Path, count: int):
        self.path, self.count = Path(path), count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        import json

        with open(self.path, "rb") as fh:
            for raw in fh:
                yield json.loads(raw)

    def __getitem__(self, key):
        import itertools

        if isinstance(key, slice):
            start, stop, step = key.indices(self.count)
            return list(itertools.islice(iter(self), start, stop, step))
        if key < 0:
            key += self.count
        if not 0 <= key < self.count:
            raise IndexError(key)
        return next(itertools.islice(iter(self), key, None))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


@dataclass
class Outcome:
    stats: RunStats
    records: object  # all records (single run or assembled), else this worker's part: a list or OutputRecords
    worker: object
    assembled: bool = False
    final_meta: dict | None = None
    part: Path | None = None


@dataclass
class Indexed:
    """The input's index and the part of it this process scores."""

    index: InputIndex
    worker: object  # process.launcher.Worker
    shard: Shard
    seconds: float = 0.0


def index_input(records, id_field: str = "id") -> Indexed:
    """Every line of the input checked and indexed (:func:`paddle_scorer.runs.input_index.scan`), before the model is
    loaded; under ``paddle.distributed.launch`` with this worker's shard."""
    from paddle_scorer.process.launcher import worker_from_env

    worker = worker_from_env()
    shard = Shard(worker.rank, worker.world) if worker.distributed else Shard()
    t = time.perf_counter()
    index = scan(records, id_field, shard)
    return Indexed(index, worker, shard, time.perf_counter() - t)


def execute(task: Task, records, indexed: Indexed, *, output: Path | None, resume: bool, overwrite: bool, identity: dict, loaded,
            meta_extra: dict, advance: Callable[[int], None] | None = None, progress=None, summariser: Callable[[], object] | None = None,
            finish_extra: Callable[[], dict] | None = None) -> Outcome:
    """One scoring job, single-process or as one worker of ``paddle.distributed.launch``. ``records``: the input,
    readable again (:meth:`paddle_scorer.tasks.job.Source.records`), and ``indexed`` its :func:`index_input`;
    ``progress(total)``: a context yielding the
    ``advance(n)`` callback, entered once the index says how many records there are; ``summariser()``: a fresh
    object that sees every final record (``add``/``result``: the metrics)."""
    import contextlib

    from paddle_scorer.runs.sharding import check_no_foreign_parts, gather, part_path

    index, worker, shard = indexed.index, indexed.worker, indexed.shard
    if worker.distributed and output is None:
        raise UsageError("under paddle.distributed.launch each worker writes a part file: pass --output out.jsonl.")
    progress = progress or (lambda total: contextlib.nullcontext(advance))
    if not worker.distributed:
        out = meta = None
        if output is not None:
            out = RunOutput(output, identity, resume=resume, overwrite=overwrite)
            meta = provenance(task.command, loaded, identity, {**meta_extra, "world_size": 1})
        with progress(index.n) as step:
            stats = run_job(task, records, index, shard, out, meta, step, indexed.seconds)
        if out is not None:
            finish(out, meta, stats, index, shard, finish_extra() if finish_extra else {},
                   summariser() if summariser else None)
        return Outcome(stats, stats.records, worker, final_meta=meta)

    check_no_foreign_parts(output, worker, overwrite)
    part = part_path(output, worker)
    out = RunOutput(part, identity, resume=resume, overwrite=overwrite)
    meta = provenance(task.command, loaded, identity, {
        **meta_extra, "world_size": worker.world,
        "input_records": index.n, "input_ids_sha256": index.ids_sha256,
        "worker": {"rank": worker.rank, "world": worker.world, "local_rank": worker.local_rank, "launch": worker.launch,
                   "host": socket.gethostname(), "pid": os.getpid(), "records": shard.count(index.n)},
    })
    with progress(shard.count(index.n)) as step:
        stats = run_job(task, records, index, shard, out, meta, step, indexed.seconds)
    finish(out, meta, stats, index, shard, finish_extra() if finish_extra else {})
    # Only parts written by this launch count: a stale complete part from an earlier run (e.g. before
    # --overwrite) must not be assembled before its worker has redone it. `gather` by hand takes any.
    final = gather(output, (lambda _labels: summariser()) if summariser else None, launch=worker.launch)
    if final is not None:
        return Outcome(stats, OutputRecords(output, final["records"]), worker, assembled=True, final_meta=final,
                       part=part)
    return Outcome(stats, stats.records, worker, part=part)
