"""``.pdparams`` files: index (through the restricted walker of :mod:`paddle_scorer.checkpoint.unpickle`), read, write.

Each array's declared size (shape x itemsize) must equal the length of the bytes behind it before anything is
allocated; Paddle's "big params" (sliced by ``paddle.save(protocol<4)``) become one :class:`TensorRef`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from paddle_scorer.errors import CheckpointError, UnsafeCheckpointError
from paddle_scorer.checkpoint.tensor_ref import BFLOAT16, TensorMeta, TensorRef, crafted, dtype_size, read_tensors
from paddle_scorer.checkpoint.unpickle import MAX_DIMS, _ArrayStub, _LazyStr, _Other, _Payload, walk_pdparams

# Keys paddle.save adds next to the tensors; they are bookkeeping, not weights.
_PADDLE_NAME_TABLE = "StructuredToParameterName@@"
_PADDLE_BIG_PARAM = "UnpackBigParamInfor@@"


def _describe(value) -> str:
    if isinstance(value, _Other):
        return value.what
    if isinstance(value, _ArrayStub):
        return "an array without data"
    if isinstance(value, (_Payload, _LazyStr)):
        return "bytes"
    return f"a {type(value).__name__}"


def _check_dtype(path: Path, name: str, dt) -> np.dtype:
    if not isinstance(dt, np.dtype):
        raise crafted(path, name, f"has a dtype that is {_describe(dt)}")
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.kind not in "biufc":
        raise UnsafeCheckpointError(
            f"{path}: entry {name!r} declares dtype {dt!r}, which is not a numeric tensor type (object, structured "
            "and string arrays are never weights, and object arrays run pickle code): it was not loaded "
            "(nothing was allocated or executed)."
        )
    native = np.dtype(dt.name)
    if native.itemsize != dt.itemsize:
        raise crafted(path, name, f"declares dtype {dt.name} with an item size of {dt.itemsize} bytes")
    return native


def _array_ref(path: Path, name: str, value) -> TensorRef:
    if not isinstance(value, _ArrayStub) or value.state is None:
        raise CheckpointError(f"{path}: entry {name!r} is {_describe(value)}, not a tensor.")
    state = value.state
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise crafted(path, name, "has an array state that is not numpy's (version, shape, dtype, order, data)")
    shape, dt, fortran, raw = state[-4:]
    if (not isinstance(shape, tuple) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise crafted(path, name, f"declares a shape that is not a tuple of integers ({shape!r:.80})")
    if any(d < 0 for d in shape):
        raise crafted(path, name, f"declares shape {shape} with a negative dimension")
    native = _check_dtype(path, name, dt)
    if not isinstance(fortran, (bool, int)) or fortran not in (0, 1):
        raise crafted(path, name, "has an order flag that is not a boolean")
    if not isinstance(raw, _Payload):
        raise crafted(path, name, f"has data that is {_describe(raw)}, not bytes")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * native.itemsize
    ours = "bfloat16" if native == np.uint16 else native.name
    declared = f"declares shape {tuple(shape)} of {ours} ({nbytes:,} bytes) but its data holds"
    if raw.encoding == "latin1-utf8":
        # Each byte is one latin-1 character, 1 or 2 bytes in UTF-8: the exact count is checked at read time.
        if not nbytes <= raw.length <= 2 * nbytes:
            raise crafted(path, name, f"{declared} {raw.length:,} bytes of protocol-2 text, which decode to "
                                       f"{(raw.length + 1) // 2:,} to {raw.length:,} bytes")
    elif raw.length != nbytes:
        raise crafted(path, name, f"{declared} {raw.length:,} bytes")
    if raw.data is not None:
        ranges, inline = (), raw.data
    else:
        ranges, inline = (((raw.offset, raw.length),) if raw.length else ()), None
    return TensorRef(
        file=path, name=name, shape=tuple(shape), dtype=ours, nbytes=nbytes, ranges=ranges,
        encoding=raw.encoding if ranges else "raw", fortran=bool(fortran) and len(shape) > 1,
        byteswap=not dt.isnative, inline=inline,
    )


def _join_big_param(path: Path, name: str, info, refs: dict[str, TensorRef]) -> TensorRef:
    """paddle.save(protocol<4) splits tensors over 1 GiB into 1-D slices ``name@@.0`` ...: one ref, many ranges."""
    if not isinstance(info, dict) or not isinstance(info.get("slices"), (list, tuple)):
        raise crafted(path, name, f"has a {_PADDLE_BIG_PARAM} record without a list of slices")
    shape = info.get("OriginShape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise crafted(path, name, f"has a {_PADDLE_BIG_PARAM} record without a valid OriginShape")
    parts = []
    for s in info["slices"]:
        if not isinstance(s, str) or s not in refs:
            raise crafted(path, name, f"lists the slice {s!r}, which is not in the file")
        parts.append(refs.pop(s))
    if not parts:
        raise crafted(path, name, "has no slices")
    first = parts[0]
    for p in parts:
        if p.dtype != first.dtype or p.encoding != first.encoding or p.byteswap != first.byteswap or len(p.shape) != 1:
            raise crafted(path, name, "has slices that differ in dtype or layout")
        if (p.inline is None) != (first.inline is None):
            raise crafted(path, name, "has slices stored in two different ways")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = sum(p.nbytes for p in parts)
    if nbytes != numel * dtype_size(first.dtype):
        raise crafted(path, name, f"declares shape {tuple(shape)} ({numel * dtype_size(first.dtype):,} bytes) but "
                                   f"its slices hold {nbytes:,} bytes")
    return TensorRef(
        file=path, name=name, shape=tuple(shape), dtype=first.dtype, nbytes=nbytes,
        ranges=tuple(r for p in parts for r in p.ranges), encoding=first.encoding, byteswap=first.byteswap,
        inline=b"".join(p.inline for p in parts) if first.inline is not None else None,
    )


def index_pdparams(path: Path) -> dict[str, TensorRef]:
    obj = walk_pdparams(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds {_describe(obj)}, not a state dict of named tensors; "
            "save the model with save_pretrained() or paddle.save(model.state_dict(), ...)."
        )
    big = obj.get(_PADDLE_BIG_PARAM)
    refs: dict[str, TensorRef] = {}
    for key, value in obj.items():
        if key in (_PADDLE_NAME_TABLE, _PADDLE_BIG_PARAM):
            continue
        if not isinstance(key, str):
            raise CheckpointError(f"{path} has a non-string key {key!r:.80}; it is not a Paddle state dict.")
        refs[key] = _array_ref(path, key, value)
    if big:
        if not isinstance(big, dict):
            raise CheckpointError(f"{path}: {_PADDLE_BIG_PARAM} is {_describe(big)}, not a dict; the file is corrupt.")
        for name, info in big.items():
            refs[name] = _join_big_param(path, name, info, refs)
    return refs


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a ``.pdparams`` file as numpy arrays (bf16 as ``ml_dtypes.bfloat16``)."""
    path = Path(path)
    return read_tensors(index_pdparams(path).values())


def read_pdparams_meta(path: str | Path) -> dict[str, TensorMeta]:
    """Shapes and dtypes of a ``.pdparams`` file; no tensor bytes are read."""
    path = Path(path)
    return {name: ref.meta for name, ref in index_pdparams(path).items()}


def write_pdparams(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """Write a ``.pdparams`` that ``paddle.load`` and :func:`read_pdparams` both read.

    bf16 arrays are stored as uint16, as paddle does. Only numpy objects are pickled.
    """
    import pickle

    payload = {k: (v.view(np.uint16) if v.dtype == BFLOAT16 else np.ascontiguousarray(v)) for k, v in tensors.items()}
    with open(path, "wb") as fh:
        pickler = pickle.Pickler(fh, protocol=4)
        # No memo: protocol 4 pickles each array as a bytes copy, which the memo would keep alive until the
        # end (peak memory 2x the weights); without it one copy exists at a time. Same file format.
        pickler.fast = True
        pickler.dump(payload)
