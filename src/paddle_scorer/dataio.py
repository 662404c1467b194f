"""JSONL in, JSONL out: ids, resume, per-batch flushing, provenance.

* Input errors name the file and line.
* Output lines are appended and flushed (fsync) per batch, so a killed run loses at most the batch
  in flight; ``--resume`` keeps every complete line and drops a torn last line.
* When the run completes, the file is rewritten (atomically) in input order.
* ``<output>.meta.json`` holds the provenance; a resume with a different configuration is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from paddle_scorer.errors import UsageError


def read_jsonl(path: str | Path, id_field: str = "id") -> list[tuple[object, dict, str]]:
    """``[(id, record, where)]``; ids from ``id_field`` or the 0-based line index; all checked."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--input {path} does not exist; pass a JSONL file with one JSON object per line.")
    out = []
    seen: dict[object, str] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix that line.") from None
            if not isinstance(rec, dict):
                raise UsageError(f"{where}: expected a JSON object per line, got {type(rec).__name__}.")
            rid = rec.get(id_field, len(out))
            if isinstance(rid, (dict, list)) or rid is None:
                raise UsageError(f"{where}: the {id_field!r} field must be a string or number.")
            if rid in seen:
                raise UsageError(f"{where}: id {rid!r} already used at {seen[rid]}; ids must be unique (resume relies on them).")
            seen[rid] = where
            out.append((rid, rec, where))
    if not out:
        raise UsageError(f"--input {path} has no records.")
    return out


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_done(output: Path) -> tuple[dict[object, dict], int]:
    """Complete records already in ``output`` and the byte length of its complete lines."""
    done: dict[object, dict] = {}
    good = 0
    with open(output, "rb") as fh:
        data = fh.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # torn last line from a killed run
        line = data[pos:nl]
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        done[record_key(rec["id"])] = rec
        pos = nl + 1
        good = pos
    return done, good


def record_key(rid) -> str:
    """Ids compare by their JSON form, so 1 and "1" stay different records."""
    return json.dumps(rid)


class ResultWriter:
    """Appends result lines per batch; rewrites in input order on completion."""

    def __init__(self, output: Path, *, resume: bool, overwrite: bool, run_config: dict):
        self.output = Path(output)
        self.meta_file = meta_path(self.output)
        self.done: dict[object, dict] = {}
        if self.output.exists() and not (resume or overwrite):
            raise UsageError(
                f"{self.output} already exists; pass --resume to continue it or --overwrite to start over."
            )
        if resume and self.output.exists():
            self._check_resumable(run_config)
            self.done, good = read_done(self.output)
            with open(self.output, "r+b") as fh:
                fh.truncate(good)
        elif self.output.exists():
            self.output.unlink()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def _check_resumable(self, run_config: dict) -> None:
        if not self.meta_file.is_file():
            raise UsageError(
                f"{self.output} has no {self.meta_file.name}, so it is unknown what produced it; refusing to "
                "resume into it: use --overwrite or another --output."
            )
        old = json.loads(self.meta_file.read_text()).get("run_config", {})
        diffs = [k for k in sorted(set(old) | set(run_config)) if old.get(k) != run_config.get(k)]
        if diffs:
            raise UsageError(
                f"{self.output} was produced with a different configuration ({', '.join(diffs)} differ); "
                "resuming would mix results: use the same options, --overwrite, or another --output."
            )

    def is_done(self, rid) -> bool:
        return record_key(rid) in self.done

    def write_batch(self, records: list[dict]) -> None:
        if self._fh is None:
            self._fh = open(self.output, "a", encoding="utf-8")
        for rec in records:
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done[record_key(rec["id"])] = rec
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finalize(self, order: list[object]) -> list[dict]:
        """Rewrite the output in input order; returns the records in that order."""
        self.close()
        records = [self.done[record_key(rid)] for rid in order]
        fd, tmp = tempfile.mkstemp(dir=self.output.parent, prefix=f".{self.output.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            os.replace(tmp, self.output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return records
