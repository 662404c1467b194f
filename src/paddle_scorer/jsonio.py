"""JSON files in and out: the checked JSONL reader, atomic JSON writing, ids.

* Input errors name the file and line; a record must be unambiguous JSON text: UTF-8, no duplicate
  keys in an object, no lone surrogate escapes (they cannot be written back as UTF-8), an id that is
  a string or a finite number.
* How a run's output is written, resumed and replaced is :mod:`paddle_scorer.runs.output_file`'s business.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from paddle_scorer.errors import UsageError


def read_jsonl(path: str | Path, id_field: str = "id", max_line_bytes: int | None = None) -> list[tuple[object, dict, str]]:
    """``[(id, record, where)]``; ids from ``id_field`` or the 0-based line index; all checked (:func:`iter_jsonl`),
    ids unique.

    Errors name the file and line: malformed JSON, bytes that are not UTF-8, a line that is not an
    object (or one with a key twice, or a lone surrogate escape), an id that is not a string or a finite
    number, a duplicate id (ids compare by their JSON form, so ``1`` and ``"1"`` are different ids).
    The whole file is held: a run streams its input instead (:mod:`paddle_scorer.runs.input_index`)."""
    out = []
    seen: dict[str, tuple[str, bool]] = {}  # record key -> (where, the id was given automatically)
    for rid, rec, where in iter_jsonl(path, id_field, max_line_bytes=max_line_bytes or MAX_LINE_BYTES):
        key = record_key(rid)
        automatic = id_field not in rec
        if key in seen:
            raise duplicate_id(key, seen[key], (where, automatic), id_field)
        seen[key] = (where, automatic)
        out.append((rid, rec, where))
    return out


def check_input_path(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"--input {path} is a directory; pass a JSONL file with one JSON object per line.")
    if not path.exists():
        raise UsageError(f"--input {path} does not exist; pass a JSONL file with one JSON object per line.")


MAX_LINE_BYTES = 8 << 20  # 8 MB: ~2M tokens of text, past any model's context (--max-line-size)


def iter_jsonl(path: str | Path, id_field: str = "id", name: str | None = None, max_line_bytes: int = MAX_LINE_BYTES):
    """``(id, record, where)`` of every record of ``path``, one at a time, each checked as :func:`read_jsonl` says
    except the ids' uniqueness (a streamed run checks it on its index). ``name``: how ``where`` names the file (a
    spooled copy of a pipe is named as the pipe). A file without records is refused, and so is a line longer than
    ``max_line_bytes``, by its length alone: nothing of it is parsed or tokenized (a 50 MB line once took 12 GB of
    memory in the tokenizer before the process was aborted)."""
    path = Path(path)
    check_input_path(path)
    label = name or str(path)
    count = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(iter(lambda: fh.readline(max_line_bytes + 1), b""), 1):
            where = f"{label}:{lineno}"
            if len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")):
                raise UsageError(f"{where}: the line is longer than {max_line_bytes:,} bytes (--max-line-size), so it "
                                 "was not read further; shorten the record, or pass a larger --max-line-size if "
                                 "it is meant to be this long.")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{where}: not UTF-8 text (byte {exc.start + 1}: {raw[exc.start:exc.start + 1]!r}); "
                                 "re-encode the file as UTF-8.") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            rec = parse_record(line, where)
            rid = rec.get(id_field, count)
            if isinstance(rid, (dict, list, bool)) or rid is None or (isinstance(rid, float) and not math.isfinite(rid)):
                raise UsageError(f"{where}: the {id_field!r} field must be a string or a finite number, "
                                 f"found {json.dumps(rid)}.")
            count += 1
            yield rid, rec, where
    if not count:
        raise UsageError(f"--input {label} has no records.")


def duplicate_id(key: str, first: tuple[str, bool], second: tuple[str, bool], id_field: str) -> UsageError:
    """The refusal of a second record with the id ``key``: ``first``/``second`` are ``(where, automatic)`` (an
    automatic id is the record's position, given when it has no ``id_field``)."""
    (first_at, first_automatic), (where, automatic) = first, second
    if automatic or first_automatic:
        auto_at, given_at = (where, first_at) if automatic else (first_at, where)
        return UsageError(
            f"{where}: the record at {auto_at} has no {id_field!r}, so it is numbered by its position "
            f"(from 0) as {key}, and {given_at} gives {id_field!r} {key}: automatic and given ids collide; "
            f"give every record an {id_field!r}, or none."
        )
    return UsageError(f"{where}: id {key} already used at {first_at}; ids must be unique (resume relies on them).")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen.add(k)
    return dict(pairs)


def parse_record(line: str, where: str) -> dict:
    """One JSONL line as an object, or a UsageError naming ``where`` (file:line)."""
    try:
        rec = json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise UsageError(f"{where}: the key {str(exc)!r} appears twice in one object; JSON readers disagree on which "
                         "value wins, so fix that line.") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix that line.") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply; fix that line.") from None
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: expected a JSON object per line, got {type(rec).__name__}.")
    if "\\ud" in line.lower():  # only a \u escape can produce a lone surrogate
        try:
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{where}: a string holds a lone surrogate escape (\\ud800-\\udfff without its pair), "
                             "which is not text and cannot be written as UTF-8; fix that line.") from None
    return rec


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def write_json_temp(path: Path, data: dict) -> Path:
    """``data`` as JSON in a hidden temporary file next to ``path`` (synced, permissions from the umask),
    ready to be renamed onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; outputs follow the umask
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = write_json_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_file(path: Path) -> dict:
    """A JSON object from a file we (or a user) wrote; a clear error for anything else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); fix it or start over with --overwrite.") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object; fix it or start over with --overwrite.")
    return data


def record_key(rid) -> str:
    """Ids compare by their JSON form, so 1 and "1" stay different records."""
    return json.dumps(rid)


def stream_into(h, path, chunk: int = 1 << 20):
    """Feed a file to a hashlib object 1 MiB at a time (never the whole file in memory); returns ``h``."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h
