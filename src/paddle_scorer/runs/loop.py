"""Running a scoring job over inputs: blocks of records, resume, provenance. No printing (callbacks report).

``execute`` runs one job single-process, or as one worker of ``paddle.distributed.launch`` (its part
of the input into a part file; the last worker to finish assembles the output). Where the output
lives and how it is replaced is :mod:`paddle_scorer.runs.output_file`'s business; here is the loop.
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
from paddle_scorer.jsonio import record_key
from paddle_scorer.runs.output_file import ResumeReport, RunOutput
from paddle_scorer.process.environment import settings as runtime_settings
from paddle_scorer.process.environment import versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunStats:
    total: int = 0
    skipped: int = 0  # already in the output with unchanged input (resume)
    scored: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)
    resume: ResumeReport = field(default_factory=ResumeReport)


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


def run_job(
    items: list,  # prepared items with ``id`` and ``fingerprint`` attributes, in input order
    score_block: Callable[[list], list[dict]],
    block_size: int,
    out: RunOutput | None,
    meta: dict | None,
    on_progress: Callable[[int], None] | None = None,
    on_block: Callable[[], dict] | None = None,
) -> RunStats:
    """Score ``items`` in blocks (skipping records already done with unchanged input), flush each block,
    then finalise. ``score_block`` gets the items of one block (longest first) and returns their output
    records; each is stamped with its ``input_fingerprint``."""
    stats = RunStats(total=len(items))
    if out is not None:
        todo = out.reconcile(items, {record_key(it.id): it.fingerprint for it in items})
        stats.resume = out.report
    else:
        todo = list(items)
    stats.skipped = len(items) - len(todo)
    if on_progress and stats.skipped:
        on_progress(stats.skipped)
    if out is not None and meta is not None:
        meta["counts"] = {"total": stats.total, "resumed": stats.skipped}
        out.start(meta)
    t0 = time.perf_counter()
    results: dict = {}
    fp = {record_key(it.id): it.fingerprint for it in items}
    try:
        order = sorted(todo, key=_length, reverse=True)  # long prompts together: little padding
        for start in range(0, len(order), block_size):
            block = order[start:start + block_size]
            recs = score_block(block)
            for r in recs:
                r["input_fingerprint"] = fp[record_key(r["id"])]
            if out is not None:
                out.write_batch(recs)
            for r in recs:
                results[record_key(r["id"])] = r
            stats.scored += len(recs)
            if on_progress:
                on_progress(len(recs))
    finally:
        stats.seconds = time.perf_counter() - t0
        if out is not None:
            out.close()
    if out is None:
        stats.records = [results[record_key(it.id)] for it in items]
    return stats


def finish(out: RunOutput, meta: dict, stats: RunStats, items: list, extra: dict, summarise=None) -> None:
    meta.update(extra)
    meta["finished"] = now()
    meta["finished_ts"] = time.time()
    meta["counts"] = {"total": stats.total, "resumed": stats.skipped, "scored_this_run": stats.scored}
    meta["seconds"] = round(stats.seconds, 3)
    meta["seconds_per_record"] = round(stats.seconds / stats.scored, 6) if stats.scored else None
    stats.records = out.finalize([it.id for it in items], meta, summarise)


@dataclass
class Outcome:
    stats: RunStats
    records: list[dict]  # all records (single run or assembled), else this worker's part
    worker: object
    assembled: bool = False
    final_meta: dict | None = None
    part: Path | None = None


def execute(
    command: str,
    items: list,
    score_block: Callable[[list], list[dict]],
    block_size: int,
    *,
    output: Path | None,
    resume: bool,
    overwrite: bool,
    identity: dict,
    loaded,
    meta_extra: dict,
    advance: Callable[[int], None] | None = None,
    metrics_fn: Callable[[list[dict], list[str]], dict | None] | None = None,
    labels: list[str] | None = None,
    finish_extra: Callable[[], dict] | None = None,
) -> Outcome:
    """One scoring job, single-process or as one worker of ``paddle.distributed.launch``."""
    from paddle_scorer.errors import UsageError
    from paddle_scorer.process.launcher import worker_from_env
    from paddle_scorer.runs.sharding import check_no_foreign_parts, gather, part_path, shard

    worker = worker_from_env()
    if not worker.distributed:
        out = meta = None
        if output is not None:
            out = RunOutput(output, identity, resume=resume, overwrite=overwrite)
            meta = provenance(command, loaded, identity, {**meta_extra, "world_size": 1})
        stats = run_job(items, score_block, block_size, out, meta, advance)
        if out is not None:
            summarise = (lambda recs: {"metrics": metrics_fn(recs, labels)}) if (metrics_fn and labels) else None
            finish(out, meta, stats, items, finish_extra() if finish_extra else {}, summarise)
        return Outcome(stats, stats.records, worker, final_meta=meta)

    if output is None:
        raise UsageError("under paddle.distributed.launch each worker writes a part file: pass --output out.jsonl.")
    check_no_foreign_parts(output, worker, overwrite)
    part = part_path(output, worker)
    mine = shard(items, worker)
    from paddle_scorer.runs.output_file import ids_digest

    out = RunOutput(part, identity, resume=resume, overwrite=overwrite)
    meta = provenance(command, loaded, identity, {
        **meta_extra, "world_size": worker.world,
        "input_records": len(items), "input_ids_sha256": ids_digest([it.id for it in items]),
        "worker": {"rank": worker.rank, "world": worker.world, "local_rank": worker.local_rank, "launch": worker.launch,
                   "host": socket.gethostname(), "pid": os.getpid(), "records": len(mine)},
    })
    stats = run_job(mine, score_block, block_size, out, meta, advance)
    finish(out, meta, stats, mine, finish_extra() if finish_extra else {})
    # Only parts written by this launch count: a stale complete part from an earlier run (e.g. before
    # --overwrite) must not be assembled before its worker has redone it. `gather` by hand takes any.
    final = gather(output, metrics_fn, launch=worker.launch)
    if final is not None:
        records = final.pop("_records")
        return Outcome(stats, records, worker, assembled=True, final_meta=final, part=part)
    return Outcome(stats, stats.records, worker, part=part)
