"""The GPU branches can't run here: their decision logic is tested directly with faked GPU facts."""

import pytest

from paddle_scorer.model.dtype_policy import GpuInfo, normalise_dtype, resolve_device, resolve_policy
from paddle_scorer.errors import DtypeError, UsageError

CPU_ONLY = GpuInfo(compiled_with_cuda=False, device_count=0)
A100 = GpuInfo(True, 4, (8, 0), "A100")
V100 = GpuInfo(True, 2, (7, 0), "V100")


def test_auto_device_is_cpu_without_cuda_and_gpu0_with_it():
    assert resolve_device("auto", CPU_ONLY) == "cpu"
    assert resolve_device("auto", A100) == "gpu:0"
    assert resolve_device("gpu:3", A100) == "gpu:3"


def test_gpu_request_on_cpu_build_explains_the_install():
    with pytest.raises(UsageError, match="CPU build.*paddlepaddle-gpu"):
        resolve_device("gpu", CPU_ONLY)
    with pytest.raises(UsageError, match="asks for GPU 2, but 2 GPU"):
        resolve_device("gpu:2", V100)


@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float32"])
def test_cpu_always_computes_float32_and_records_upcast(stored):
    p = resolve_policy("cpu", "auto", stored, CPU_ONLY)
    assert p.dtype == "float32"
    assert p.upcast is (stored != "float32")
    if stored != "float32":
        assert f"{stored} weights are upcast" in p.reason


@pytest.mark.parametrize("asked", ["float16", "fp16", "bfloat16", "bf16"])
def test_half_dtype_on_cpu_is_refused_with_the_reason(asked):
    with pytest.raises(DtypeError, match="cannot run on CPU: Paddle's CPU build has no .* kernels.*--dtype float32"):
        resolve_policy("cpu", asked, "float16", CPU_ONLY)


def test_gpu_auto_uses_the_checkpoints_half_dtype():
    assert resolve_policy("gpu:0", "auto", "float16", A100).dtype == "float16"
    assert resolve_policy("gpu:0", "auto", "bfloat16", A100).dtype == "bfloat16"


def test_gpu_without_bf16_falls_back_to_fp16_and_says_so():
    p = resolve_policy("gpu:0", "auto", "bfloat16", V100)
    assert p.dtype == "float16"
    assert "no bfloat16 support" in p.reason


def test_fp32_checkpoint_on_gpu_runs_in_bf16_where_supported_else_fp16():
    assert resolve_policy("gpu:0", "auto", "float32", A100).dtype == "bfloat16"
    assert resolve_policy("gpu:0", "auto", "float32", V100).dtype == "float16"
    # config.json's training dtype wins for fp32-stored weights
    assert resolve_policy("gpu:0", "auto", "float32", A100, config_dtype="float16").dtype == "float16"


def test_explicit_bf16_on_old_gpu_is_refused_and_fp32_allowed_anywhere():
    with pytest.raises(DtypeError, match="compute capability 8.0"):
        resolve_policy("gpu:0", "bfloat16", "float16", V100)
    assert resolve_policy("gpu:1", "float32", "float16", V100).dtype == "float32"


def test_unknown_dtype_names_are_refused():
    assert normalise_dtype("FP16") == "float16"
    with pytest.raises(UsageError, match="unknown dtype"):
        normalise_dtype("int8")
