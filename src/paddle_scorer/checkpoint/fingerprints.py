"""Identities of weights: the adapter's sha256 (provenance, merge records) and a model's content fingerprint
(what ``--resume`` compares). No paddle import.

The model fingerprint hashes the *content* of the config and of every weight file: a file rewritten in place
with the same size and its mtime put back (what ``cp -p`` or ``rsync -a`` over an old copy gives) is a
different model. Hashing is streamed (1 MiB at a time, ~1.1-1.3 GB/s per core; the shards of a sharded checkpoint
are hashed in parallel). A small cache remembers each
file's hash keyed by (path, size, mtime_ns, inode, device, ctime_ns): ``ctime`` is set by the kernel on every
write or ``utime`` and cannot be put back by the user, so a content change always misses the cache. An entry
is stored only once the file is older than :data:`RACY_SECONDS` (a file written in the same clock tick as
its hash could change without its timestamps changing, as git's "racy" index entries).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.checkpoint.lora import config_file
from paddle_scorer.jsonio import stream_into
from paddle_scorer.process.environment import cache_dir

CACHE_FILE = "file-hashes.json"
CACHE_ENTRIES = 512  # most recently used files kept
RACY_SECONDS = 2.0


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        stream_into(h, p)
    return h.hexdigest()


def adapter_sha256(info: ckpt.CheckpointInfo) -> str:
    files = [Path(f) for f in info.adapter_weights.files] + [config_file(Path(info.path)) or Path(info.path) / "lora_config.json"]
    return sha256_files(files)


def _valid(entry) -> bool:
    """A cache entry of the right shape; anything else (a damaged or hand-edited file) is ignored, never fatal."""
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("key"), list) and all(isinstance(x, int) for x in entry["key"])
            and isinstance(entry.get("used"), (int, float)) and not isinstance(entry.get("used"), bool))


def _key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]


class FileHashes:
    """sha256 of whole files, remembered across runs while a file's stat key is unchanged."""

    def __init__(self, folder: Path | None = None):
        self.path = (folder or cache_dir()) / CACHE_FILE
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if _valid(v)}
        except (OSError, ValueError, RecursionError):
            pass  # no cache yet, or unreadable: hash everything

    def sha256(self, path: Path) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        hit = self.entries.get(real)
        if hit is not None and hit.get("key") == _key(st):
            hit["used"] = time.time()  # kept for the LRU order when the file is next written for another reason
            return hit["sha256"]
        started = time.time()
        digest = stream_into(hashlib.sha256(), real).hexdigest()
        after = os.stat(real)
        settled = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9 < started - RACY_SECONDS
        if _key(after) == _key(st) and settled:
            self.entries[real] = {"key": _key(st), "sha256": digest, "used": time.time()}
            self.dirty = True
        return digest

    def save(self) -> None:
        """Best effort: a cache that cannot be written only costs the next run a re-hash."""
        if not self.dirty:
            return
        keep = dict(sorted(self.entries.items(), key=lambda kv: -float(kv[1].get("used", 0)))[:CACHE_ENTRIES])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".file-hashes-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(keep, fh)
                mask = os.umask(0)
                os.umask(mask)
                os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files: a team cache on a group share follows the umask
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass
        self.dirty = False


def model_fingerprint(info: ckpt.CheckpointInfo, hashes: FileHashes | None = None) -> str:
    """sha256 over config.json and every weight file's name and content (each file's hash cached, see above)."""
    hashes = hashes or FileHashes()
    h = hashlib.sha256()
    cfg = Path(info.path) / "config.json"
    if cfg.is_file():
        h.update(b"config.json:" + cfg.read_bytes())
    files = sorted((Path(f) for f in info.weights.files), key=lambda f: f.name)
    from paddle_scorer.process.launcher import workers_on_host

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(files), max(1, cores // workers_on_host()))  # launcher workers on one host share the cores
    if workers > 1:  # shards hash in parallel (hashlib releases the GIL on large buffers)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="paddle-scorer-hash") as pool:
            digests = list(pool.map(hashes.sha256, files))
    else:
        digests = [hashes.sha256(f) for f in files]
    for f, digest in zip(files, digests):
        h.update(f"{f.name}:{digest}".encode())
    hashes.save()
    return h.hexdigest()
