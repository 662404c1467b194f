"""Process set-up that must happen before paddle is imported, and the one place that imports it.

* On AMD CPUs Paddle's MKL takes a slow code path unless ``MKL_DEBUG_CPU_TYPE=5`` is set before
  paddle loads (2.6x on an fp32 matmul on our machines); we set it when the user has not.
* ``OMP_NUM_THREADS`` defaults to the cores this process may use, divided between launcher workers.
* PaddleNLP's INFO logging and deprecation warnings are silenced: our output is the product.

``settings()`` records what was set and by whom, for provenance and ``doctor``.
"""

from __future__ import annotations

import os
from pathlib import Path
import warnings
from contextlib import contextmanager
from functools import lru_cache

from paddle_scorer.process.launcher import under_launcher, workers_on_host

_SET_BY_US: dict[str, str] = {}


def cpu_vendor() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def thread_count(environ, cores: int | None = None) -> int | None:
    """Threads to set, or None to leave the user's setting alone.

    ``PADDLE_SCORER_THREADS`` wins. Otherwise: the usable cores divided between the launcher's
    workers on this host. ``paddle.distributed.launch`` imports paddle, which sets
    ``OMP_NUM_THREADS=1`` when unset, and workers inherit that 1: under the launcher a 1 is
    treated as unset.
    """
    cores = usable_cores() if cores is None else cores
    explicit = environ.get("PADDLE_SCORER_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    current = environ.get("OMP_NUM_THREADS")
    if current is None or (under_launcher(environ) and current == "1"):
        return max(1, cores // workers_on_host(environ))
    return None


def configure_env(environ=os.environ) -> dict[str, str]:
    """Set the CPU speed knobs the user has not set. Returns what was set. ``OPENBLAS_NUM_THREADS`` follows the
    thread count too (numpy's BLAS is one of the CPU GEMM kernels, :mod:`paddle_scorer.compute.gemm`); it is read when
    numpy loads, so the CLI calls :func:`prepare` before importing numpy."""
    done = {}
    if "MKL_DEBUG_CPU_TYPE" not in environ and cpu_vendor() == "AuthenticAMD":
        environ["MKL_DEBUG_CPU_TYPE"] = "5"
        done["MKL_DEBUG_CPU_TYPE"] = "5"
    threads = thread_count(environ)
    if threads is not None:
        environ["OMP_NUM_THREADS"] = str(threads)
        done["OMP_NUM_THREADS"] = str(threads)
    if "OPENBLAS_NUM_THREADS" not in environ and environ.get("OMP_NUM_THREADS"):
        environ["OPENBLAS_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
        done["OPENBLAS_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
    # Never reach for a model hub: everything is local.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if var not in environ:
            environ[var] = "1"
    return done


def prepare() -> None:
    """Set the process's CPU knobs once, before paddle (and, from the CLI, numpy) is imported."""
    import sys

    if not _PREPARED and "paddle" not in sys.modules:
        _SET_BY_US.update(configure_env())
    _PREPARED.append(True)


_PREPARED: list[bool] = []


def settings() -> dict[str, dict[str, str | None]]:
    return {
        var: {"value": os.environ.get(var), "set_by": "paddle-scorer" if var in _SET_BY_US else "user"}
        for var in ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }


@contextmanager
def _stop_signals_deferred():
    """Hold SIGINT/SIGTERM while paddle is imported, then act on one that arrived, as Python's handlers would have.

    Two things go wrong otherwise. Importing paddle runs glog's ``InstallFailureSignalHandler`` (in
    ``paddle.base``'s bootstrap, ``core.init_glog``), whose C handler answers SIGTERM/SIGINT with a "FatalError:
    Termination signal" dump and kills the process: no clean-up, a merge's temporary folder left behind. And a
    KeyboardInterrupt raised inside paddle's import machinery can surface as an ImportError ("internal
    error"). Blocking the signals in the main thread is not enough: numpy's BLAS threads exist already and
    the kernel hands a process-wide signal to any thread that does not block it.

    So: (1) Python's handlers are replaced by ones that only record the signal; (2) the moment ``init_glog``
    returns, the recording handlers are put back in place of glog's (a one-shot import hook wraps it); (3) after
    the import the previous handlers return, and a recorded signal is raised again for them: "interrupted",
    and the command cleans up as for any Ctrl-C."""
    import signal
    import sys
    import threading

    from paddle_scorer.process.signals import signals_held

    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return
    stops = (signal.SIGTERM, signal.SIGINT)
    # signal.getsignal still returns the recording handler after glog's sigaction: re-installing it undoes glog's
    hook = _GlogHandlersUndone(lambda: [signal.signal(sig, signal.getsignal(sig)) for sig in stops])
    sys.meta_path.insert(0, hook)
    got: list[int] = []
    try:
        with signals_held() as got:  # records instead of acting; the previous handlers come back on exit
            yield
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        if got:  # also when the import failed: the user asked to stop, that wins
            signal.raise_signal(got[0])  # delivered to the handler the command had installed


class _GlogHandlersUndone:
    """A meta-path hook that finds nothing itself: when ``paddle.base.core`` is loaded, its ``init_glog`` is
    wrapped so that ``undo()`` runs right after glog installed its signal handlers."""

    def __init__(self, undo):
        self.undo = undo

    def find_spec(self, name, path=None, target=None):
        if name != "paddle.base.core":
            return None
        import importlib.machinery
        import sys

        sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec, undo = spec.loader.exec_module, self.undo

        def exec_module(module):
            real_exec(module)
            init = getattr(module, "init_glog", None)
            if callable(init):
                def init_glog(*args, **kwargs):
                    try:
                        return init(*args, **kwargs)
                    finally:
                        undo()

                module.init_glog = init_glog

        spec.loader.exec_module = exec_module  # this loader object belongs to this one spec
        return spec


@lru_cache(maxsize=1)
def paddle():
    """Import paddle (and quiet paddlenlp) once, after the environment is set."""
    prepare()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import contextlib
    import io

    # paddle prints "WARNING: OMP_NUM_THREADS set to N ... PLEASE USE OMP_NUM_THREADS WISELY" on
    # import whenever threads > 1 (a data-parallel *training* warning); we set it on purpose.
    # A stop signal during the import is held and acted on after it (see _stop_signals_deferred).
    with _stop_signals_deferred():
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                import paddle as _paddle  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            if exc.name != "paddle":
                raise
            raise missing_paddle() from None

        try:
            from paddlenlp.utils.log import logger  # noqa: PLC0415

            logger.set_level("ERROR")
        except Exception:  # pragma: no cover - paddlenlp missing is reported by the loader
            pass
    return _paddle


def missing_paddle():
    """The one sentence for an environment without paddle (a model library's extra installed without cpu/gpu)."""
    from paddle_scorer.errors import SetupError

    return SetupError(
        "paddle is not installed in this environment (the cpu or gpu extra was left out); install it next to the "
        "model library: pip install -e '.[cpu,nlp]' (or '.[cpu,formers]') for CPU, or for a GPU first the "
        "paddlepaddle-gpu wheel for your CUDA from Paddle's index, then pip install -e '.[gpu,nlp]'; "
        "`paddle-scorer doctor` shows what is installed."
    )


PROVENANCE_PACKAGES = ("paddle-scorer", "paddlepaddle", "paddlepaddle-gpu", "paddlenlp", "paddleformers", "numpy")


def versions(names=PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None``: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in names:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


CACHE_ENV = "PADDLE_SCORER_CACHE_DIR"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@lru_cache(maxsize=None)
def keep_freed_memory(up_to: int) -> bool:
    """Let freed arrays of up to ``up_to`` bytes be reused by the next ones instead of going back to the system
    (glibc's ``mallopt``: arrays below the mmap threshold come from the heap, and the heap is not trimmed below
    ``2 * up_to``). A layer-streamed model allocates the same shapes layer after layer: fresh pages cost a fault each
    (measured: laying out one ERNIE-4.5-MoE-shaped layer, 4.6 s with fresh pages, 0.9 s reused, 2 cores). Returns
    whether it applied (False off glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(up_to)) and libc.mallopt(_M_TRIM_THRESHOLD, int(2 * up_to)))
    except (OSError, AttributeError):
        return False


def cache_dir(environ=os.environ) -> Path:
    """Where paddle-scorer keeps what it measured or hashed for this machine (weight hashes, GEMM decisions):
    ``$PADDLE_SCORER_CACHE_DIR``, else ``$XDG_CACHE_HOME/paddle-scorer`` or ``~/.cache/paddle-scorer``."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paddle-scorer"
