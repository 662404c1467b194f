"""Reading (and writing) weight files without paddle and without running pickle code.

A ``.pdparams`` file is a pickle. ``paddle.load`` unpickles it with the full pickle machinery, so a
crafted file can run any code on load. Legitimate files only reference numpy's array
reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``); this
module's unpickler allows exactly those and refuses everything else by name.

Paddle stores bfloat16 tensors as ``uint16`` arrays; we follow that convention and hand back
``ml_dtypes.bfloat16`` arrays, so every caller sees the real dtype.

Nothing here imports paddle: ``inspect`` stays instant and safe.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from paddle_scorer.errors import CheckpointError, UnsafeCheckpointError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# Keys paddle.save adds next to the tensors; they are bookkeeping, not weights.
_PADDLE_NAME_TABLE = "StructuredToParameterName@@"
_PADDLE_BIG_PARAM = "UnpackBigParamInfor@@"


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a stored tensor, read without keeping its data."""

    shape: tuple[int, ...]
    dtype: str  # numpy-style name: float32, float16, bfloat16, int64, ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(name: str) -> int:
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == BFLOAT16 else np.dtype(dtype).name


# --------------------------------------------------------------------------------------------------
# .pdparams: a restricted unpickler
# --------------------------------------------------------------------------------------------------

_NUMPY_RECONSTRUCT = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_NUMPY_NDARRAY = {("numpy", "ndarray")}
_NUMPY_DTYPE = {("numpy", "dtype")}
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _MetaArray:
    """Stands in for an ndarray while reading metadata only: keeps shape/dtype, drops the bytes."""

    def __init__(self, *_args):
        self.shape: tuple[int, ...] = ()
        self.dtype: np.dtype | None = None

    def __setstate__(self, state):
        # ndarray state: (version, shape, dtype, is_fortran, rawdata)
        _version, shape, dtype, _fortran, _raw = state
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)


def _meta_reconstruct(cls, shape, dtype):  # noqa: ARG001 - signature of numpy's _reconstruct
    return _MetaArray()


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, meta_only: bool):
        super().__init__(file)
        self._source = source
        self._meta_only = meta_only

    def find_class(self, module, name):
        key = (module, name)
        if key in _NUMPY_RECONSTRUCT:
            if self._meta_only:
                return _meta_reconstruct
            return np.core.multiarray._reconstruct
        if key in _NUMPY_NDARRAY:
            return _MetaArray if self._meta_only else np.ndarray
        if key in _NUMPY_DTYPE:
            return np.dtype
        if key in _NUMPY_SCALAR:
            return np.core.multiarray.scalar
        raise UnsafeCheckpointError(
            f"{self._source} references `{module}.{name}`, which a weights file never needs: it may "
            "run code when loaded, so it was not loaded (nothing was executed); re-export the weights "
            "from a trusted source (e.g. as .safetensors)."
        )

    def persistent_load(self, pid):  # pragma: no cover - paddle never writes persistent ids
        raise UnsafeCheckpointError(
            f"{self._source} uses pickle persistent ids, which Paddle weight files never contain; "
            "it was not loaded: re-export the weights from a trusted source."
        )


def _unpickle(path: Path, meta_only: bool):
    try:
        with open(path, "rb") as fh:
            return _SafeUnpickler(io.BufferedReader(fh, 1 << 20), str(path), meta_only).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is not a readable .pdparams file ({type(exc).__name__}: {exc}); "
            "check that the file was copied completely."
        ) from exc


def _pdparams_tensors(obj, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of named tensors; "
            "save the model with save_pretrained() or paddle.save(model.state_dict(), ...)."
        )
    big = obj.get(_PADDLE_BIG_PARAM)
    out = {}
    for key, value in obj.items():
        if key in (_PADDLE_NAME_TABLE, _PADDLE_BIG_PARAM):
            continue
        if not isinstance(key, str):
            raise CheckpointError(f"{path} has a non-string key {key!r}; it is not a Paddle state dict.")
        out[key] = value
    if big:
        # paddle.save(protocol<4) splits tensors over 4 GB into slices: glue them back.
        for name, info in big.items():
            parts = [out.pop(s) for s in info["slices"]]
            if isinstance(parts[0], _MetaArray):
                meta = _MetaArray()
                meta.shape = tuple(info["OriginShape"])
                meta.dtype = parts[0].dtype
                out[name] = meta
            else:
                out[name] = np.concatenate([p.ravel() for p in parts]).reshape(info["OriginShape"])
    return out


def _fix_bf16(arr: np.ndarray) -> np.ndarray:
    # Paddle's convention: bfloat16 is pickled as uint16.
    return arr.view(BFLOAT16) if arr.dtype == np.uint16 else arr


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a ``.pdparams`` file as numpy arrays (bf16 as ``ml_dtypes.bfloat16``)."""
    path = Path(path)
    tensors = _pdparams_tensors(_unpickle(path, meta_only=False), path)
    out = {}
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor.")
        out[name] = _fix_bf16(value)
    return out


def read_pdparams_meta(path: str | Path) -> dict[str, TensorMeta]:
    """Shapes and dtypes of a ``.pdparams`` file; tensor bytes are read and dropped one at a time."""
    path = Path(path)
    tensors = _pdparams_tensors(_unpickle(path, meta_only=True), path)
    out = {}
    for name, value in tensors.items():
        if not isinstance(value, _MetaArray) or value.dtype is None:
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor.")
        dt = "bfloat16" if value.dtype == np.uint16 else value.dtype.name
        out[name] = TensorMeta(value.shape, dt)
    return out


def write_pdparams(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """Write a ``.pdparams`` that ``paddle.load`` and :func:`read_pdparams` both read.

    bf16 arrays are stored as uint16, as paddle does. Only numpy objects are pickled.
    """
    payload = {k: (v.view(np.uint16) if v.dtype == BFLOAT16 else np.ascontiguousarray(v)) for k, v in tensors.items()}
    with open(path, "wb") as fh:
        pickler = pickle.Pickler(fh, protocol=4)
        # No memo: protocol 4 pickles each array as a bytes copy, which the memo would keep alive until the
        # end (peak memory 2x the weights); without it one copy exists at a time. Same file format.
        pickler.fast = True
        pickler.dump(payload)


# --------------------------------------------------------------------------------------------------
# .safetensors
# --------------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def _safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            return json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({exc}); check that it was copied completely."
        ) from exc


def read_safetensors_meta(path: str | Path) -> dict[str, TensorMeta]:
    path = Path(path)
    header = _safetensors_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = TensorMeta(tuple(info["shape"]), _ST_DTYPES.get(info["dtype"], info["dtype"].lower()))
    return out


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


# --------------------------------------------------------------------------------------------------
# One entry point per file, and sharded sets
# --------------------------------------------------------------------------------------------------


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
    names = sorted(set(weight_map.values()))
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists shard(s) that are not in {index_path.parent}: "
            f"{', '.join(missing)}; copy the complete checkpoint folder."
        )
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors file by file, so at most one shard is in memory at a time."""
    for f in files:
        tensors = read_file(f)
        while tensors:
            name = next(iter(tensors))
            yield name, tensors.pop(name)
        del tensors


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
