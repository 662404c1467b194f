"""What a run knows of its whole input without holding it: per record (by position) a 64-bit hash of its id and its
input fingerprint, in flat arrays (16 bytes a record: 16 MB for a million records).

A run reads its input twice: :func:`scan` builds the index (every line checked, ids unique, the ids' digest), then
the run reads it again window by window to score (:mod:`paddle_scorer.runs.loop`); resume maps the lines of a
working file to input positions through :meth:`InputIndex.position`. Two ids whose hashes collide (about one chance
in 10^8 for a million records) are told apart by their text, so a collision never merges two records.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from paddle_scorer.errors import UsageError
from paddle_scorer.jsonio import duplicate_id, record_key


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def fingerprint(record: dict) -> str:
    """A short hash of an input record's content (canonical JSON): what resume compares per id."""
    import json

    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def fingerprint_int(fp: str | None) -> int:
    """A fingerprint as the unsigned 64-bit number the index stores (0 for none: a line without one never matches a
    real record, whose fingerprint is 0 with probability 2^-64)."""
    try:
        return int(fp, 16) if isinstance(fp, str) and len(fp) == 16 else 0
    except ValueError:
        return 0


@dataclass
class Shard:
    """The positions one worker scores: ``position % world == rank`` (everything for a single process)."""

    rank: int = 0
    world: int = 1

    def __contains__(self, position: int) -> bool:
        return position % self.world == self.rank

    def positions(self, n: int) -> range:
        return range(self.rank, n, self.world)

    def count(self, n: int) -> int:
        return len(self.positions(n))


@dataclass
class InputIndex:
    keys: np.ndarray  # uint64 hash of each record's key (the JSON form of its id), by position
    fingerprints: np.ndarray  # uint64 input fingerprint, by position
    ids_sha256: str  # of every record key in input order, one per line
    shard_ids_sha256: str  # of the keys of the shard's positions, in order
    collided: dict[str, int] = field(default_factory=dict)  # key -> position, for keys whose hash another key shares
    _order: np.ndarray | None = None
    _sorted: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int:
        """The input position of the record with this key, or -1."""
        h = key_hash(key)
        if self.collided and key in self.collided:
            return self.collided[key]
        if self._order is None:
            self._order = np.argsort(self.keys, kind="stable")
            self._sorted = self.keys[self._order]
        i = int(np.searchsorted(self._sorted, np.uint64(h)))
        if i < len(self._sorted) and int(self._sorted[i]) == h:
            if self.collided and h in self._collided_hashes():
                return -1  # the hash belongs to other keys only
            return int(self._order[i])
        return -1

    def _collided_hashes(self) -> set[int]:
        if not hasattr(self, "_hashes"):
            self._hashes = {key_hash(k) for k in self.collided}
        return self._hashes

    def fingerprint_hex(self, position: int) -> str:
        return f"{int(self.fingerprints[position]):016x}"


def scan(records, id_field: str = "id", shard: Shard | None = None) -> InputIndex:
    """The index of ``records`` (an iterable of ``(id, record, where)`` that can be read again: a duplicate id is
    named with both lines from a second read). Every record is parsed and fingerprinted once."""
    shard = shard or Shard()
    keys, fps = array("Q"), array("Q")
    whole, mine = hashlib.sha256(), hashlib.sha256()
    for pos, (rid, rec, _where) in enumerate(records):
        k = record_key(rid)
        kb = k.encode("utf-8") + b"\n"
        whole.update(kb)
        if pos in shard:
            mine.update(kb)
        keys.append(key_hash(k))
        fps.append(int(fingerprint(rec), 16))
    index = InputIndex(np.frombuffer(keys, dtype=np.uint64).copy() if keys else np.zeros(0, np.uint64),
                       np.frombuffer(fps, dtype=np.uint64).copy() if fps else np.zeros(0, np.uint64),
                       whole.hexdigest(), mine.hexdigest())
    _check_unique(index, records, id_field)
    return index


def _check_unique(index: InputIndex, records, id_field: str) -> None:
    """Ids unique: equal hashes are looked at by their text (a second read of the records concerned)."""
    s = np.sort(index.keys)
    same = s[1:][s[1:] == s[:-1]]
    if not same.size:
        return
    suspects = {int(h) for h in same}
    seen: dict[str, tuple[int, str, bool]] = {}
    for pos, (rid, rec, where) in enumerate(records):
        if pos >= index.n:
            raise UsageError(f"{where}: the input changed while this run was reading it (it has more records than at "
                             "first); let the input settle, then rerun.")
        if int(index.keys[pos]) not in suspects:
            continue
        k = record_key(rid)
        if k in seen:
            raise duplicate_id(k, seen[k][1:], (where, id_field not in rec), id_field)
        seen[k] = (pos, where, id_field not in rec)
    index.collided = {k: v[0] for k, v in seen.items()}  # distinct ids whose hashes collide


def check_same_input(index: InputIndex, position: int, fp: str, where: str) -> None:
    """A record read for scoring is the one the index saw (the input did not change during the run)."""
    if position >= index.n or int(index.fingerprints[position]) != int(fp, 16):
        raise UsageError(f"{where}: the input changed while this run was reading it (the record differs from the "
                         "first read); let the input settle, then rerun with --resume.")
