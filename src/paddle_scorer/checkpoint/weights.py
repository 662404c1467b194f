"""Reading (and writing) weight files without paddle and without running pickle code: one entry point per
file and for sharded sets. The formats live in :mod:`paddle_scorer.checkpoint.pdparams_format` (a pickle, read by the restricted
walker of :mod:`paddle_scorer.checkpoint.unpickle`) and :mod:`paddle_scorer.checkpoint.safetensors_format`; a tensor's address and
the reading of one tensor alone in :mod:`paddle_scorer.checkpoint.tensor_ref`. The names callers use are re-exported here.

Nothing here imports paddle: ``inspect`` stays instant and safe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from paddle_scorer.errors import CheckpointError
from paddle_scorer.checkpoint.pdparams_format import index_pdparams, read_pdparams, read_pdparams_meta, write_pdparams
from paddle_scorer.checkpoint.safetensors_format import (
    index_safetensors,
    read_safetensors,
    read_safetensors_meta,
    write_safetensors,
)
from paddle_scorer.checkpoint.tensor_ref import (
    BFLOAT16,
    TensorMeta,
    TensorRef,
    _OpenFile,
    dtype_name,
    dtype_size,
    read_tensor,
    read_tensors,
)

__all__ = [
    "BFLOAT16", "TensorMeta", "TensorRef", "dtype_name", "dtype_size", "index_file", "index_files", "iter_tensors",
    "read_file", "read_file_meta", "read_files", "read_files_meta", "read_pdparams", "read_pdparams_meta",
    "read_safetensors", "read_safetensors_meta", "read_tensor", "read_tensors", "shard_files", "write_pdparams",
    "write_safetensors",
]


def index_file(path: str | Path) -> dict[str, TensorRef]:
    """Where every tensor of one weights file lives, read without reading any tensor bytes.

    ``.safetensors``: from the JSON header (``data_offsets`` count from ``8 + header length``).
    ``.pdparams``: one pass of the restricted pickle walker, which seeks past every payload, keeps no
    tensor bytes in memory, and executes nothing (see the module docstring).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return index_safetensors(path)
    if path.suffix == ".bin":  # torch.save zip (peft's adapter_model.bin): the same restricted walker
        from paddle_scorer.checkpoint.torch_format import index_torch

        return index_torch(path)
    return index_pdparams(path)


def index_files(files: list[Path]) -> dict[str, TensorRef]:
    """The index of a sharded set; a name in two shards is an error."""
    out: dict[str, TensorRef] = {}
    for f in files:
        for name, ref in index_file(f).items():
            if name in out:
                raise CheckpointError(
                    f"tensor {name!r} appears in more than one shard; the checkpoint is inconsistent."
                )
            out[name] = ref
    return out




def read_file(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_pdparams(path)


def read_file_meta(path: str | Path) -> dict[str, TensorMeta]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors_meta(path)
    return read_pdparams_meta(path)


def shard_files(index_path: str | Path) -> list[Path]:
    """The shard files an ``*.index.json`` names, in a stable order, all checked to exist."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index_path} is not a valid shard index (needs a \"weight_map\"): {exc}."
        ) from exc
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path} is not a valid shard index: \"weight_map\" must map tensor names to "
                              "shard file names.")
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if not n or Path(n).name != n or n in (".", "..")]
    if outside:
        raise CheckpointError(f"{index_path.name} names shard(s) outside its folder ({', '.join(outside[:3])}); a "
                              "checkpoint's shards must sit next to its index: fix the index or copy the shards.")
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists shard(s) that are not in {index_path.parent}: "
            f"{', '.join(missing)}; copy the complete checkpoint folder."
        )
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors one at a time, file by file in offset order: at most one tensor is read ahead of the caller."""
    for f in files:
        refs = index_file(f)
        with _OpenFile(Path(f)) as handle:
            for ref in sorted(refs.values(), key=lambda r: r.offset):
                yield ref.name, handle.read(ref)


def read_files(files: list[Path]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, arr in iter_tensors(files):
        if name in out:
            raise CheckpointError(f"tensor {name!r} appears in more than one shard; the checkpoint is inconsistent.")
        out[name] = arr
    return out


def read_files_meta(files: list[Path]) -> dict[str, TensorMeta]:
    out: dict[str, TensorMeta] = {}
    for f in files:
        for name, meta in read_file_meta(f).items():
            if name in out:
                raise CheckpointError(
                    f"tensor {name!r} appears in more than one shard; the checkpoint is inconsistent."
                )
            out[name] = meta
    return out
