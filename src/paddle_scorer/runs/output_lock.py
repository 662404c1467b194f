"""One run per output at a time: a lock taken before anything else is touched, held until the run ends.

A second run on the same ``--output`` (or a second launcher worker of the same rank) is refused with one sentence
before it reads its input or loads a model, however close together the two start: the first run's working file and
provenance are written only once the model is loaded, so they cannot be the mark. The lock is ``flock`` on a hidden
file next to the output (``.<name>.running``), removed when the run ends; a run that took the lock on a file another
run removed meanwhile takes it again on the new one (the inode is compared), so two runs never both hold it.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from paddle_scorer.errors import UsageError


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.running")


def _target(output: Path) -> Path:
    """What this process writes: the output, or its part under ``paddle.distributed.launch``."""
    from paddle_scorer.process.launcher import worker_from_env

    worker = worker_from_env()
    if not worker.distributed:
        return output
    from paddle_scorer.runs.sharding import part_path

    return part_path(output, worker)


def _acquire(path: Path, output: Path) -> int | None:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            return None  # a folder we cannot write to: the run's own checks say so, in their words
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another paddle-scorer run is writing {output} (it holds {path.name}); two runs on one output would "
                "replace each other's results: wait for it to finish or stop it, then pass --resume.") from None
        except OSError:
            os.close(fd)
            return None  # a file system without locks: nothing to hold
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the run that held it removed it meanwhile: take the new one


@contextmanager
def output_held(output: Path | None):
    """Hold the output of a run (None: no output, nothing to hold) for the ``with`` block."""
    if output is None:
        yield
        return
    output = Path(output)
    target = _target(output)
    path = lock_path(target)
    made = _make_folders(path.parent)  # a new output folder (or a launcher's parts folder) is locked in too
    fd = None
    try:
        fd = _acquire(path, output)
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
        for folder in made:  # folders this run made and left empty (it was refused, or failed before writing)
            try:
                folder.rmdir()
            except OSError:
                break


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first (empty ones are removed at the end).
    A folder that cannot be made is left to the run's own checks, which say why in their words."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return []
    return missing
