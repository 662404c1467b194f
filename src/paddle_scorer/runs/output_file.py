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
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from paddle_scorer.jsonio import meta_path, read_json_file, record_key, stream_into, write_json_atomic, write_json_temp
from paddle_scorer.errors import UsageError
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


def fingerprint(record: dict) -> str:
    """A short hash of an input record's content (canonical JSON): what resume compares per id."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def ids_digest(ids: list) -> str:
    h = hashlib.sha256()
    for rid in ids:
        h.update(record_key(rid).encode("utf-8") + b"\n")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return stream_into(hashlib.sha256(), path).hexdigest()


def read_complete_lines(path: Path) -> tuple[list[dict], int]:
    """Records of every complete line of ``path`` (a torn last line from a killed run is dropped) and the
    byte length they occupy. A malformed line in the middle is refused (the file was edited)."""
    data = Path(path).read_bytes()
    records, pos, good, lineno = [], 0, 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # torn last line
        lineno += 1
        line = data[pos:nl]
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if data.find(b"\n", nl + 1) < 0 and nl + 1 >= len(data):
                break  # a half-written last line that happens to end in a newline byte
            raise UsageError(f"{path}:{lineno}: not a JSON line (the file was edited or damaged); use --overwrite "
                             "to start over.") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise UsageError(f"{path}:{lineno}: not an output record (no id); use --overwrite to start over.")
        records.append(rec)
        pos = nl + 1
        good = pos
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
    """One output file (or part file) of a run; see the module docstring."""

    output: Path
    identity: dict
    resume: bool = False
    overwrite: bool = False
    done: dict = field(default_factory=dict)  # record key -> record (kept from a previous run)
    report: ResumeReport = field(default_factory=ResumeReport)

    def __post_init__(self):
        self.output = Path(self.output)
        self.working = working_path(self.output)
        self.working_meta = meta_path(self.working)
        self._fh = None
        self.output.parent.mkdir(parents=True, exist_ok=True)
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
        records, good = read_complete_lines(source)
        if source == self.working:
            with open(self.working, "r+b") as fh:
                fh.truncate(good)
        else:  # continue a complete output: a working copy, so the output stays until the new one is complete
            self._copy_to_working(records, meta)
        self.report.source = label
        self.done = {record_key(r["id"]): r for r in records}

    def _copy_to_working(self, records: list[dict], meta: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.output.parent, prefix=f".{self.output.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            chmod_default(Path(tmp))
            os.replace(tmp, self.working)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json_atomic(self.working_meta, meta)

    def reconcile(self, items: list, fingerprints: dict[str, str]) -> list:
        """Items still to score: not done, or done from an input that has changed since. Drops done records
        whose id is no longer in the input. ``fingerprints``: record key -> input fingerprint."""
        keys = {record_key(it.id) for it in items}
        for k in [k for k in self.done if k not in keys]:
            del self.done[k]
            self.report.removed += 1
        todo = []
        for it in items:
            k = record_key(it.id)
            old = self.done.get(k)
            if old is not None and old.get("input_fingerprint") == fingerprints.get(k):
                self.report.kept += 1
                continue
            if old is not None:
                del self.done[k]
                self.report.changed += 1
            todo.append(it)
        return todo

    # ------------------------------------------------------------------ writing

    def start(self, meta: dict) -> None:
        meta = dict(meta, identity=self.identity, status="running", pid=os.getpid(), host=socket.gethostname())
        write_json_atomic(self.working_meta, meta)
        if not self.working.exists():
            self.working.touch()
            chmod_default(self.working)

    def write_batch(self, records: list[dict]) -> None:
        if self._fh is None:
            self._fh = open(self.working, "a", encoding="utf-8")
        for rec in records:
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done[record_key(rec["id"])] = rec
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finalize(self, order: list, meta: dict, summarise=None) -> list[dict]:
        """Rewrite in input order, rename onto the output, then its meta (:func:`publish`). Returns the records in
        order. ``summarise(records) -> dict`` adds computed results (metrics) to the meta before it is written."""
        self.close()
        records = [self.done[record_key(rid)] for rid in order]
        if summarise is not None:
            meta.update(summarise(records))

        def final_meta(sha: str) -> dict:
            final = dict(meta, identity=self.identity, status="complete", resume=self.report.to_dict(),
                         records=len(records), ids_sha256=ids_digest(order), output_sha256=sha)
            final.pop("pid", None)
            return final

        final = publish(self.output, records, final_meta, also_remove=(self.working, self.working_meta),
                        done=f"{self.output} had just been completed ({len(records)} records, with its .meta.json); "
                             "nothing is lost.")
        meta.clear()
        meta.update(final)
        return records


def publish(output: Path, records: list[dict], make_meta, *, also_remove=(), done: str) -> dict:
    """Publish a complete output: the records written to a hidden temporary file next to ``output`` (fsynced,
    permissions from the umask), its provenance ``make_meta(sha256 of that file)`` to another, then both renamed into
    place with stop signals held, so Ctrl-C/SIGTERM never separates results from their provenance (a SIGKILL between
    the renames leaves what ``--resume``/``gather`` redo); ``also_remove`` (the working files) goes with them. A stop
    signal that arrived meanwhile is honoured after, as :class:`InterruptedAfterCommit` saying ``done``. Nothing is left
    behind on failure. The one publish step of a run and of ``gather``. Returns the meta written."""
    output = Path(output)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    meta_tmp = None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        chmod_default(Path(tmp))
        final = make_meta(file_digest(Path(tmp)))
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
