"""Process set-up that must happen before paddle is imported, and the one place that imports it.

* On AMD CPUs Paddle's MKL takes a slow code path unless ``MKL_DEBUG_CPU_TYPE=5`` is set before
  paddle loads (2.6x on an fp32 matmul on our machines); we set it when the user has not.
* ``OMP_NUM_THREADS`` defaults to the cores this process may use, divided between launcher workers.
* PaddleNLP's INFO logging and deprecation warnings are silenced: our output is the product.

``settings()`` records what was set and by whom, for provenance and ``doctor``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from functools import lru_cache

from paddle_scorer.launcher import under_launcher, workers_on_host

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
    thread count too (numpy's BLAS is one of the CPU GEMM kernels, :mod:`paddle_scorer.kernels`); it is read when
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
def _signal_handlers_kept():
    """Importing paddle installs glog's C-level handler for SIGTERM (and SIGINT), which prints a 'FatalError:
    Termination signal' dump with a C++ traceback and kills the process: a `kill PID` would skip our clean
    stop (working files kept for --resume, temporary folders removed). Put back what Python had before."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


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
    with _signal_handlers_kept():
        with contextlib.redirect_stderr(io.StringIO()):
            import paddle as _paddle  # noqa: PLC0415

        try:
            from paddlenlp.utils.log import logger  # noqa: PLC0415

            logger.set_level("ERROR")
        except Exception:  # pragma: no cover - paddlenlp missing is reported by the loader
            pass
    return _paddle


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
