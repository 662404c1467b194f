"""``.safetensors`` files: the header as the index (every entry's offsets checked against its shape), read, write."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from paddle_scorer.errors import CheckpointError
from paddle_scorer.checkpoint.tensor_ref import TensorMeta, TensorRef, crafted, dtype_size

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class _Duplicate(ValueError):
    def __init__(self, name: str):
        super().__init__(f"the header names the tensor {name!r} twice")
        self.name = name


def _no_duplicates(pairs: list) -> dict:
    """A JSON object whose names are unique (``json`` keeps the last of two silently; the safetensors library
    refuses the file)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _check_no_overlap(path: Path, refs: dict) -> None:
    """Every entry's bytes are its own: two entries on the same bytes, or one running into the next, would give two
    tensors one content (the safetensors library refuses such a file: "invalid offset")."""
    spans = sorted((r.ranges[0][0], r.ranges[0][0] + r.ranges[0][1], name) for name, r in refs.items() if r.ranges)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise crafted(path, n1, f"shares bytes {b1:,}-{min(e0, e1):,} with the entry {n0!r}")


def _safetensors_header_at(path: Path) -> tuple[dict, int, int]:
    """(header, offset of the data block, file size)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100_000_000 or n > size - 8:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n), object_pairs_hook=_no_duplicates)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            return header, 8 + n, size
    except _Duplicate as exc:
        raise crafted(path, exc.name, "is named twice in the header") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({exc}); check that it was copied completely."
        ) from exc


def _safetensors_header(path: Path) -> dict:
    return _safetensors_header_at(path)[0]


def read_safetensors_meta(path: str | Path) -> dict[str, TensorMeta]:
    path = Path(path)
    header = _safetensors_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = TensorMeta(tuple(info["shape"]), _ST_DTYPES.get(info["dtype"], info["dtype"].lower()))
    return out


def index_safetensors(path: Path) -> dict[str, TensorRef]:
    header, start, size = _safetensors_header_at(path)
    data_len = size - start
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: entry {name!r} has an unsupported or malformed header record ({exc!r:.80}); "
                "the file is corrupt or was written by a newer tool."
            ) from exc
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(
            isinstance(x, int) for x in (begin, end)
        ):
            raise crafted(path, name, f"declares shape {shape!r:.80} and offsets {begin!r}, {end!r}")
        nbytes = TensorMeta(shape, dtype).nbytes
        if not 0 <= begin <= end or end - begin != nbytes:
            raise crafted(path, name, f"declares shape {shape} of {dtype} ({nbytes:,} bytes) but its data "
                                       f"offsets hold {end - begin:,} bytes")
        if end > data_len:
            raise CheckpointError(
                f"{path} is not a readable .safetensors file (entry {name!r} ends at byte {start + end:,} of a "
                f"{size:,}-byte file); check that it was copied completely."
            )
        refs[name] = TensorRef(
            file=path, name=name, shape=shape, dtype=dtype, nbytes=nbytes,
            ranges=((start + begin, nbytes),) if nbytes else (),
            byteswap=sys.byteorder == "big" and dtype_size(dtype) > 1,
        )
    _check_no_overlap(path, refs)
    return refs


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(path)
    _safetensors_header(path)  # clear error for a truncated file
    # pread, not mmap (safetensors >= 0.8): with mmap the touched file pages count as resident next to the
    # copied arrays, so peak memory was 2x the file.
    from inspect import signature

    kw = {"backend": "pread"} if "backend" in signature(load_file).parameters else {}
    try:
        return load_file(str(path), **kw)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} could not be read as safetensors ({exc}).") from exc


def write_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
