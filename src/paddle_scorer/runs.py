"""Running a scoring job over inputs: batches, resume, provenance. No printing (callbacks report)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from paddle_scorer import __version__
from paddle_scorer.dataio import ResultWriter, meta_path, record_key, write_json_atomic
from paddle_scorer.runtime import settings as runtime_settings
from paddle_scorer.runtime import versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunStats:
    total: int = 0
    skipped: int = 0  # already in the output (resume)
    scored: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)


def provenance(command: str, loaded, run_config: dict, extra: dict) -> dict:
    return {
        "tool": f"paddle-scorer {__version__}",
        "command": command,
        "model": loaded.facts.to_dict(),
        "run_config": run_config,
        "versions": versions(),
        "cpu_settings": runtime_settings(),
        "started": now(),
        "status": "running",
        **extra,
    }


def run_job(
    items: list,  # prepared items with an ``id`` attribute, in input order
    score_batch: Callable[[list], list[dict]],
    batch_size: int,
    writer: ResultWriter | None,
    meta: dict | None,
    on_progress: Callable[[int], None] | None = None,
) -> RunStats:
    """Score ``items`` in batches (skipping ids already written), flush each batch, then finalise."""
    stats = RunStats(total=len(items))
    todo = [it for it in items if writer is None or not writer.is_done(it.id)]
    stats.skipped = len(items) - len(todo)
    if on_progress and stats.skipped:
        on_progress(stats.skipped)
    if writer is not None and meta is not None:
        meta["counts"] = {"total": stats.total, "resumed": stats.skipped}
        write_json_atomic(meta_path(writer.output), meta)
    t0 = time.perf_counter()
    results: dict = {}
    try:
        # Group into batches by length (longest first) so padding is small; order restored below.
        order = sorted(todo, key=lambda it: _length(it), reverse=True)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            recs = score_batch(batch)
            if writer is not None:
                writer.write_batch(recs)
            for r in recs:
                results[record_key(r["id"])] = r
            stats.scored += len(recs)
            if on_progress:
                on_progress(len(recs))
    finally:
        stats.seconds = time.perf_counter() - t0
        if writer is not None:
            writer.close()
    if writer is not None:
        stats.records = writer.finalize([it.id for it in items])
    else:
        stats.records = [results[record_key(it.id)] for it in items]
    return stats


def finish_meta(writer: ResultWriter, meta: dict, stats: RunStats, extra: dict) -> None:
    meta.update(extra)
    meta["status"] = "complete"
    meta["finished"] = now()
    meta["finished_ts"] = time.time()
    meta["counts"] = {"total": stats.total, "resumed": stats.skipped, "scored_this_run": stats.scored}
    meta["seconds"] = round(stats.seconds, 3)
    meta["seconds_per_record"] = round(stats.seconds / stats.scored, 6) if stats.scored else None
    write_json_atomic(meta_path(writer.output), meta)


def _length(item) -> int:
    ctx = getattr(item, "context", None)
    return len(ctx) if ctx is not None else 0




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
    score_batch: Callable[[list], list[dict]],
    batch_size: int,
    *,
    output: Path | None,
    resume: bool,
    overwrite: bool,
    run_config: dict,
    loaded,
    meta_extra: dict,
    advance: Callable[[int], None] | None = None,
    metrics_fn: Callable[[list[dict], list[str]], dict | None] | None = None,
) -> Outcome:
    """One scoring job, single-process or as one worker of ``paddle.distributed.launch``."""
    import socket

    from paddle_scorer.errors import UsageError
    from paddle_scorer.sharding import check_no_foreign_parts, gather, part_path, shard, worker_from_env

    worker = worker_from_env()
    labels = run_config.get("labels")
    if not worker.distributed:
        writer = meta = None
        if output is not None:
            writer = ResultWriter(output, resume=resume, overwrite=overwrite, run_config=run_config)
            meta = provenance(command, loaded, run_config, {**meta_extra, "world_size": 1})
        stats = run_job(items, score_batch, batch_size, writer, meta, advance)
        if writer is not None:
            finish_meta(writer, meta, stats, {"metrics": metrics_fn(stats.records, labels) if metrics_fn and labels else None})
        return Outcome(stats, stats.records, worker, final_meta=meta)

    if output is None:
        raise UsageError("under paddle.distributed.launch each worker writes a part file: pass --output out.jsonl.")
    check_no_foreign_parts(output, worker, overwrite)
    part = part_path(output, worker)
    writer = ResultWriter(part, resume=resume, overwrite=overwrite, run_config=run_config)
    mine = shard(items, worker)
    meta = provenance(command, loaded, run_config, {
        **meta_extra, "world_size": worker.world,
        "worker": {"rank": worker.rank, "world": worker.world, "local_rank": worker.local_rank, "launch": worker.launch,
                   "host": socket.gethostname(), "records": len(mine)},
    })
    stats = run_job(mine, score_batch, batch_size, writer, meta, advance)
    finish_meta(writer, meta, stats, {})
    # Only parts written by this launch count: a stale complete part from an earlier run (e.g. before
    # --overwrite) must not be assembled before its worker has redone it. `gather` by hand takes any.
    final = gather(output, metrics_fn, launch=worker.launch)
    if final is not None:
        records = final.pop("_records")
        return Outcome(stats, records, worker, assembled=True, final_meta=final, part=part)
    return Outcome(stats, stats.records, worker, part=part)
