"""Identities of weights: the adapter's sha256 (provenance, merge records) and a model's fingerprint (what
``--resume`` compares). No paddle import.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from paddle_scorer import checkpoint as ckpt


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def adapter_sha256(info: ckpt.CheckpointInfo) -> str:
    files = [Path(f) for f in info.adapter_weights.files] + [Path(info.path) / "lora_config.json"]
    return sha256_files(files)


def model_fingerprint(info: ckpt.CheckpointInfo) -> str:
    """A cheap identity of a model's weights (config + per-tensor names/shapes/dtypes + file sizes and
    mtimes): enough for ``--resume`` to notice a different model without hashing gigabytes."""
    h = hashlib.sha256()
    cfg = Path(info.path) / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(info.weights.files):
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()
