"""Data-parallel scoring under ``python -m paddle.distributed.launch``.

Each worker reads its rank and world size from the launcher's environment, scores the records
at input positions ``i`` with ``i % world == rank`` (a disjoint, deterministic, length-balanced shard; every worker
indexes the whole input, :mod:`paddle_scorer.runs.input_index`), and writes its own part file ``<output>.parts/part-<rank>-of-<world>.jsonl`` (flushed per batch, resumable exactly
like a single run). No collective is needed for the scores: when a worker finishes and finds every
part complete, it assembles ``<output>`` in input order (part ``r``'s ``j``-th record is input
record ``j * world + r``), streaming the parts side by side. ``paddle-scorer gather <output>`` does the same by
hand.
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


class _Part:
    """One complete part read line by line while the output is assembled, checked against its .meta.json as it goes:
    every line JSON with an id, and at the end the count, the ids in order and the file's sha256 (a part edited after
    its worker finished is refused, never assembled)."""

    def __init__(self, s: dict):
        import hashlib

        self.path, self.meta, self.rank = Path(s["path"]), s["meta"], s["rank"]
        self.fh = open(self.path, "rb")
        self.lineno = 0
        self.sha, self.ids = hashlib.sha256(), hashlib.sha256()

    def next(self) -> tuple[bytes, dict] | None:
        raw = self.fh.readline()
        if not raw:
            return None
        self.lineno += 1
        self.sha.update(raw)
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            rec = None
        if not isinstance(rec, dict) or "id" not in rec or not raw.endswith(b"\n"):
            raise UsageError(f"{self.path}:{self.lineno}: not an output record (a JSON object with an id); the part was "
                             f"damaged: rerun rank {self.rank} with --overwrite (it alone).") from None
        self.ids.update(record_key(rec["id"]).encode("utf-8") + b"\n")
        return raw, rec

    def check(self) -> None:
        """After its last expected line: nothing more, and what its .meta.json recorded."""
        meta, problems = self.meta, []
        lines = self.lineno + sum(1 for _ in self.fh)  # lines past the expected ones, if any
        if meta.get("records") is not None and lines != meta["records"]:
            problems.append(f"it has {lines} records but its .meta.json says {meta['records']}")
        elif lines != self.lineno:
            problems.append(f"it has {lines} records, more than the input gives its rank ({self.lineno})")
        elif meta.get("ids_sha256") and self.ids.hexdigest() != meta["ids_sha256"]:
            problems.append("its ids are not the ones (or not in the order) its .meta.json records")
        elif meta.get("output_sha256") and self.sha.hexdigest() != meta["output_sha256"]:
            problems.append("its content changed after the worker finished (sha256 differs from its .meta.json)")
        if problems:
            raise UsageError(f"part {self.path.name} of rank {self.rank}: {problems[0]}; it was modified after its "
                             f"worker finished: rerun rank {self.rank} (the same launch command with --resume redoes it).")

    def close(self) -> None:
        self.fh.close()


def _interleaved(output: Path, parts: list[_Part], n_input: int, ids_sha: str | None, summary):
    """The output's lines in input order (position ``p`` is part ``p % world``'s next line), checked on the way:
    every part holds exactly its positions, the ids in order are the input's (``ids_sha``)."""
    import hashlib

    world = len(parts)
    ids = hashlib.sha256()
    for p in range(n_input):
        part = parts[p % world]
        got = part.next()
        if got is None:
            part.check()  # its .meta.json's count, when that is what differs
            raise UsageError(f"part {part.path.name} of rank {part.rank} ends after {part.lineno} records but the "
                             f"input had {n_input} (it should hold {len(range(part.rank, n_input, world))}); a part is "
                             "stale or was edited: rerun with --resume.")
        raw, rec = got
        ids.update(record_key(rec["id"]).encode("utf-8") + b"\n")
        if summary is not None:
            summary.add(rec)
        yield raw
    for part in parts:
        part.check()
    if ids_sha and ids.hexdigest() != ids_sha:
        raise UsageError(f"the parts of {output} do not hold the input's ids in input order; a part is stale or was "
                         "edited: rerun with --resume.")


def gather(output: Path, summariser=None, launch: str | None = None) -> dict | None:
    """Assemble ``output`` from complete, verified parts, in input order, streaming (one line of each part in memory).
    Returns the final meta, or None if parts are missing or running. ``summariser(labels)``: an object that sees every
    record (``add``/``result``: the metrics of a classify output), or None.

    ``launch``: only parts written by this launch (same launcher endpoints) count as complete.
    """
    from paddle_scorer.runs.output_file import check_output_path, publish

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
        n_input, ids_sha = inputs.pop()
        if not isinstance(n_input, int):
            raise UsageError(f"the parts of {output} do not record their input's size (written by an older "
                             "paddle-scorer?); rerun with --overwrite.")
        check_output_path(output, [], resume=False, overwrite=True, what="gather's output")
        labels = (status[0]["meta"].get("identity") or {}).get("labels")
        summary = summariser(labels) if (summariser is not None and labels) else None
        meta = _assembled_meta(status, n_input, ids_sha, world)
        parts = [_Part(s) for s in status]
        try:
            def final(sha: str) -> dict:
                return dict(meta, output_sha256=sha, **(summary.result() if summary is not None else {}))

            return publish(output, _interleaved(output, parts, n_input, ids_sha, summary), final,
                           done=f"{output} had just been assembled ({n_input} records, with its .meta.json); "
                                "nothing is lost.")
        finally:
            for p in parts:
                p.close()


def _assembled_meta(status: list[dict], n: int, ids_sha: str | None, world: int) -> dict:
    """The provenance of an assembled output: rank 0's, without the per-worker fields, with every worker's counts."""
    base = dict(status[0]["meta"])
    meta = {k: v for k, v in base.items()
            if k not in ("counts", "seconds", "seconds_per_record", "worker", "metrics", "records", "ids_sha256",
                         "output_sha256", "resume", "windows")}
    meta.update({
        "status": "complete",
        "world_size": world,
        "counts": {"total": n},
        "records": n,
        "ids_sha256": ids_sha,
        "workers": [{"rank": s["rank"], "host": s["meta"].get("worker", {}).get("host"),
                     "counts": s["meta"].get("counts"), "seconds": s["meta"].get("seconds"),
                     "started": s["meta"].get("started"), "finished": s["meta"].get("finished"),
                     "prefix_reuse": s["meta"].get("prefix_reuse")} for s in status],
        "started": min(s["meta"].get("started", "") for s in status),
        "finished": max(s["meta"].get("finished", "") for s in status),
    })
    return meta
