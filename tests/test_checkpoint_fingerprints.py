"""The model fingerprint `--resume` compares: content-based, with a cache that a content change cannot fool."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import builders
from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.checkpoint import fingerprints as fp


def _rewrite_keeping_size_and_mtime(path, offset: int = 200) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_fingerprint_is_the_content_and_the_cache_cannot_be_fooled(tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(builders.DEMO_BASE, base)
    cache = tmp_path / "cache"
    monkeypatch.setattr(fp, "RACY_SECONDS", -1.0)  # the copy is brand new: let it be cached at once
    first = fp.model_fingerprint(ckpt.describe(base), fp.FileHashes(cache))
    stored = json.loads((cache / fp.CACHE_FILE).read_text())
    weights = str((base / "model_state.pdparams").resolve())
    assert stored[weights]["sha256"] == hashlib.sha256((base / "model_state.pdparams").read_bytes()).hexdigest()

    info = ckpt.describe(base)  # reads the tensor headers; the fingerprint itself must read nothing more
    reads = []
    real_open = open

    def counting_open(path, *a, **kw):
        reads.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    assert fp.model_fingerprint(info, fp.FileHashes(cache)) == first
    assert weights not in reads  # a cache hit reads nothing of the weights
    monkeypatch.setattr("builtins.open", real_open)

    _rewrite_keeping_size_and_mtime(base / "model_state.pdparams")  # what cp -p / rsync -a over an old copy give
    changed = fp.model_fingerprint(ckpt.describe(base), fp.FileHashes(cache))
    assert changed != first  # ctime moved: the cache missed and the new content was hashed


def test_a_file_hashed_right_after_a_write_is_not_cached(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(builders.DEMO_BASE, base)  # written just now: within RACY_SECONDS of the hash
    hashes = fp.FileHashes(tmp_path / "cache")
    fp.model_fingerprint(ckpt.describe(base), hashes)
    assert str((base / "model_state.pdparams").resolve()) not in hashes.entries


def test_config_is_part_of_the_identity(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(builders.DEMO_BASE, base)
    before = fp.model_fingerprint(ckpt.describe(base), fp.FileHashes(tmp_path / "cache"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10
    (base / "config.json").write_text(json.dumps(cfg))
    time.sleep(0.01)
    assert fp.model_fingerprint(ckpt.describe(base), fp.FileHashes(tmp_path / "cache")) != before


def test_an_unwritable_cache_only_costs_a_rehash(tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    hashes = fp.FileHashes(blocked / "sub")  # cannot be created
    assert len(fp.model_fingerprint(ckpt.describe(builders.DEMO_BASE), hashes)) == 64
