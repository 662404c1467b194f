"""Pure numpy work on weight arrays, shared by loading (:mod:`paddle_scorer.model.loader`), layer streaming
(:mod:`paddle_scorer.compute.streamed`) and ``merge`` (:mod:`paddle_scorer.tasks.merge`): casts, the NaN/inf check, and
``W + delta`` with its refusals. No paddle import.

Casting big arrays runs in row slices on every core: numpy's float16 -> float32 loop is single-threaded and
releases the GIL, so a pool of one thread per core scales it (a 0.94B float16 load: read + cast 14.6 s ->
~5.5 s on 2 cores).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from paddle_scorer.errors import WeightMismatchError
from paddle_scorer.checkpoint.lora import lora_delta
from paddle_scorer.checkpoint.tensor_ref import BFLOAT16, dtype_name

PARALLEL_CAST_ELEMENTS = 1 << 20  # arrays this big are cast in slices on every core
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}  # all-ones exponent: inf or NaN


@lru_cache(maxsize=1)
def cast_pool() -> ThreadPoolExecutor:
    from paddle_scorer.process.environment import usable_cores

    return ThreadPoolExecutor(max_workers=max(1, usable_cores()), thread_name_prefix="paddle-scorer-cast")


def _slices(arr: np.ndarray) -> list[slice]:
    """Row slices for the cast pool: four per worker, taken from one queue, so a worker whose core another program
    holds takes fewer (not one half each, the slow half holding up the rest)."""
    workers = cast_pool()._max_workers
    step = -(-arr.shape[0] // (4 * workers))
    return [slice(i, i + step) for i in range(0, arr.shape[0], step)]


def _parallel(arr: np.ndarray) -> bool:
    return arr.size >= PARALLEL_CAST_ELEMENTS and arr.ndim > 0 and arr.shape[0] >= 2


def _target(dtype: str) -> np.dtype:
    return BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)


def is_floating(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.floating) or arr.dtype == BFLOAT16


def count_nonfinite(arr: np.ndarray) -> int:
    """NaN/inf values in a floating array. Half types are checked on their bits (numpy's float16
    ``isfinite`` is ~4x slower than the integer test; measured on 100M values); float32/64 with one
    vectorised ``isfinite(...).all()`` and counted only when something is wrong."""
    name = dtype_name(arr.dtype)
    if name in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[name]
        bits = arr.view(np.uint16)
        bad = (bits & mask) == mask
        return int(np.count_nonzero(bad)) if bad.any() else 0
    if np.issubdtype(arr.dtype, np.floating):
        if np.isfinite(arr).all():
            return 0
        return int(np.count_nonzero(~np.isfinite(arr)))
    return 0


def nonfinite(tensors: dict[str, np.ndarray]) -> list[str]:
    """One problem line per array holding NaN/inf."""
    bad = []
    for name, arr in tensors.items():
        n = count_nonfinite(arr)
        if n:
            bad.append(f"{name}: {n} NaN/inf value(s)")
    return bad


def to_dtype(arr: np.ndarray, dtype: str, parallel: bool = True) -> np.ndarray:
    """``arr`` in ``dtype`` (non-floating arrays unchanged). Big arrays are cast in row slices on all cores."""
    if not is_floating(arr):
        return arr
    target = _target(dtype)
    if arr.dtype == target:
        return arr
    if not parallel or not _parallel(arr):
        with np.errstate(over="ignore"):  # callers check finiteness and refuse with a sentence, not a warning
            return arr.astype(target)
    out = np.empty(arr.shape, dtype=target)

    def work(sl):
        with np.errstate(over="ignore"):
            np.copyto(out[sl], arr[sl], casting="unsafe")

    list(cast_pool().map(work, _slices(arr)))
    return out


_WIDEN_ROWS = 64  # source rows per block when widening a transposed view (they stay in cache while written out)


def _widen(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst`` (float32, same shape, any strides) = ``src`` (float16/bfloat16): bfloat16 is the top half of a float32,
    so a 16-bit shift of its bits (integer loops: vectorised, the GIL released); float16 by numpy's own loop."""
    if src.dtype == BFLOAT16:
        np.left_shift(src.view(np.uint16), 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(dst, src)


def widen(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A float16/bfloat16 array (a transposed view too: a linear weight stored ``[out, in]``) as a new C-contiguous
    float32 array, on every core; other arrays are returned as they are. A transposed 2-D view is converted in blocks
    of its source's rows, so the transposition is not a pass of its own (measured on an expert's ``[3072, 2560]``:
    7 ms, against 16 ms for a transposed copy followed by a cast, one core). ``out``: where to write (a column range of
    a fused tensor), else a new array."""
    if arr.dtype not in (BFLOAT16, np.float16):
        if out is not None:
            np.copyto(out, arr, casting="unsafe")
            return out
        return arr
    out = np.empty(arr.shape, np.float32) if out is None else out
    transposed = arr.ndim == 2 and not arr.flags.c_contiguous and arr.T.flags.c_contiguous
    src = arr.T if transposed else np.ascontiguousarray(arr)
    rows = src.shape[0] if src.ndim else 1
    if src.ndim == 0 or rows < 2:
        _widen(src, out.T if transposed else out)
        return out
    workers = cast_pool()._max_workers if arr.size >= PARALLEL_CAST_ELEMENTS else 1
    step = _WIDEN_ROWS if transposed else max(1, -(-rows // (4 * workers)))
    spans = [(i, min(rows, i + step)) for i in range(0, rows, step)]
    per = max(1, -(-len(spans) // (4 * workers)))  # ~4 groups per worker from one queue: a slowed worker takes fewer
    groups = [spans[i:i + per] for i in range(0, len(spans), per)]

    def work(group):
        for r0, r1 in group:
            if transposed:
                _widen(src[r0:r1].T, out[:, r0:r1])
            else:
                _widen(src[r0:r1], out[r0:r1])

    if workers == 1:
        work(spans)
    else:
        list(cast_pool().map(work, groups))
    return out


def cast_checked(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """``to_dtype`` plus "is every value finite?", both done slice by slice on every core. The check runs
    on the cast result, so a value that overflows the target dtype (float32 -> float16) is caught too."""
    if not is_floating(arr):
        return arr, True
    target = _target(dtype)
    if not _parallel(arr):
        with np.errstate(over="ignore"):  # overflow is reported below as a non-finite value
            out = arr if arr.dtype == target else arr.astype(target)
        return out, count_nonfinite(out) == 0
    out = arr if arr.dtype == target else np.empty(arr.shape, dtype=target)
    # a widening cast (half -> float32) cannot overflow: check the half source's bits, half the bytes of the result
    widening = out is not arr and target.itemsize > arr.dtype.itemsize and target == np.float32

    def work(sl):
        if widening:
            ok = count_nonfinite(arr[sl]) == 0
        if out is not arr:
            with np.errstate(over="ignore"):
                np.copyto(out[sl], arr[sl], casting="unsafe")
        return ok if widening else count_nonfinite(out[sl]) == 0

    return out, all(cast_pool().map(work, _slices(arr)))


def cast_or_refuse(name: str, arr: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """``arr`` in ``dtype`` (cast and checked on every core); NaN/inf, stored or made by the cast (a float64 1e300
    is inf in float32), refused naming the tensor: the one check of in-RAM loading and streaming."""
    out, finite = cast_checked(arr, dtype)
    if not finite:
        raise WeightMismatchError(
            f"{where}: the model weights contain NaN/inf, so every score would be meaningless:",
            [f"{name}: {count_nonfinite(out)} NaN/inf value(s)" + (f" (after the cast to {dtype})"
                                                                   if out.dtype != arr.dtype else "")],
            "Re-export the checkpoint from a healthy training step.",
        )
    return out


def to_paddle_array(arr: np.ndarray, dtype: str, parallel: bool = True) -> np.ndarray:
    """numpy value for ``param.set_value``: paddle takes bfloat16 as uint16 bits."""
    arr = to_dtype(arr, dtype, parallel)
    return arr.view(np.uint16) if arr.dtype == BFLOAT16 else arr


# --------------------------------------------------------------------------------------------------
# W + delta: the one merge rule of loading, streaming and `merge`
# --------------------------------------------------------------------------------------------------


def add_delta(name: str, w: np.ndarray, delta: np.ndarray, target: str | None = None) -> tuple[np.ndarray | None, str | None]:
    """``W + delta`` computed in float32 and cast to ``target`` (default: W's dtype). Returns ``(merged, None)``,
    or ``(None, problem)`` when the sum is not finite or overflows the target dtype."""
    target = target or dtype_name(w.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        merged = w.astype(np.float32) + delta
    if not np.isfinite(merged).all():
        return None, f"{name}: merged weight has NaN/inf"
    merged = to_dtype(merged, target)
    if count_nonfinite(merged):
        return None, f"{name}: merged weight overflows {target}"
    return merged, None


def merge_refusal(where: str, bad: list[str]) -> WeightMismatchError:
    return WeightMismatchError(f"{where}: merging the adapter produced non-finite weights:", bad,
                               "The adapter is unusable with this base; check its training run.")


def dora_delta(w: np.ndarray, delta: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """DoRA's merge as a delta on ``W`` (Paddle's ``[in, out]``): ``m / ||W + delta||_col * (W + delta) - W``, each
    output column's norm over the inputs, as peft's ``DoraLinearLayer`` computes it (``weight_norm`` of the merged
    weight, per output row of torch's ``[out, in]``). A NaN magnitude leaves its column's ``W + delta`` unscaled (a
    part of a fused module that DoRA does not adapt)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        merged = w.astype(np.float32) + delta
        norm = np.sqrt(np.einsum("ij,ij->j", merged, merged, dtype=np.float32))
        scale = np.where(np.isnan(magnitude), np.float32(1.0), magnitude / norm).astype(np.float32)
        return merged * scale - w.astype(np.float32)


def merge_lora(base: dict[str, np.ndarray], pairs: dict[str, tuple[np.ndarray, np.ndarray]], scaling: float,
               where: str, out_dtype: str | None = None, magnitudes: dict[str, np.ndarray] | None = None) -> None:
    """``W += A @ B * scaling`` (in float32, cast back to ``out_dtype``, default W's dtype) for the modules
    whose weight is in ``base``, in place (DoRA's rescaled sum for the modules in ``magnitudes``: :func:`dora_delta`);
    non-finite results are refused, every one named."""
    bad = []
    magnitudes = magnitudes or {}
    for module, (a, b) in pairs.items():
        key = module + ".weight"
        if key not in base:
            continue
        delta = lora_delta(a, b, scaling)
        if module in magnitudes:
            delta = dora_delta(base[key], delta, magnitudes[module])
        merged, problem = add_delta(key, base[key], delta, out_dtype)
        if problem:
            bad.append(problem)
        else:
            base[key] = merged
    if bad:
        raise merge_refusal(where, bad)


# MXFP4's 4-bit values (an E2M1 float per nibble), in nibble order
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An MXFP4 matrix (GPT-OSS's experts) as float32 ``[rows, groups * 32]``: ``blocks [rows, groups, 16]`` uint8, two
    4-bit values a byte (the low nibble first), ``scales [rows, groups]`` uint8 exponents biased by 127 (one per 32
    values): ``value * 2^(scale - 127)``, as transformers' ``convert_moe_packed_tensors`` computes it (exact: every
    product is a float32 power-of-two multiple of an E2M1 value)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up")
    out = np.empty(blocks.shape[:-1] + (32,), dtype=np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out = np.ldexp(out, (scales.astype(np.int32) - 127)[..., None]).astype(np.float32)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)
