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
   256 x 1024 x 1024 so that call overheads do not decide; rounds that time every candidate in turn, best of
   each); numpy's is used unless Paddle's is clearly faster (by more than :data:`MARGIN`): numpy's OpenBLAS
   degrades with the share of the CPU it loses when another program runs, Paddle's MKL does not (classify on a
   0.94B Llama, 2 cores, one busy-loop process beside it: numpy 1.83x its quiet time, Paddle 2.89x; with
   ``KMP_BLOCKTIME=0`` 2.70x), so a kernel that is only a little faster on an idle machine is not worth that;
3. the decision is kept for this machine (:data:`DECISIONS_FILE` in the cache folder, keyed by the CPU model and
   flags, the thread count, the libraries' versions and the shape): every later process uses it, so two runs of one
   command, ``classify`` and ``serve`` compute with the same kernel and give the same float32 results, whatever
   the load at start-up (the margin alone was crossed by load: 3 of ~21 processes chose differently in round 4 of
   the hostile tests). Two processes measuring at once both take the first one recorded. Delete the file to
   measure again (after a BIOS or hardware change the CPU key changes by itself).
   ``PADDLE_SCORER_GEMM=paddle|numpy`` forces one (it still has to pass its check).

What ran, its measured GFLOP/s and how it was decided (measured now, kept from an earlier process, forced) go
into every output's provenance and ``doctor``. The result of both
paths is the same float32 product (up to summation order, ~1e-7 relative), so scores agree to 1e-5.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

CANDIDATES = ("paddle", "numpy")
ENV = "PADDLE_SCORER_GEMM"
FORWARD_ENV = "PADDLE_SCORER_CPU_FORWARD"  # =library: the library's own forward on CPU (A/B checks, benchmarks)
CHECK_TOLERANCE = 1e-5
MARGIN = 1.2  # Paddle's kernel replaces numpy's only when it measures this much faster (on a quiet machine)
PREFERRED = "numpy"  # the kernel that degrades gracefully when other programs take cores (see the module docstring)
DECISIONS_FILE = "gemm-decisions.json"  # this machine's kernel decisions, in the cache folder (process.environment.cache_dir)


def library_forward_forced(environ=None) -> bool:
    """Whether ``PADDLE_SCORER_CPU_FORWARD=library`` asks for the library's forward on CPU. Any other value but empty
    or ``auto`` is refused: a typo (``libary``) would otherwise run the decoder and an A/B check would compare it
    with itself."""
    from paddle_scorer.errors import UsageError

    raw = (os.environ if environ is None else environ).get(FORWARD_ENV, "")
    value = raw.strip().lower()
    if value in ("", "auto"):
        return False
    if value == "library":
        return True
    raise UsageError(f"{FORWARD_ENV}={raw!r} is not a value paddle-scorer knows: set it to library (the model "
                     "library's own forward) or unset it (paddle-scorer's CPU decoder where it applies).")


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


def paddle_view(a: np.ndarray):
    """A paddle CPU tensor on the memory of ``a`` (C-contiguous, writable; no copy; dtype and shape are ``a``'s).
    Not ``paddle.utils.dlpack.from_dlpack``: Paddle 3.3's ``Tensor(...)`` constructor, which it and
    ``paddle.to_tensor`` call, leaks a Python list (its keyword names) on every call: ~90 bytes a GEMM operand, ~0.3 GB
    over a million demo records, without bound in a server (and weights made again for every streamed block). A
    tensor made by an op and given the array's memory leaks nothing, and costs half (4 us vs 9)."""
    from paddle_scorer.process.environment import paddle

    pd = paddle()
    t = pd.empty([0], dtype="float32")
    t.get_tensor()._share_data_with(pd.base.core.from_dlpack(a.__dlpack__()))
    return t


@dataclass
class Mat:
    """A weight matrix as numpy, with its paddle tensor made on first use (zero copy both ways)."""

    np: np.ndarray
    _pd: object = None

    @property
    def pd(self):
        if self._pd is None:
            arr = self.np if self.np.flags.writeable and self.np.flags.c_contiguous else np.ascontiguousarray(
                self.np).copy()
            self._pd = paddle_view(arr)
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
        from paddle_scorer.process.environment import paddle

        self.pd = paddle()

    def _t(self, a: np.ndarray):
        """A paddle tensor on ``a``'s memory (:func:`paddle_view`; copied first only when it is not C-contiguous or
        not writable)."""
        if not (a.flags.c_contiguous and a.flags.writeable):
            a = np.ascontiguousarray(a)
            if not a.flags.writeable:
                a = a.copy()
        return paddle_view(a)

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
    decided: str = "measured"  # measured (now, then kept for this machine) | kept (an earlier process's) | forced
    decided_at: str | None = None  # when it was measured (UTC)
    record: str | None = None  # the file that keeps this machine's decisions
    conditions: dict = field(default_factory=dict)  # how quiet the machine was when it was measured (Conditions)

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
    return measure_all({"k": kernel}, shape, rounds=reps)["k"]


def measure_all(kernels: dict[str, Kernel], shape: tuple[int, int, int], rounds: int = 5,
                conditions: dict | None = None) -> dict[str, float]:
    """GFLOP/s of each kernel on one ``[m, k] x [k, n]`` product: one warm-up each, then ``rounds`` rounds that time
    every kernel in turn (interleaved, so a burst of load from another process hits all of them), best of each.
    ``conditions`` (a dict) receives how quiet the machine was meanwhile (:func:`Conditions`)."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = Mat(rng.standard_normal((k, n), dtype=np.float32))
    times = {name: [] for name in kernels}
    for kern in kernels.values():  # two warm-up calls: threads started, output pages faulted in
        kern.mm(x, w)
        kern.mm(x, w)
    watch = Conditions()
    for _ in range(rounds):
        for name, kern in kernels.items():
            t0 = time.perf_counter()
            kern.mm(x, w)
            times[name].append(time.perf_counter() - t0)
    if conditions is not None:
        conditions.update(watch.done(times))
    return {name: 2.0 * m * k * n / min(t) / 1e9 for name, t in times.items()}


QUIET_FOREIGN = 0.10  # other programs' share of the machine's cores while measuring, above which it is noise
QUIET_SPREAD = 0.15  # median / best - 1 of a kernel's timings, above which the timings are noise


class Conditions:
    """How quiet the machine was while kernels were timed: the CPU time other programs (and the hypervisor: steal)
    took meanwhile, as a share of every core (``/proc/stat`` minus this process's own), and the spread of each
    kernel's repeated timings. A decision taken in noise is used for the run but measured again later."""

    def __init__(self):
        import resource

        self._resource = resource
        self.t0 = time.perf_counter()
        self.stat0 = _cpu_stat()
        self.self0 = self._own()

    def _own(self) -> float:
        r = self._resource.getrusage(self._resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def done(self, times: dict[str, list[float]]) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-6)
        stat1 = _cpu_stat()
        cores = os.cpu_count() or 1
        foreign = None
        steal = None
        if self.stat0 is not None and stat1 is not None:
            busy = stat1[0] - self.stat0[0]
            steal = (stat1[1] - self.stat0[1]) / (wall * cores)
            foreign = max(0.0, (busy - (self._own() - self.self0)) / (wall * cores))
        spread = max((float(np.median(t)) / min(t) - 1.0 for t in times.values() if t), default=0.0)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        quiet = (foreign is None or foreign <= QUIET_FOREIGN) and spread <= QUIET_SPREAD
        why = [] if quiet else [w for w in (
            f"other programs took {foreign:.0%} of the cores" if foreign is not None and foreign > QUIET_FOREIGN else "",
            f"timings spread {spread:.0%}" if spread > QUIET_SPREAD else "") if w]
        return {"quiet": bool(quiet), "foreign": None if foreign is None else round(foreign, 3),
                "steal": None if steal is None else round(steal, 3), "spread": round(spread, 3),
                "loadavg": None if load is None else round(load, 2), "noise": "; ".join(why) or None}


def _cpu_stat() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, steal seconds) from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as fh:
            f = [float(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    user, nice, system, _idle, _iowait, irq, softirq = f[:7]
    steal = f[7] if len(f) > 7 else 0.0
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def probe_shape(hidden: int, intermediate: int) -> tuple[int, int, int]:
    """A product like the model's MLP over 256 rows, capped so that timing it stays under ~0.1 s."""
    k = max(1024, min(int(hidden), 2048))
    n = max(1024, min(int(intermediate), 4096))
    return 256, k, n


def machine_key(shape: tuple[int, int, int]) -> str:
    """What a kernel decision depends on: the CPU, the threads, the libraries' versions, the product's shape."""
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            info = fh.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
        cpu = f"{model} [{hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:12]}]"
    except OSError:
        pass
    try:
        from importlib.metadata import version

        libs = f"paddle {version('paddlepaddle')} numpy {np.__version__}"
    except Exception:  # paddle's distribution may be named otherwise (a GPU build): the version is a detail
        libs = f"numpy {np.__version__}"
    threads = os.environ.get("OMP_NUM_THREADS", "") or str(os.cpu_count())
    return f"{cpu} | {threads} threads | {libs} | {'x'.join(map(str, shape))}"


def _decisions_file() -> Path:
    from paddle_scorer.process.environment import cache_dir

    return cache_dir() / DECISIONS_FILE


def _read_decision(path: Path, key: str) -> dict | None:
    """A kept decision for ``key``, or None (a missing, unreadable or damaged file or entry is never fatal)."""
    try:
        entry = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(entry, dict) and entry.get("path") in CANDIDATES and isinstance(entry.get("measured"), dict) \
        and all(isinstance(v, (int, float)) for v in entry["measured"].values())
    return entry if ok else None


def _keep_decision(path: Path, key: str, entry: dict) -> dict:
    """Record ``entry`` for ``key`` unless another process recorded one first (then that one is used: every process
    on this machine makes the same choice), or the one there was measured in noise and this one was not. Best effort:
    a cache folder that cannot be written costs a new measurement next time, never a failure."""
    import fcntl
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            earlier = _read_decision(path, key)
            if earlier is not None and not (_noisy(earlier) and not _noisy(entry)) and earlier.get("at") != entry.get(
                    "replaces"):
                return earlier
            try:
                data = json.loads(path.read_text())
                data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                data = {}
            data[key] = entry
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except OSError:
        pass
    return entry


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def choose(shape: tuple[int, int, int], environ=None, names: list[str] | None = None,
           keep: bool = True) -> tuple[Kernel, GemmChoice]:
    """The kernel for products of ``shape`` (see the module docstring). ``keep``: use and record this machine's
    decision (:data:`DECISIONS_FILE`); without it, measure afresh and record nothing."""
    environ = os.environ if environ is None else environ
    forced = environ.get(ENV, "").strip().lower() or None
    notes: list[str] = []
    if forced is not None and forced not in CANDIDATES:
        notes.append(f"{ENV}={forced!r} is not one of {', '.join(CANDIDATES)}; choosing by measurement")
        forced = None
    names = names or ([forced] if forced else list(CANDIDATES))
    kernels, excluded = {}, {}
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
    if not kernels:
        others = [n for n in CANDIDATES if n not in excluded]
        if forced and others:  # the forced kernel failed its check: choose among the others
            k, c = choose(shape, {}, others, keep)
            c.notes = notes + c.notes
            c.excluded.update(excluded)
            return k, c
        raise RuntimeError("no float32 GEMM kernel passed its self-check: " + "; ".join(
            f"{n}: {why}" for n, why in excluded.items()))
    if forced or len(kernels) == 1 or not keep:
        measured = {n: round(v, 1) for n, v in measure_all(kernels, shape).items()}
        best = _pick(measured)
        return kernels[best], GemmChoice(best, measured[best], measured, excluded, shape, forced is not None, notes,
                                         "forced" if forced else "measured", _now())
    path, key = _decisions_file(), machine_key(shape)
    entry = _read_decision(path, key)
    decided = "kept"
    if entry is None or entry["path"] not in kernels or _noisy(entry):
        conditions: dict = {}
        measured = {n: round(v, 1) for n, v in measure_all(kernels, shape, conditions=conditions).items()}
        mine = {"path": _pick(measured), "measured": measured, "at": _now(), "conditions": conditions}
        if entry is not None:
            mine["replaces"] = entry.get("at")  # an earlier decision taken in noise: this measurement replaces it
        entry = _keep_decision(path, key, mine)
        decided = "measured" if entry is mine else "kept"
        if entry is mine and _noisy(mine):
            notes.append(f"the GEMM kernel was measured while the machine was busy ({mine['conditions']['noise']}): "
                         "used for this run, measured again by the next one")
    best = entry["path"]
    measured = {n: float(v) for n, v in entry["measured"].items()}
    return kernels[best], GemmChoice(best, measured.get(best, 0.0), measured, excluded, shape, False, notes, decided,
                                     entry.get("at"), str(path), dict(entry.get("conditions") or {}))


def _noisy(entry: dict) -> bool:
    """A decision measured while other programs ran (or before this was recorded: no conditions) is not kept for good."""
    c = entry.get("conditions")
    return not (isinstance(c, dict) and c.get("quiet") is True)


def recheck(shapes: list[tuple[int, int, int]] | None = None) -> list[GemmChoice]:
    """Measure this machine's kernel decisions again (``doctor --recheck``): every recorded shape (or ``shapes``),
    replacing what is recorded."""
    path = _decisions_file()
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    keys = {k: tuple(int(x) for x in k.rsplit("|", 1)[1].strip().split("x")) for k in data if "|" in k}
    wanted = list(dict.fromkeys(list(keys.values()) + list(shapes or [])))
    out = []
    for shape in wanted:
        _forget(path, machine_key(shape))
        out.append(choose(shape)[1])
    return out


def _forget(path: Path, key: str) -> None:
    import fcntl

    try:
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(path.read_text())
            if isinstance(data, dict) and key in data:
                del data[key]
                path.write_text(json.dumps(data, indent=1))
    except (OSError, ValueError):
        pass


def decisions() -> list[dict]:
    """This machine's recorded kernel decisions (``doctor``): shape, kernel, GFLOP/s measured, when, how quiet."""
    path = _decisions_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for key, entry in (data.items() if isinstance(data, dict) else []):
        if not isinstance(entry, dict) or "|" not in key:
            continue
        out.append({"key": key, "shape": key.rsplit("|", 1)[1].strip(), "path": entry.get("path"),
                    "measured": entry.get("measured"), "at": entry.get("at"), "conditions": entry.get("conditions"),
                    "this_machine": key.split("|")[0] == machine_key((0, 0, 0)).split("|")[0]})
    return out


def _pick(measured: dict[str, float]) -> str:
    """numpy's kernel (:data:`PREFERRED`) unless another is faster by more than :data:`MARGIN`."""
    best = max(measured, key=measured.get)
    if PREFERRED in measured and measured[best] < MARGIN * measured[PREFERRED]:
        best = PREFERRED
    return best


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=None)
def gemm(hidden: int, intermediate: int) -> tuple[Kernel, GemmChoice]:
    """The kernel for a model of these sizes, chosen once per process (see the module docstring)."""
    return choose(probe_shape(hidden, intermediate))
