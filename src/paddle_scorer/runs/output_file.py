"""A run's output, from the first check to the final rename: the guarantees in one place.

* **Checked up front.** ``--output`` may not be a directory, a device or pipe, a ``.meta.json``, an input
  file, or an existing output without ``--resume``/``--overwrite``; ``--overwrite`` replaces only a file
  that has paddle-scorer's ``.meta.json`` next to it (:func:`check_output_path`).
* **Replaced only by complete results.** A run writes a hidden working file next to the output
  (``.out.jsonl.inprogress`` and its ``.meta.json``), appended and fsynced per batch (or per
  streamed block). Only when every record is scored is it rewritten in input order and renamed onto
  ``--output`` (then its ``.meta.json``); until then an old output (``--overwrite``) is untouched, and a
  killed run leaves the old output and a working file that ``--resume`` continues.
* **One identity.** The working file's meta records the run's identity (:mod:`paddle_scorer.runs.identity`);
  ``--resume`` compares it key by key and refuses a run with different options, model or adapter.
  Every output line carries ``input_fingerprint``, a hash of the input record that produced it: on
  resume, records whose input changed are rescored, records whose id left the input are dropped, and
  the counts are reported (never kept stale).
* **Files follow the umask** (temporary files are created 0600 by ``mkstemp``; they are chmod-ed
  before the rename).

The same class writes the part files of a sharded run (``<output>.parts/part-R-of-W.jsonl``); see
:mod:`paddle_scorer.runs.sharding` for their assembly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paddle_scorer.jsonio import meta_path, read_json_file, record_key, stream_into, write_json_atomic, write_json_temp
from paddle_scorer.errors import UsageError
from paddle_scorer.runs.input_index import fingerprint  # noqa: F401 - the input fingerprint every line carries
from paddle_scorer.process.signals import InterruptedAfterCommit, pid_alive, signals_held


def working_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.inprogress")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_default(path: Path) -> None:
    """What a plain ``open(path, "w")`` would have given (``mkstemp`` makes 0600 files)."""
    os.chmod(path, 0o666 & ~_umask())


def same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def check_output_path(output: Path, inputs: list[Path], *, resume: bool, overwrite: bool, what: str = "--output") -> None:
    """Refuse an output path that would destroy something or mix results, before anything is loaded."""
    output = Path(output)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one.")
    if output.is_dir():
        raise UsageError(f"{what} {output} is a directory; pass a file path such as {output}/scores.jsonl.")
    if output.name.endswith(".meta.json"):
        raise UsageError(f"{what} {output} is a provenance file name (.meta.json); pass the results file, e.g. scores.jsonl.")
    if output.name.endswith(".inprogress") or output.parent.name.endswith(".parts"):
        raise UsageError(f"{what} {output} is one of paddle-scorer's own working files; pass the results file.")
    for p, role in ((output, ""), (meta_path(output), "its provenance file ")):
        if p.exists() and not p.is_file():  # a device (/dev/null), a pipe, a socket, or a folder
            raise UsageError(f"{what} {output}: {role}{p} exists and is not a regular file; the result is renamed "
                             "into place, which would replace it: pass a file path.")
    for src in inputs:
        if src is not None and same_file(output, Path(src)):
            raise UsageError(f"{what} {output} is the input file {src}; writing it would destroy the input: pass "
                             "another path.")
        if src is not None and same_file(output, meta_path(Path(src))):
            raise UsageError(f"{what} {output} is the provenance of the input {src}; pass another path.")
    state = run_state(output)
    if state in ("running", "running elsewhere"):
        wm = read_json_file(meta_path(working_path(output))) if meta_path(working_path(output)).is_file() else {}
        alive = "is writing" if state == "running" else "was writing (this machine cannot tell whether it still is)"
        raise UsageError(f"another paddle-scorer run (process {wm.get('pid')} on {wm.get('host')}) {alive} {output}; "
                         "two runs on one output would replace each other's results: wait for it or stop it (if it is "
                         f"gone, delete {working_path(output).name}.meta.json and pass --resume).")
    if overwrite and output.is_file() and output.stat().st_size and not is_our_output(output):
        raise UsageError(f"{output} exists and has no paddle-scorer {meta_path(output).name} next to it, so it is not "
                         "an output of ours; --overwrite only replaces outputs: delete it yourself or pass another path.")
    work = working_path(output)
    if not (resume or overwrite):
        if output.exists():
            raise UsageError(f"{output} already exists; pass --resume to continue it or --overwrite to start over.")
        if work.exists():
            raise UsageError(
                f"an interrupted run left partial results for {output} (in {work.name}); pass --resume to continue "
                "it or --overwrite to start over."
            )


def is_our_output(output: Path) -> bool:
    """Whether ``output`` has a provenance file written by paddle-scorer next to it."""
    try:
        meta = json.loads(meta_path(Path(output)).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and str(meta.get("tool", "")).startswith("paddle-scorer")


def ids_digest(ids: list) -> str:
    h = hashlib.sha256()
    for rid in ids:
        h.update(record_key(rid).encode("utf-8") + b"\n")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return stream_into(hashlib.sha256(), path).hexdigest()


def iter_complete_lines(path: Path):
    """``(raw line, start offset)`` of every complete line of ``path`` (a torn last line from a killed run is dropped),
    read a line at a time, and whether it parsed: ``(raw, start, record)``. A malformed line in the middle is refused
    (the file was edited)."""
    with open(path, "rb") as fh:
        pos, lineno = 0, 0
        for raw in fh:
            lineno += 1
            if not raw.endswith(b"\n"):
                return  # torn last line
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                if not fh.peek(1):
                    return  # a half-written last line that happens to end in a newline byte
                raise UsageError(f"{path}:{lineno}: not a JSON line (the file was edited or damaged); use "
                                 "--overwrite to start over.") from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise UsageError(f"{path}:{lineno}: not an output record (no id); use --overwrite to start over.")
            yield raw, pos, rec
            pos += len(raw)


def read_complete_lines(path: Path) -> tuple[list[dict], int]:
    """Records of every complete line of ``path`` and the byte length they occupy (:func:`iter_complete_lines`)."""
    records, good = [], 0
    for raw, start, rec in iter_complete_lines(path):
        records.append(rec)
        good = start + len(raw)
    return records, good


def identity_differences(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


@dataclass
class ResumeReport:
    kept: int = 0  # records already done, input unchanged
    changed: int = 0  # input record changed since: rescored
    removed: int = 0  # id no longer in the input: dropped
    source: str | None = None  # what was continued: "interrupted run" | "complete output"

    def to_dict(self) -> dict:
        return {"kept": self.kept, "rescored_changed": self.changed, "dropped_removed": self.removed,
                "continued": self.source}


@dataclass
class RunOutput:
    """One output file (or part file) of a run; see the module docstring. It holds no record: per input position only
    where its line is in the working file (12 bytes a record); resume and the final input-order rewrite read the lines
    back from there. :meth:`reconcile` first (with the run's :class:`~paddle_scorer.runs.input_index.InputIndex`)."""

    output: Path
    identity: dict
    resume: bool = False
    overwrite: bool = False
    report: ResumeReport = field(default_factory=ResumeReport)

    def __post_init__(self):
        self.output = Path(self.output)
        self.working = working_path(self.output)
        self.working_meta = meta_path(self.working)
        self._fh = None
        self.offsets = np.zeros(0, dtype=np.int64)  # by input position: its line's offset in the working file, or -1
        self.lengths = np.zeros(0, dtype=np.int32)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._continues = None  # (file to continue, its meta) with --resume
        if self.resume:
            self._load_previous()
        else:
            for p in (self.working, self.working_meta):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ resume

    def _load_previous(self) -> None:
        if self.working.exists():
            source, source_meta, label = self.working, self.working_meta, "interrupted run"
        elif self.output.exists():
            source, source_meta, label = self.output, meta_path(self.output), "complete output"
        else:
            return  # nothing to continue: a fresh run
        if not source_meta.is_file():
            raise UsageError(
                f"{source} has no {source_meta.name}, so it is unknown what produced it; refusing to resume into it: "
                "use --overwrite or another --output."
            )
        meta = read_json_file(source_meta)
        old = meta.get("identity")
        if not isinstance(old, dict):
            raise UsageError(f"{source_meta} records no run identity (written by an older paddle-scorer?); resuming "
                             "could mix results: use --overwrite.")
        diffs = identity_differences(old, self.identity)
        if diffs:
            raise UsageError(
                f"{self.output} was produced with a different configuration ({', '.join(diffs)} differ); resuming "
                "would mix results: use the same options, --overwrite, or another --output."
            )
        self._continues = (source, meta)
        self.report.source = label

    def _copy_to_working(self, meta: dict, good: int) -> None:
        """Continue a complete output in a working copy (its first ``good`` bytes), so the output stays until the end."""
        fd, tmp = tempfile.mkstemp(dir=self.output.parent, prefix=f".{self.output.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh, open(self.output, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
                fh.truncate(good)
            chmod_default(Path(tmp))
            os.replace(tmp, self.working)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json_atomic(self.working_meta, meta)

    def reconcile(self, index, shard) -> np.ndarray:
        """Which of ``shard``'s input positions (an :class:`~paddle_scorer.runs.input_index.InputIndex` and a
        :class:`~paddle_scorer.runs.input_index.Shard`) are still to score: a boolean array by position, True for
        records not done, or done from an input that has changed since. Lines of ids no longer in this shard's input
        are dropped (not copied to the output). All counted in :attr:`report`."""
        from paddle_scorer.runs.input_index import fingerprint_int

        n = index.n
        self.offsets = np.full(n, -1, dtype=np.int64)
        self.lengths = np.zeros(n, dtype=np.int32)
        line_fp = np.zeros(n, dtype=np.uint64)
        gone: set[str] = set()
        if self._continues:
            source, source_meta = self._continues
            good = 0
            for raw, start, rec in iter_complete_lines(source):
                good = start + len(raw)
                k = record_key(rec["id"])
                pos = index.position(k)
                if pos < 0 or pos not in shard:
                    gone.add(k)
                    continue
                self.offsets[pos], self.lengths[pos] = start, len(raw)  # a later line of one id replaces an earlier
                line_fp[pos] = fingerprint_int(rec.get("input_fingerprint"))
            if source == self.working:
                with open(self.working, "r+b") as fh:
                    fh.truncate(good)  # a torn last line from a killed run
            else:
                self._copy_to_working(source_meta, good)
        mine = np.zeros(n, dtype=bool)
        mine[shard.rank::shard.world] = True
        done = self.offsets >= 0
        same = done & (line_fp == index.fingerprints)
        changed = done & ~same
        self.offsets[changed] = -1
        self.report.kept += int(same.sum())
        self.report.changed += int(changed.sum())
        self.report.removed += len(gone)
        return mine & ~same

    # ------------------------------------------------------------------ writing

    def start(self, meta: dict) -> None:
        meta = dict(meta, identity=self.identity, status="running", pid=os.getpid(), host=socket.gethostname())
        write_json_atomic(self.working_meta, meta)
        if not self.working.exists():
            self.working.touch()
            chmod_default(self.working)

    def write_batch(self, records: list[dict], positions: list[int]) -> None:
        """Append ``records`` (those of input ``positions``) to the working file in one write, and fsync it: a kill
        lands between batches, not after part of one (written line by line, a batch of long records reached the disk
        in buffer-sized pieces; resume keeps only whole lines either way)."""
        if self._fh is None:
            self._fh = open(self.working, "ab")
        pos = self._fh.tell()
        lines = []
        for rec, at in zip(records, positions, strict=True):
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            lines.append(line)
            self.offsets[at], self.lengths[at] = pos, len(line)
            pos += len(line)
        self._fh.write(b"".join(lines))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def lines(self, positions):
        """The done lines (bytes) of input ``positions``, in that order, read back from the working file one at a
        time."""
        with open(self.working, "rb") as fh:
            for at in positions:
                fh.seek(int(self.offsets[at]))
                yield fh.read(int(self.lengths[at]))

    def finalize(self, positions, ids_sha256: str, meta: dict, summarise=None) -> None:
        """Rewrite the records of input ``positions`` (a sequence, in input order; ``ids_sha256`` the digest of their
        ids) in that order and rename onto the output, then its meta (:func:`publish`), streaming: one record in memory
        at a time. ``summarise`` (an object with ``add(record)`` and ``result() -> dict``, e.g. a metrics collector)
        adds what it computes from the records to the meta."""
        self.close()
        idx = np.asarray(positions, dtype=np.int64)
        missing = idx[self.offsets[idx] < 0] if idx.size else idx
        if missing.size:
            raise UsageError(f"{self.output}: the record at input position {int(missing[0])} has no result in the "
                             "working file; nothing was published: rerun with --resume.")

        def lines():
            for line in self.lines(positions):
                if summarise is not None:
                    summarise.add(json.loads(line))
                yield line

        def final_meta(sha: str) -> dict:
            if summarise is not None:
                meta.update(summarise.result())
            final = dict(meta, identity=self.identity, status="complete", resume=self.report.to_dict(),
                         records=len(idx), ids_sha256=ids_sha256, output_sha256=sha)
            final.pop("pid", None)
            return final

        final = publish(self.output, lines(), final_meta, also_remove=(self.working, self.working_meta),
                        done=f"{self.output} had just been completed ({len(idx)} records, with its .meta.json); "
                             "nothing is lost.")
        meta.clear()
        meta.update(final)


def publish(output: Path, lines, make_meta, *, also_remove=(), done: str) -> dict:
    """Publish a complete output: ``lines`` (JSON lines as bytes, each ending in a newline, in order) written to a hidden
    temporary file next to ``output`` (fsynced, permissions from the umask), its provenance ``make_meta(sha256 of that
    file)`` to another, then both renamed into place with stop signals held, so Ctrl-C/SIGTERM never separates results
    from their provenance (a SIGKILL between the renames leaves what ``--resume``/``gather`` redo); ``also_remove`` (the
    working files) goes with them. A stop signal that arrived meanwhile is honoured after, as
    :class:`InterruptedAfterCommit` saying ``done``. Nothing is left behind on failure. The one publish step of a run
    and of ``gather``; nothing but one line is held in memory. Returns the meta written."""
    output = Path(output)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    meta_tmp = None
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh:
            for line in lines:
                fh.write(line)
                h.update(line)
            fh.flush()
            os.fsync(fh.fileno())
        chmod_default(Path(tmp))
        final = make_meta(h.hexdigest())
        meta_tmp = write_json_temp(meta_path(output), final)
        with signals_held() as got:
            os.replace(tmp, output)
            os.replace(meta_tmp, meta_path(output))
            for p in also_remove:
                Path(p).unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if meta_tmp is not None:
            Path(meta_tmp).unlink(missing_ok=True)
        raise
    if got:
        raise InterruptedAfterCommit(done)
    return final


def run_state(output: Path) -> str | None:
    """What is going on with ``output`` right now: ``"running"`` (a live process is writing a new version),
    ``"killed"`` (a run died and left partial results), or None."""
    wm = meta_path(working_path(Path(output)))
    if not wm.is_file():
        return None
    try:
        meta = json.loads(wm.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "killed"
    if meta.get("host") == socket.gethostname() and meta.get("pid") != os.getpid() and pid_alive(meta.get("pid")):
        return "running"  # (our own pid: an earlier run in this process, e.g. through the Python API, was stopped)
    return "killed" if meta.get("host") in (None, socket.gethostname()) else "running elsewhere"
