"""`doctor`: is this Python environment able to run paddle-scorer, and how fast?

:func:`collect` gathers the facts (Python, packages, the paddle build and its GPUs, threads and MKL
settings, free RAM and disk); :func:`version_findings` and :func:`runtime_findings` are pure
functions over those facts that flag the combinations known to break (see FIELD-NOTES), each with
the command that fixes it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Distributions whose versions matter (the pins in pyproject.toml and what paddlenlp imports).
PACKAGES = (
    "paddle-scorer", "paddlepaddle", "paddlepaddle-gpu", "paddlenlp", "paddleformers", "aistudio-sdk",
    "pyarrow", "datasets", "numpy", "typer", "rich", "safetensors", "psutil", "ml-dtypes", "matplotlib",
    "fastapi", "uvicorn",  # the serve extra
)
OPTIONAL = ("paddleformers", "paddlenlp", "aistudio-sdk", "paddlepaddle-gpu", "paddlepaddle", "fastapi", "uvicorn")
GEMM_PROBE = (2048, 5504)  # hidden, intermediate of the shape doctor times (a ~0.9B Llama's MLP over 256 rows)

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning
    code: str
    message: str  # what is wrong and the command that fixes it

    def to_dict(self) -> dict:
        return asdict(self)


def release(version: str | None) -> tuple[int, ...] | None:
    """``"3.0.0b4"`` -> ``(3, 0, 0)``; the numeric release part only (enough for these rules)."""
    if not version:
        return None
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _at_least(version: str | None, *floor: int) -> bool:
    r = release(version)
    return r is not None and r >= floor


def installed_versions(names=PACKAGES) -> dict[str, str | None]:
    from paddle_scorer.process.environment import versions

    return versions(names)


def version_findings(v: dict[str, str | None]) -> list[Finding]:
    """Known-bad package combinations, from installed versions (``None``: not installed)."""
    found: list[Finding] = []
    cpu, gpu, nlp = v.get("paddlepaddle"), v.get("paddlepaddle-gpu"), v.get("paddlenlp")
    paddle_version = gpu or cpu
    if cpu and gpu:
        found.append(Finding(ERROR, "two-paddle-builds",
                             f"both paddlepaddle {cpu} and paddlepaddle-gpu {gpu} are installed; they provide the same "
                             "`paddle` module and overwrite each other's files: `pip uninstall -y paddlepaddle "
                             "paddlepaddle-gpu`, then install exactly one (README, install)."))
    if not paddle_version:
        found.append(Finding(ERROR, "no-paddle",
                             "paddle is not installed: `pip install -e '.[cpu]'` (CPU) or the GPU wheel for your CUDA "
                             "(README, GPU install)."))
    pf = v.get("paddleformers")
    if not nlp and not pf:
        found.append(Finding(ERROR, "no-model-library",
                             "no model library is installed: `pip install -e '.[cpu,nlp]'` (PaddleNLP 3.0.0b4: Llama, "
                             "Qwen2) or, in a virtualenv of its own, `pip install -e '.[cpu,formers]'` (PaddleFormers "
                             "1.2.0: Llama, ERNIE 4.5); README, install."))
    if nlp and pf:
        found.append(Finding(ERROR, "two-model-libraries",
                             f"paddlenlp {nlp} and paddleformers {pf} are installed in one virtualenv, but their pins "
                             "conflict (aistudio-sdk, tokenizers, huggingface-hub) and one of them breaks: use one "
                             "virtualenv per library (`make venv` and `make venv-formers`; README, install)."))
    if pf and release(pf) != (1, 2, 0):
        found.append(Finding(WARNING, "paddleformers-version",
                             f"paddleformers {pf} is installed; paddle-scorer is tested with 1.2.0 (layouts, fused "
                             "modules and cache objects change between releases): `pip install paddleformers==1.2.0`."))
    if nlp and paddle_version:
        if (release(nlp) or ())[:1] == (2,) and _at_least(paddle_version, 3):
            found.append(Finding(ERROR, "paddlenlp2-paddle3",
                                 f"paddlenlp {nlp} is the paddle 2.x line and does not work with paddle "
                                 f"{paddle_version}: `pip install paddlenlp==3.0.0b4`."))
        elif _at_least(nlp, 3) and (release(paddle_version) or ())[:1] == (2,):
            found.append(Finding(WARNING, "paddlenlp3-paddle2",
                                 f"paddlenlp {nlp} is built for paddle 3.x but paddle {paddle_version} is installed: "
                                 "install paddlepaddle 3.3.1 (or the matching GPU wheel)."))
    sdk = v.get("aistudio-sdk")
    if nlp and _at_least(sdk, 0, 3):
        found.append(Finding(ERROR, "aistudio-sdk",
                             f"aistudio-sdk {sdk} removed aistudio_sdk.hub.download, which paddlenlp imports "
                             "(ImportError: cannot import name 'download'): `pip install aistudio-sdk==0.2.6`."))
    numpy, arrow = v.get("numpy"), v.get("pyarrow")
    if _at_least(arrow, 21) and numpy and not _at_least(numpy, 2):
        found.append(Finding(ERROR, "pyarrow-numpy",
                             f"pyarrow {arrow} needs NumPy 2 but numpy {numpy} is installed (paddlenlp caps it at "
                             "1.26.4), so importing datasets fails: `pip install 'pyarrow<21'`."))
    ds = v.get("datasets")
    if _at_least(ds, 4, 1) and arrow and not _at_least(arrow, 21):
        found.append(Finding(WARNING, "datasets-pyarrow",
                             f"datasets {ds} expects pyarrow >= 21 but pyarrow {arrow} is installed (and must stay "
                             "below 21 with NumPy 1): `pip install datasets==4.0.0`."))
    if (nlp or pf) and _at_least(numpy, 2):
        lib = f"paddlenlp {nlp}" if nlp else f"paddleformers {pf}"
        found.append(Finding(WARNING, "numpy2-paddlenlp",
                             f"numpy {numpy} is installed but {lib} supports numpy<=1.26.4: "
                             "`pip install 'numpy<=1.26.4'`."))
    return found


def runtime_findings(facts: dict) -> list[Finding]:
    """Problems in the running environment: imports that fail, an unseen GPU, slow CPU settings."""
    found: list[Finding] = []
    pd = facts.get("paddle", {})
    if pd.get("error"):
        found.append(Finding(ERROR, "paddle-import", f"`import paddle` fails: {pd['error']}"))
    for name, lib in (facts.get("libraries") or {}).items():
        if lib.get("installed") and lib.get("error"):
            found.append(Finding(ERROR, f"{name}-import", f"`import {name}` fails: {lib['error']} "
                                                          "(see the version findings for the usual causes)."))
    if pd.get("compiled_with_cuda") and not pd.get("device_count"):
        found.append(Finding(WARNING, "gpu-not-visible",
                             "paddle is the GPU build but sees no GPU: check `nvidia-smi` and CUDA_VISIBLE_DEVICES "
                             f"(now {pd.get('cuda_visible_devices')!r})."))
    cpu = facts.get("cpu", {})
    mkl = (cpu.get("settings") or {}).get("MKL_DEBUG_CPU_TYPE", {}).get("value")
    if cpu.get("vendor") == "AuthenticAMD" and mkl != "5":
        found.append(Finding(WARNING, "amd-mkl",
                             f"AMD CPU with MKL_DEBUG_CPU_TYPE={mkl!r}: Paddle's MKL takes its slow code path "
                             "(2.6x slower matmuls measured); unset it (paddle-scorer then sets 5) or `export "
                             "MKL_DEBUG_CPU_TYPE=5`."))
    for name, why in ((cpu.get("gemm") or {}).get("excluded") or {}).items():
        if not why.startswith("unavailable"):
            found.append(Finding(WARNING, f"gemm-{name}",
                                 f"the {name} float32 GEMM kernel failed its start-up check and is not used ({why}); "
                                 "scores use the other kernel; report this with `paddle-scorer doctor --json`."))
    threads = (cpu.get("settings") or {}).get("OMP_NUM_THREADS", {}).get("value")
    cores = cpu.get("usable_cores")
    if threads and threads.isdigit() and cores and int(threads) > cores:
        found.append(Finding(WARNING, "threads-oversubscribed",
                             f"OMP_NUM_THREADS={threads} but only {cores} cores are usable: threads fight for cores; "
                             f"`export OMP_NUM_THREADS={cores}`."))
    return found


def _paddle_facts() -> dict:
    facts: dict = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        from paddle_scorer.process.environment import paddle

        pd = paddle()
    except Exception as exc:  # any import failure is the finding
        facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
    facts["version"] = pd.__version__
    compiled = bool(pd.device.is_compiled_with_cuda())
    facts["compiled_with_cuda"] = compiled
    facts["build"] = "gpu" if compiled else "cpu"
    facts["cuda"] = pd.version.cuda() if compiled else None
    facts["cudnn"] = pd.version.cudnn() if compiled else None
    facts["with_mkl"] = str(getattr(pd.version, "with_mkl", "unknown"))
    devices = []
    count = 0
    if compiled:
        try:
            count = int(pd.device.cuda.device_count())
            for i in range(count):
                props = pd.device.cuda.get_device_properties(i)
                cap = (props.major, props.minor)
                devices.append({"index": i, "name": props.name, "compute_capability": f"{cap[0]}.{cap[1]}",
                                "memory_bytes": int(getattr(props, "total_memory", 0)) or None,
                                "float16": cap >= (5, 3), "bfloat16": cap >= (8, 0)})
        except Exception as exc:  # a driver problem is a fact to report, not a crash
            facts["device_error"] = f"{type(exc).__name__}: {exc}"
    facts["device_count"] = count
    facts["devices"] = devices
    facts["cpu_half_precision"] = False  # no float16/bfloat16 CPU kernels in paddle (FIELD-NOTES)
    return facts


def _gemm_facts(recheck: bool = False) -> dict:
    """Which float32 GEMM kernel CPU scoring uses here and how fast each candidate ran (:mod:`paddle_scorer.compute.gemm`),
    and every decision this machine keeps (shape, kernel, when, how quiet); ``recheck``: measured again first."""
    from paddle_scorer.compute import gemm

    try:
        rechecked = gemm.recheck([gemm.probe_shape(*GEMM_PROBE)]) if recheck else None
        _, choice = gemm.choose(gemm.probe_shape(*GEMM_PROBE))
    except Exception as exc:  # no kernel passed: the finding says so
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {**choice.to_dict(), "decisions": gemm.decisions(), "rechecked": len(rechecked) if rechecked else 0}


def _library_facts() -> dict:
    """Per model library: installed version, whether it imports, the architectures paddle-scorer builds with it.
    Only installed libraries are imported (PaddleFormers takes ~4 s)."""
    from paddle_scorer.model import libraries
    from paddle_scorer.process.environment import versions

    out = {}
    for lib in libraries.LIBRARIES:
        if lib.native:  # paddle-scorer's own decoder: nothing to install or import (its families: `inspect`)
            continue
        v = versions((lib.distribution,)).get(lib.distribution)
        facts = {"installed": v is not None, "version": v, "import_ok": None, "error": None,
                 "architectures": lib.architectures}
        if v is not None:
            try:
                lib.module("transformers")
                facts["import_ok"] = True
            except Exception as exc:  # any import failure is the finding
                facts["import_ok"], facts["error"] = False, f"{type(exc).__name__}: {exc}"
        out[lib.name] = facts
    return out


def collect(recheck: bool = False) -> dict:
    """Every fact ``doctor`` reports, plus the findings and an overall ``ok``; ``recheck``: the GEMM kernel decisions
    measured again."""
    import psutil

    from paddle_scorer.process import environment

    versions = installed_versions()
    paddle_facts = _paddle_facts()  # imports paddle (after runtime sets the CPU knobs)
    settings = environment.settings()
    vm = psutil.virtual_memory()
    disks = []
    for label, path in (("working directory", Path.cwd()), ("temp", Path(tempfile.gettempdir()))):
        try:
            du = shutil.disk_usage(path)
            disks.append({"what": label, "path": str(path), "free": du.free, "total": du.total})
        except OSError:
            pass
    facts = {
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "implementation": platform.python_implementation()},
        "platform": platform.platform(),
        "packages": versions,
        "paddle": paddle_facts,
        "libraries": _library_facts(),
        "cpu": {
            "vendor": environment.cpu_vendor(),
            "usable_cores": environment.usable_cores(),
            "settings": settings,
            "mkl_debug_cpu_type_set_by_us": settings["MKL_DEBUG_CPU_TYPE"]["set_by"] == "paddle-scorer"
            and settings["MKL_DEBUG_CPU_TYPE"]["value"] is not None,
            "gemm": _gemm_facts(recheck) if not paddle_facts.get("error") else None,
        },
        "memory": {"total": vm.total, "available": vm.available},
        "disk": disks,
    }
    findings = version_findings(versions) + runtime_findings(facts)
    facts["findings"] = [f.to_dict() for f in findings]
    facts["ok"] = not any(f.level == ERROR for f in findings)
    return facts
