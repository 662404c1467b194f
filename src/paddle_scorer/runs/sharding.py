"""Data-parallel scoring under ``python -m paddle.distributed.launch``.

Each worker reads its rank and world size from the launcher's environment, scores the records
``i`` with ``i % world == rank`` (a disjoint, deterministic, length-balanced shard), and writes its
own part file ``<output>.parts/part-<rank>-of-<world>.jsonl`` (flushed per batch, resumable exactly
like a single run). No collective is needed for the scores: when a worker finishes and finds every
part complete, it assembles ``<output>`` in input order (part ``r``'s ``j``-th record is input
record ``j * world + r``). ``paddle-scorer gather <output>`` does the same by hand.
"""

from __future__ import annotations

import fcntl
import json
import re
from contextlib import contextmanager
from pathlib import Path

from paddle_scorer.jsonio import meta_path, record_key
from paddle_scorer.errors import UsageError
from paddle_scorer.process.launcher import Worker

_PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.jsonl$")


def shard(items: list, worker: Worker) -> list:
    return items[worker.rank::worker.world]


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_path(output: Path, worker: Worker) -> Path:
    return parts_dir(output) / f"part-{worker.rank:05d}-of-{worker.world:05d}.jsonl"


def existing_parts(output: Path) -> dict[tuple[int, int], Path]:
    d = parts_dir(output)
    found = {}
    if d.is_dir():
        for p in d.iterdir():
            m = _PART.match(p.name)
            if m:
                found[(int(m.group(1)), int(m.group(2)))] = p
    return found


def check_no_foreign_parts(output: Path, worker: Worker, overwrite: bool) -> None:
    """Parts written for another world size would be mixed in: refuse (or remove with --overwrite)."""
    foreign = {k: p for k, p in existing_parts(output).items() if k[1] != worker.world}
    if not foreign:
        return
    if overwrite:
        for p in foreign.values():
            p.unlink(missing_ok=True)
            meta_path(p).unlink(missing_ok=True)
        return
    sizes = sorted({w for _, w in foreign})
    raise UsageError(
        f"{parts_dir(output)} holds part files from a run with {', '.join(map(str, sizes))} worker(s), this run has "
        f"{worker.world}; mixing them would lose or duplicate records: rerun with the same world size, or --overwrite."
    )


@contextmanager
def _lock(output: Path):
    lock = output.with_name(f".{output.name}.lock")  # hidden: it stays (removing a flock file races)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def part_status(output: Path) -> tuple[int | None, list[dict]]:
    """World size and, per rank, the part's state: missing / running / killed / complete."""
    from paddle_scorer.runs.output_file import run_state, working_path

    parts = existing_parts(output)
    d = parts_dir(output)
    if d.is_dir():  # a part whose worker never finished has only its hidden working file
        for p in d.iterdir():
            m = re.match(r"^\.(part-(\d{5})-of-(\d{5})\.jsonl)\.inprogress$", p.name)
            if m and (int(m.group(2)), int(m.group(3))) not in parts:
                parts[(int(m.group(2)), int(m.group(3)))] = d / m.group(1)
    worlds = {w for _, w in parts}
    if not worlds:
        return None, []
    if len(worlds) > 1:
        raise UsageError(
            f"{parts_dir(output)} mixes part files from runs with {sorted(worlds)} workers; remove the stale ones "
            "(or rerun with --overwrite)."
        )
    world = worlds.pop()
    status = []
    for r in range(world):
        p = parts.get((r, world))
        if p is None:
            status.append({"rank": r, "state": "missing", "path": None, "meta": {}})
            continue
        state = run_state(p)
        if state is not None:  # a newer run of this rank is in progress (or died)
            mp = meta_path(working_path(p))
            meta = _read_meta(mp)
            status.append({"rank": r, "state": state, "path": str(p), "meta": meta})
            continue
        meta = _read_meta(meta_path(p)) if meta_path(p).is_file() else {}
        state = "complete" if p.is_file() and meta.get("status") == "complete" else "missing"
        status.append({"rank": r, "state": state, "path": str(p), "meta": meta})
    return world, status


def _read_meta(path: Path) -> dict:
    from paddle_scorer.jsonio import read_json_file

    return read_json_file(path)


def _verified_part(s: dict) -> list[dict]:
    """A complete part's records, checked against its .meta.json: every line JSON, the count, the ids in
    order and the file's sha256 (a part edited after its worker finished is refused, never assembled)."""
    from paddle_scorer.runs.output_file import file_digest, ids_digest

    path, meta, rank = Path(s["path"]), s["meta"], s["rank"]
    records = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                rec = None
            if not isinstance(rec, dict) or "id" not in rec:
                raise UsageError(f"{path}:{lineno}: not an output record (a JSON object with an id); the part was "
                                 f"damaged: rerun rank {rank} with --overwrite (it alone).") from None
            records.append(rec)
    problems = []
    if meta.get("records") is not None and len(records) != meta["records"]:
        problems.append(f"it has {len(records)} records but its .meta.json says {meta['records']}")
    elif meta.get("ids_sha256") and ids_digest([r.get("id") for r in records]) != meta["ids_sha256"]:
        problems.append("its ids are not the ones (or not in the order) its .meta.json records")
    elif meta.get("output_sha256") and file_digest(path) != meta["output_sha256"]:
        problems.append("its content changed after the worker finished (sha256 differs from its .meta.json)")
    if problems:
        raise UsageError(f"part {path.name} of rank {rank}: {problems[0]}; it was modified after its worker finished: "
                         f"rerun rank {rank} (the same launch command with --resume redoes it).")
    return records


def gather(output: Path, metrics_fn=None, launch: str | None = None) -> dict | None:
    """Assemble ``output`` from complete, verified parts, in input order. Returns the final meta, or None if
    parts are missing or running.

    ``launch``: only parts written by this launch (same launcher endpoints) count as complete.
    """
    from paddle_scorer.runs.output_file import check_output_path, ids_digest, publish

    output = Path(output)
    with _lock(output):
        world, status = part_status(output)
        if world is None:
            raise UsageError(f"no part files for {output} (expected {parts_dir(output)}/part-*-of-*.jsonl); run the job first.")
        if any(s["state"] != "complete" for s in status):
            return None
        if launch is not None and any(s["meta"].get("worker", {}).get("launch") != launch for s in status):
            return None
        idents = [s["meta"].get("identity") for s in status]
        if any(c != idents[0] for c in idents):
            bad = [s["rank"] for s, c in zip(status, idents) if c != idents[0]]
            raise UsageError(
                f"part files of {output} were produced with different configurations (ranks {bad} differ from rank 0); "
                "rerun those ranks with the same options, or --overwrite."
            )
        inputs = {(s["meta"].get("input_records"), s["meta"].get("input_ids_sha256")) for s in status}
        if len(inputs) > 1:
            raise UsageError(f"part files of {output} were produced from different inputs (the input file changed "
                             "between workers); rerun with --resume so every rank sees the same input.")
        parts = [_verified_part(s) for s in status]
        records = []
        for j in range(max(len(p) for p in parts)):
            for r in range(world):
                if j < len(parts[r]):
                    records.append(parts[r][j])
        ids = [r["id"] for r in records]
        n_input, ids_sha = inputs.pop()
        if len({record_key(i) for i in ids}) != len(ids):
            raise UsageError(f"part files of {output} contain duplicate ids; rerun with --overwrite.")
        if (n_input is not None and len(records) != n_input) or (ids_sha and ids_digest(ids) != ids_sha):
            raise UsageError(
                f"the parts of {output} hold {len(records)} records but the input had {n_input}, or not in input order; "
                "a part is stale or was edited: rerun with --resume."
            )
        check_output_path(output, [], resume=False, overwrite=True, what="gather's output")
        meta = _assembled_meta(status, records, ids, world, metrics_fn)
        meta = publish(output, records, lambda sha: dict(meta, output_sha256=sha),
                       done=f"{output} had just been assembled ({len(records)} records, with its .meta.json); "
                            "nothing is lost.")
        meta["_records"] = records
        return meta


def _assembled_meta(status: list[dict], records: list[dict], ids: list, world: int, metrics_fn) -> dict:
    """The provenance of an assembled output: rank 0's, without the per-worker fields, with every worker's counts."""
    from paddle_scorer.runs.output_file import ids_digest

    base = dict(status[0]["meta"])
    labels = (base.get("identity") or {}).get("labels")
    meta = {k: v for k, v in base.items()
            if k not in ("counts", "seconds", "seconds_per_record", "worker", "metrics", "records", "ids_sha256",
                         "output_sha256", "resume")}
    meta.update({
        "status": "complete",
        "world_size": world,
        "counts": {"total": len(records)},
        "records": len(records),
        "ids_sha256": ids_digest(ids),
        "workers": [{"rank": s["rank"], "host": s["meta"].get("worker", {}).get("host"),
                     "counts": s["meta"].get("counts"), "seconds": s["meta"].get("seconds"),
                     "started": s["meta"].get("started"), "finished": s["meta"].get("finished"),
                     "prefix_reuse": s["meta"].get("prefix_reuse")} for s in status],
        "started": min(s["meta"].get("started", "") for s in status),
        "finished": max(s["meta"].get("finished", "") for s in status),
    })
    if metrics_fn is not None and labels:
        meta["metrics"] = metrics_fn(records, labels)
    return meta
