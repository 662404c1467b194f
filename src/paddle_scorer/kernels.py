"""The float32 matrix products of the CPU executor, on the fastest exact kernel this machine has.

Every CPU forward is matrix-multiply bound, and which library multiplies fastest depends on the CPU: Paddle's
bundled MKL takes AVX-512 kernels on Intel CPUs but a generic AVX2 path on AMD ones (~230 GFLOP/s there), where
numpy's OpenBLAS picks its own AVX-512 kernels (~450 GFLOP/s: benchmarks/RESULTS.md); on an Intel Xeon
numpy's OpenBLAS ran at 30-130 GFLOP/s next to MKL's ~250. So the choice is made at run time, once per
process (:func:`gemm`):

1. each candidate (``paddle``: ``paddle.matmul`` on zero-copy DLPack views; ``numpy``: numpy's BLAS) first
   multiplies a fixed 96x80 by 80x72 product whose float64 answer is known; a candidate off by more than
   1e-5 (relative, float32 is ~1e-7) is not used, and a ``note`` says so;
2. the ones that pass are timed on a product shaped like the model's (rows x hidden x intermediate, at least
   256 x 1024 x 1024 so that call overheads do not decide, best of a few repetitions); Paddle's kernel is used
   unless another is clearly faster (by more than :data:`MARGIN`): the choice does not flip between runs on
   timing noise, so the same inputs give the same float32 results run after run.
   ``PADDLE_SCORER_GEMM=paddle|numpy`` forces one (it still has to pass its check).

What ran and its measured GFLOP/s go into every output's provenance and ``doctor``. The result of both
paths is the same float32 product (up to summation order, ~1e-7 relative), so scores agree to 1e-5.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

CANDIDATES = ("paddle", "numpy")
ENV = "PADDLE_SCORER_GEMM"
FORWARD_ENV = "PADDLE_SCORER_CPU_FORWARD"  # =library: the library's own forward on CPU (A/B checks, benchmarks)
CHECK_TOLERANCE = 1e-5
MARGIN = 1.2  # another kernel replaces Paddle's only when it measures this much faster


class _Borrowed:
    """A writable numpy view of a paddle tensor's memory that keeps the tensor alive (``np.from_dlpack``
    views are read-only, and the executor works in place)."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.__array_interface__ = {
            "data": (tensor.data_ptr(), False), "shape": tuple(tensor.shape), "typestr": "<f4", "version": 3,
        }


def to_numpy(tensor) -> np.ndarray:
    """A float32 paddle CPU tensor as a writable numpy array on the same memory (no copy)."""
    if str(tensor.dtype) not in ("paddle.float32", "float32"):
        raise TypeError(f"expected a float32 tensor, got {tensor.dtype}")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return np.asarray(_Borrowed(tensor))


@dataclass
class Mat:
    """A weight matrix as numpy, with its paddle tensor made on first use (zero copy both ways)."""

    np: np.ndarray
    _pd: object = None

    @property
    def pd(self):
        if self._pd is None:
            from paddle_scorer.runtime import paddle

            arr = self.np if self.np.flags.writeable and self.np.flags.c_contiguous else np.ascontiguousarray(
                self.np).copy()
            self._pd = paddle().utils.dlpack.from_dlpack(arr)
            self.np = arr
        return self._pd

    @classmethod
    def of_tensor(cls, tensor) -> "Mat":
        return cls(to_numpy(tensor.detach()), tensor.detach())

    @property
    def shape(self) -> tuple[int, ...]:
        return self.np.shape


class Kernel:
    """``mm(x, w)``: ``x [N, K] @ w [K, M]`` (or ``w.T`` with ``trans_w``); ``bmm(a, b)``: batched ``a @ b``."""

    name = "?"

    def mm(self, x: np.ndarray, w: Mat, trans_w: bool = False) -> np.ndarray:
        raise NotImplementedError

    def bmm(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class NumpyKernel(Kernel):
    name = "numpy"

    def mm(self, x, w, trans_w=False):
        return x @ (w.np.T if trans_w else w.np)

    def bmm(self, a, b):
        return np.matmul(a, b)


class PaddleKernel(Kernel):
    """``paddle.matmul`` (Paddle's bundled MKL) on zero-copy views of numpy arrays."""

    name = "paddle"

    def __init__(self):
        from paddle_scorer.runtime import paddle

        self.pd = paddle()
        self.dl = self.pd.utils.dlpack.from_dlpack

    def _t(self, a: np.ndarray):
        if not (a.flags.c_contiguous and a.flags.writeable):
            a = np.ascontiguousarray(a)
            if not a.flags.writeable:
                a = a.copy()
        return self.dl(a)

    def mm(self, x, w, trans_w=False):
        return to_numpy(self.pd.matmul(self._t(x), w.pd, transpose_y=trans_w))

    def bmm(self, a, b):
        return to_numpy(self.pd.matmul(self._t(a), self._t(b)))


def make(name: str) -> Kernel:
    if name == "numpy":
        return NumpyKernel()
    if name == "paddle":
        return PaddleKernel()
    raise ValueError(f"unknown GEMM kernel {name!r}")


@dataclass
class GemmChoice:
    """Which kernel runs the CPU products, and why (provenance, ``doctor``)."""

    path: str
    gflops: float
    measured: dict[str, float] = field(default_factory=dict)  # candidate -> GFLOP/s on the model-shaped product
    excluded: dict[str, str] = field(default_factory=dict)  # candidate -> why it is not used
    shape: tuple[int, int, int] = (0, 0, 0)
    forced: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def self_check(kernel: Kernel) -> str | None:
    """Multiply a fixed product and compare with float64; None when right, else what was wrong."""
    rng = np.random.default_rng(20261205)
    a = rng.standard_normal((96, 80)).astype(np.float32)
    b = rng.standard_normal((80, 72)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    try:
        got = kernel.mm(a, Mat(b.copy()))
        got_t = kernel.mm(a, Mat(np.ascontiguousarray(b.T)), trans_w=True)
        got_b = kernel.bmm(a.reshape(2, 48, 80), np.stack([b, b]))
    except Exception as exc:  # a kernel that cannot even run is excluded, with the reason
        return f"failed to run ({type(exc).__name__}: {exc})"
    scale = np.abs(want).max()
    for what, g in (("x @ w", got), ("x @ w.T", got_t), ("batched", np.concatenate(list(g for g in got_b)))):
        err = float(np.abs(np.asarray(g, dtype=np.float64).reshape(want.shape) - want).max() / scale)
        if not np.isfinite(err) or err > CHECK_TOLERANCE:
            return f"wrong result on a 96x80x72 check product ({what}: relative error {err:.1e} > {CHECK_TOLERANCE:.0e})"
    return None


def measure(kernel: Kernel, shape: tuple[int, int, int], reps: int = 3) -> float:
    """GFLOP/s of ``kernel.mm`` on an ``[m, k] x [k, n]`` float32 product (best of ``reps`` after one warm-up)."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = Mat(rng.standard_normal((k, n), dtype=np.float32))
    kernel.mm(x, w)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        kernel.mm(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def probe_shape(hidden: int, intermediate: int) -> tuple[int, int, int]:
    """A product like the model's MLP over 256 rows, capped so that timing it stays under ~0.1 s."""
    k = max(1024, min(int(hidden), 2048))
    n = max(1024, min(int(intermediate), 4096))
    return 256, k, n


def choose(shape: tuple[int, int, int], environ=None, names: list[str] | None = None) -> tuple[Kernel, GemmChoice]:
    environ = os.environ if environ is None else environ
    forced = environ.get(ENV, "").strip().lower() or None
    notes: list[str] = []
    if forced is not None and forced not in CANDIDATES:
        notes.append(f"{ENV}={forced!r} is not one of {', '.join(CANDIDATES)}; choosing by measurement")
        forced = None
    names = names or ([forced] if forced else list(CANDIDATES))
    kernels, excluded, measured = {}, {}, {}
    for name in names:
        try:
            k = make(name)
        except Exception as exc:  # e.g. paddle missing: then only numpy
            excluded[name] = f"unavailable ({type(exc).__name__}: {exc})"
            continue
        problem = self_check(k)
        if problem:
            excluded[name] = problem
            notes.append(f"the {name} GEMM kernel is not used: {problem}")
            continue
        kernels[name] = k
        measured[name] = round(measure(k, shape), 1)
    if not kernels:
        others = [n for n in CANDIDATES if n not in excluded]
        if forced and others:  # the forced kernel failed its check: choose among the others
            k, c = choose(shape, {}, others)
            c.notes = notes + c.notes
            c.excluded.update(excluded)
            return k, c
        raise RuntimeError("no float32 GEMM kernel passed its self-check: " + "; ".join(
            f"{n}: {why}" for n, why in excluded.items()))
    best = max(measured, key=measured.get)
    if "paddle" in measured and measured[best] < MARGIN * measured["paddle"]:
        best = "paddle"  # not clearly faster: keep the default, stable from run to run
    return kernels[best], GemmChoice(best, measured[best], measured, excluded, shape, forced is not None, notes)


@lru_cache(maxsize=None)
def gemm(hidden: int, intermediate: int) -> tuple[Kernel, GemmChoice]:
    """The kernel for a model of these sizes, chosen once per process (see the module docstring)."""
    return choose(probe_shape(hidden, intermediate))
