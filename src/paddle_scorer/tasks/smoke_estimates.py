"""Pure estimates for ``smoke``: GPU memory, projected run time, and the exact GPU command line."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from paddle_scorer.model.dtype_policy import GpuInfo

GPU_ACTIVATION_FACTOR = 1.2  # weights x 1.2 for activations and KV cache at moderate batch sizes
GPU_CONTEXT_BYTES = 1 << 30  # the CUDA context and paddle's allocator reserve, about 1 GB
# An Ampere-or-newer GPU is assumed for the dtype choice (bfloat16 where the checkpoint is not fp16).
ASSUMED_GPU = GpuInfo(True, 1, (8, 0), "an Ampere-or-newer GPU")


def gpu_memory_needed(num_params: int, dtype: str) -> int:
    """Bytes a GPU needs for a model of ``num_params`` in ``dtype`` (weights + activations + context)."""
    size = 4 if dtype == "float32" else 2
    return int(num_params * size * GPU_ACTIVATION_FACTOR) + GPU_CONTEXT_BYTES


@dataclass
class Projection:
    """Time for the whole dataset on this machine, from what was measured on the smoke records."""

    measured_records: int
    measured_seconds: float
    seconds_per_record: float
    total_records: int
    remaining_records: int
    remaining_seconds: float
    total_seconds: float
    seconds_per_block: float = 0.0  # streamed: reading and setting every layer once, whatever the block size
    block_records: int | None = None


def project(measured_seconds: float, measured_records: int, total_records: int) -> Projection:
    """In RAM: seconds per record measured here x records."""
    if measured_records <= 0:
        raise ValueError("nothing was measured")
    per = measured_seconds / measured_records
    remaining = max(0, total_records - measured_records)
    return Projection(measured_records, measured_seconds, per, total_records, remaining, per * remaining,
                      per * total_records)


def project_streamed(one: float, many: float, n: int, total_records: int, block_records: int) -> Projection:
    """Streamed: a block costs ``a + b x records`` (``a``: every layer read and set once). Two measured
    blocks, of 1 record (``one`` seconds) and of ``n`` records (``many``), give ``a`` and ``b``."""
    b = max(0.0, (many - one) / (n - 1)) if n > 1 else many
    a = max(0.0, one - b)
    blocks = math.ceil(total_records / max(1, block_records))
    total = blocks * a + total_records * b
    remaining_records = max(0, total_records - n)
    remaining = math.ceil(remaining_records / max(1, block_records)) * a + remaining_records * b
    return Projection(n, many, b, total_records, remaining_records, remaining, total, a, block_records)


def project_streamed_generate(pass_seconds: float, total_records: int, block_records: int,
                              new_tokens: int) -> float:
    """Streamed generation: each block of records costs a prompt pass and one pass per further new token over the
    layers (a pass's time measured: reading dominates, so its size barely depends on the block's)."""
    blocks = math.ceil(total_records / max(1, block_records))
    return blocks * new_tokens * pass_seconds


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def gpu_command(model: Path | None, lora: Path | None, *, dtype: str, labels: list[str] | None,
                template: str | None, label_prefix: str | None, input: Path | None,
                tokenizer: Path | None = None) -> str:
    """The exact command for the GPU run (classify with labels, else generate), shell-quoted.

    ``model`` None: the adapter's lora_config.json names the base, and classify finds it the same way.
    """
    q = shlex.quote
    parts = ["paddle-scorer", "classify" if labels else "generate"]
    if model is not None:
        parts += ["--model", q(str(model))]
    if lora is not None:
        parts += ["--lora", q(str(lora))]
    if tokenizer is not None:
        parts += ["--tokenizer", q(str(tokenizer))]
    if labels:
        parts += ["--labels", q(",".join(labels))]
    if template is not None:
        parts += ["--template", q(template)]
    if label_prefix is not None and labels:
        parts += ["--label-prefix", q(label_prefix)]
    kind = "scores" if labels else "traces"
    output = f"out/{input.stem}.{kind}.jsonl" if input is not None else f"out/{kind}.jsonl"
    parts += ["--input", q(str(input)) if input is not None else "YOUR_DATA.jsonl", "--output", q(output)]
    parts += ["--device", "gpu", "--dtype", dtype]
    return " ".join(parts)
