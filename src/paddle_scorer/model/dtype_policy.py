"""Which device and compute dtype to run on: pure decision logic, tested directly.

* CPU: always float32. Paddle's CPU build has no float16/bfloat16 kernels ("kernel ... float16 ...
  not registered"), so half-precision checkpoints are upcast on load, and asking for a half dtype on
  CPU is refused before anything is loaded.
* GPU, ``auto``: the checkpoint's half dtype. bfloat16 only where the GPU supports it (compute
  capability >= 8.0, i.e. Ampere or newer); otherwise float16. A float32 checkpoint runs in
  bfloat16 where supported, else float16.
* Softmax / log-softmax are always computed in float32 by the scorer, whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from paddle_scorer.errors import DtypeError, UsageError

DTYPES = ("float32", "float16", "bfloat16")
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "auto": "auto"}


@dataclass(frozen=True)
class GpuInfo:
    """What the paddle build and the driver report (fake it in tests)."""

    compiled_with_cuda: bool
    device_count: int
    compute_capability: tuple[int, int] | None = None  # of the chosen device
    name: str | None = None


@dataclass(frozen=True)
class Policy:
    device: str  # "cpu" or "gpu:N"
    dtype: str  # compute dtype
    stored_dtype: str  # dominant dtype in the checkpoint
    upcast: bool  # stored half weights converted to float32
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def normalise_dtype(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key != "auto" and key not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of auto, float32, float16, bfloat16.")
    return key


def resolve_device(request: str, gpu: GpuInfo, selected: int | None = None) -> str:
    """``selected``: the GPU ``paddle.distributed.launch`` gave this worker (FLAGS_selected_gpus)."""
    req = request.strip().lower()
    if req == "auto":
        if gpu.compiled_with_cuda and gpu.device_count > 0:
            return f"gpu:{selected or 0}"
        return "cpu"
    if req == "cpu":
        return "cpu"
    if req.startswith("gpu"):
        index = selected if selected is not None else 0
        if ":" in req:
            try:
                index = int(req.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"bad device {request!r}; use cpu, gpu or gpu:N.") from None
        if not gpu.compiled_with_cuda:
            raise UsageError(
                f"--device {request} needs a GPU build of paddle, but this is the CPU build; install "
                "paddlepaddle-gpu for your CUDA (see README, GPU install) or use --device cpu."
            )
        if index >= gpu.device_count:
            raise UsageError(
                f"--device {request} asks for GPU {index}, but {gpu.device_count} GPU(s) are visible; "
                "check CUDA_VISIBLE_DEVICES or pick another index."
            )
        return f"gpu:{index}"
    raise UsageError(f"bad device {request!r}; use auto, cpu, gpu or gpu:N.")


def bf16_supported(gpu: GpuInfo) -> bool:
    return gpu.compute_capability is not None and gpu.compute_capability >= (8, 0)


def resolve_policy(device: str, dtype: str, stored_dtype: str, gpu: GpuInfo, config_dtype: str | None = None) -> Policy:
    """Decide the compute dtype for ``device`` (already resolved) and the requested ``dtype``."""
    dtype = normalise_dtype(dtype)
    stored = stored_dtype if stored_dtype in DTYPES else "float32"
    on_cpu = device == "cpu"
    if on_cpu:
        if dtype in ("float16", "bfloat16"):
            raise DtypeError(
                f"--dtype {dtype} cannot run on CPU: Paddle's CPU build has no {dtype} kernels (it fails "
                f"with 'kernel ... {dtype} ... not registered'); use --dtype float32 (the CPU default, "
                f"weights are upcast on load) or run on a GPU."
            )
        reason = "CPU computes in float32 only (Paddle has no CPU float16/bfloat16 kernels)"
        if stored != "float32":
            reason += f"; {stored} weights are upcast to float32 on load"
        return Policy(device, "float32", stored, stored != "float32", reason)

    bf16 = bf16_supported(gpu)
    if dtype == "bfloat16" and not bf16:
        raise DtypeError(
            f"--dtype bfloat16 needs a GPU with compute capability 8.0 or newer; {gpu.name or 'this GPU'} "
            f"reports {gpu.compute_capability}: use --dtype float16 or float32."
        )
    if dtype != "auto":
        reason = f"requested --dtype {dtype}"
        return Policy(device, dtype, stored, dtype == "float32" and stored != "float32", reason)

    half = stored if stored in ("float16", "bfloat16") else (config_dtype if config_dtype in ("float16", "bfloat16") else None)
    if half == "bfloat16" and not bf16:
        return Policy(device, "float16", stored, False,
                      "checkpoint is bfloat16 but this GPU has no bfloat16 support (compute capability < 8.0); "
                      "running in float16 (values beyond float16's range would overflow)")
    if half is not None:
        return Policy(device, half, stored, False, f"GPU: the checkpoint's own half dtype ({half})")
    chosen = "bfloat16" if bf16 else "float16"
    return Policy(device, chosen, stored, False,
                  f"GPU: float32 checkpoint run in {chosen} ({'bfloat16 supported' if bf16 else 'no bfloat16 support'})")


def probe_gpu() -> GpuInfo:
    """Ask paddle what GPUs there are (imports paddle)."""
    from paddle_scorer.process.environment import paddle

    pd = paddle()
    compiled = bool(pd.device.is_compiled_with_cuda())
    count = pd.device.cuda.device_count() if compiled else 0
    cap = name = None
    if count:
        props = pd.device.cuda.get_device_properties(0)
        cap = (props.major, props.minor)
        name = props.name
    return GpuInfo(compiled, count, cap, name)


def plan_policy(device: str, dtype: str, stored: str, config_dtype: str | None, gpu: GpuInfo | None = None) -> Policy:
    """Decide device and dtype (the launcher's GPU for this worker, when it gave one); refuses impossible
    requests before any weights are read."""
    from paddle_scorer.process.launcher import worker_from_env

    dtype = normalise_dtype(dtype)
    if gpu is None:
        gpu = GpuInfo(False, 0) if device == "cpu" else probe_gpu()
    return resolve_policy(resolve_device(device, gpu, worker_from_env().selected_gpu), dtype, stored, gpu, config_dtype)
