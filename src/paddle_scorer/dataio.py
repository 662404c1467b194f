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
    """``[(id, record, where)]``; ids from ``id_field`` or the 0-based line index; all checked.

    Errors name the file and line: malformed JSON, bytes that are not UTF-8, a line that is not an
    object, an id that is not a string or a number, a duplicate id (ids compare by their JSON form,
    so ``1`` and ``"1"`` are different ids)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--input {path} is a directory; pass a JSONL file with one JSON object per line.")
    if not path.is_file():
        raise UsageError(f"--input {path} does not exist; pass a JSONL file with one JSON object per line.")
    out = []
    seen: dict[str, str] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{where}: not UTF-8 text (byte {exc.start + 1}: {raw[exc.start:exc.start + 1]!r}); "
                                 "re-encode the file as UTF-8.") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix that line.") from None
            except RecursionError:
                raise UsageError(f"{where}: JSON nested too deeply; fix that line.") from None
            if not isinstance(rec, dict):
                raise UsageError(f"{where}: expected a JSON object per line, got {type(rec).__name__}.")
            rid = rec.get(id_field, len(out))
            if isinstance(rid, (dict, list, bool)) or rid is None or (isinstance(rid, float) and rid != rid):
                raise UsageError(f"{where}: the {id_field!r} field must be a string or a number, "
                                 f"found {json.dumps(rid)}.")
            key = record_key(rid)
            if key in seen:
                raise UsageError(f"{where}: id {key} already used at {seen[key]}; ids must be unique (resume relies on them).")
            seen[key] = where
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
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_file(path: Path) -> dict:
    """A JSON object from a file we (or a user) wrote; a clear error for anything else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); fix it or start over with --overwrite.") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object; fix it or start over with --overwrite.")
    return data


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
