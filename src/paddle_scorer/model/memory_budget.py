"""The one memory rule: load in RAM, stream layer by layer, or refuse — decided before loading.

Every command that loads a model (``classify``, ``generate``, ``serve``, ``smoke``, ``merge --verify``)
and ``inspect`` ask this module, so what ``smoke``/``inspect`` promise is what the loader does.

* The budget is ``--memory-limit`` (the whole process, interpreter included) or, by default, the
  RAM available now plus what this process already holds, minus a margin.
* In RAM (CPU) needs the weights in the compute dtype x 1.1 plus the interpreter with paddle and
  PaddleNLP imported (about 0.65 GB measured on paddle 3.3.1 + paddlenlp 3.0.0b4).
* Streamed needs, at once: the two largest decoder layers (the one computing and the one being
  read ahead), the largest tensor outside the layers (embeddings or LM head, used at the start and
  the end of each block), the interpreter, one layer call's activations, and the hidden states of one
  block of records: :func:`records_per_block` sizes a block from what is left, for ``inspect``,
  ``smoke``, ``classify`` and the streaming executor alike.
* The default budget is divided between the launcher's workers on this host (each would otherwise
  count all free RAM as its own); an explicit ``--memory-limit`` is each process's own.
* On GPU the loader always loads in GPU memory (paddle reports OOM itself); ``smoke --gpu-memory``
  projects it beforehand.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from paddle_scorer.errors import CheckpointError, UsageError
from paddle_scorer.process.launcher import workers_on_host

CALL_TOKENS = 1024
"""Padded tokens per forward (in RAM: classify's default batches) or per layer call (streamed). Matmuls
with few rows run at half speed on CPU ([264, 4096] x [4096, 11008]: 39 GFLOP/s on the 2-core box of
benchmarks/RESULTS.md; >= 528 rows: 70), and a fixed 8 short prompts are ~260 rows."""



class MemoryBudgetError(CheckpointError):
    """The model does not fit the memory budget the way it was asked to run."""

    def __init__(self, message: str, need: int, budget: int, source: str):
        super().__init__(message)
        self.need, self.budget, self.source = need, budget, source

IN_RAM = "in-ram"
STREAMED = "streamed"
EXECUTIONS = ("auto", IN_RAM, STREAMED)

LOAD_FACTOR = 1.1  # weights x 1.1: allocator slack and the one tensor being cast while loading
INTERPRETER_BYTES = 700 * 1024**2  # python + paddle + paddlenlp imported (measured ~650 MB)
MARGIN_BYTES = 512 * 1024**2  # left to the rest of the machine when the budget is "available RAM"
STREAM_WORKING_BYTES = 64 * 1024**2  # temporaries of one batch through one layer, beyond the hidden states
GB = 1024**3


@dataclass(frozen=True)
class Dims:
    """The sizes the activation estimates need, from config.json."""

    hidden: int = 1
    heads: int = 1
    intermediate: int = 1

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        def num(key, default):
            v = cfg.get(key)
            return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default

        hidden = num("hidden_size", 1)
        return cls(hidden, num("num_attention_heads", 1), num("intermediate_size", 4 * hidden))


def working_bytes(dims: Dims | None) -> int:
    """Temporaries of one layer call of ``CALL_TOKENS`` tokens: the MLP's gate, up and their product (float32)."""
    return max(STREAM_WORKING_BYTES, 12 * CALL_TOKENS * dims.intermediate) if dims else STREAM_WORKING_BYTES


def record_bytes(width: int, dims: Dims) -> int:
    """Memory one record of packed width ``width`` holds between layers (hidden state, the expanded additive
    mask, positions) plus its share of one layer's attention scores."""
    return 4 * width * (2 * dims.hidden + width * 2) + 8 * width + 4 * dims.heads * width * width


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def parse_size(text: str, flag: str = "the size", allow_zero: bool = False) -> int:
    """``"80GB"``, ``"80 GiB"``, ``"512MB"``, ``"1048576B"`` -> bytes (units are powers of 1024). A bare number is
    refused with a sentence for every size option alike: read as bytes or as gigabytes it would be wrong for someone
    (``--max-body 1048576`` was a 1 PiB limit when bare numbers meant GB). ``allow_zero``: ``0`` (any unit) is 0."""
    import re

    units = {"b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
             "g": GB, "gb": GB, "gib": GB, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m and allow_zero and float(m.group(1)) == 0 and (m.group(2).lower() in units or not m.group(2)):
        return 0
    if m and not m.group(2):
        raise UsageError(f"{flag} {text!r} has no unit; write it with one, like {text}B (bytes), 512MB or 24GB.")
    unit = m.group(2).lower() if m else None
    if m is None or unit not in units:
        raise UsageError(f"{flag} {text!r} is not a memory size; write it like 80GB, 24GiB or 512MB.")
    size = int(float(m.group(1)) * units[unit])
    if size <= 0:
        raise UsageError(f"{flag} {text!r} is not a positive memory size; write it like 80GB.")
    return size


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def current_rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def default_budget() -> int:
    """What this process may use: available RAM + what it already holds - a margin."""
    return max(0, available_memory() + current_rss() - MARGIN_BYTES)


def budget(limit: int | None, environ=None) -> tuple[int, str]:
    """(bytes, where they come from): ``--memory-limit`` as given, else this process's share of the RAM
    available now (divided between the launcher's workers on this host)."""
    if limit is not None:
        return limit, "--memory-limit"
    workers = workers_on_host(environ)
    if workers > 1:
        return default_budget() // workers, f"available RAM / {workers} workers on this host"
    return default_budget(), "available RAM"


@dataclass
class MemoryPlan:
    device: str
    weights: int  # bytes of all weights in the compute dtype
    in_ram_need: int
    budget: int | None  # None on GPU
    budget_source: str
    execution: str  # IN_RAM | STREAMED
    largest_layer: int
    largest_outside: int  # the largest tensor outside the decoder layers
    stream_fixed: int  # streamed: bytes needed before any hidden state
    reason: str
    dims: Dims | None = None

    @property
    def fits(self) -> bool:
        return self.budget is None or self.in_ram_need <= self.budget

    @property
    def state_budget(self) -> int:
        """Streamed: bytes left for the hidden states of a block."""
        return max(0, (self.budget or 0) - self.stream_fixed)

    def to_dict(self) -> dict:
        return asdict(self)


def records_per_block(plan: MemoryPlan, width: int, total: int) -> int:
    """Streamed: records of packed width ``width`` per block within the plan's state budget (at least 1: the
    plan already refused a budget too small for one)."""
    per = record_bytes(width, plan.dims or Dims())
    return max(1, min(total, plan.state_budget // max(per, 1)))


def decode_row_bytes(plan: MemoryPlan, kv_bytes_per_token: int, width: int) -> int:
    """Streamed generation: what one record of ``width`` tokens (prompt + new ones) holds: its keys and values in every
    layer's cache, and its share of the prompt pass (:func:`record_bytes`)."""
    return kv_bytes_per_token * width + record_bytes(width, plan.dims or Dims())


def decode_budget(plan: MemoryPlan) -> int:
    """Streamed generation: bytes left for the records' caches (the embedding and the LM head both stay resident)."""
    return max(0, plan.state_budget - plan.largest_outside)


def decode_rows(plan: MemoryPlan, kv_bytes_per_token: int, width: int, total: int) -> int:
    """Records generated together in one streamed block (0: not even one fits)."""
    return min(total, decode_budget(plan) // max(1, decode_row_bytes(plan, kv_bytes_per_token, width)))


def plan_memory(layer_bytes: dict[int | None, int], largest_outside: int, device: str,
                limit: int | None = None, execution: str = "auto", dims: Dims | None = None) -> MemoryPlan:
    """Decide how to execute. ``layer_bytes``: bytes per decoder layer (key None: outside the layers)."""
    if execution not in EXECUTIONS:
        raise UsageError(f"--execution {execution!r} is not one of {', '.join(EXECUTIONS)}.")
    weights = sum(layer_bytes.values())
    need = int(weights * LOAD_FACTOR) + INTERPRETER_BYTES
    layers = [v for k, v in layer_bytes.items() if k is not None]
    largest = max(layers, default=0)
    # streamed: a layer computing, the next laid out in float32 (two arenas, reused layer after layer) and the one after
    # read ahead as stored: three layers at most
    fixed = 3 * largest + largest_outside + INTERPRETER_BYTES + working_bytes(dims)
    if device != "cpu":
        if execution == STREAMED:
            raise UsageError("--execution streamed runs on CPU only; on a GPU the model is loaded into GPU memory.")
        return MemoryPlan(device, weights, need, None, "GPU memory (checked by paddle)", IN_RAM, largest,
                          largest_outside, fixed, "GPU: weights loaded into GPU memory", dims)
    budget_bytes, source = budget(limit)
    fits = need <= budget_bytes
    if execution == IN_RAM or (execution == "auto" and fits):
        if not fits:
            raise MemoryBudgetError(
                f"loading this model in RAM needs about {fmt_bytes(need)} (float32 weights {fmt_bytes(weights)} x "
                f"{LOAD_FACTOR} + the interpreter) but the budget is {fmt_bytes(budget_bytes)} ({source}); drop "
                "--execution in-ram to let classify stream it layer by layer, or use a GPU.", need, budget_bytes, source
            )
        return MemoryPlan(device, weights, need, budget_bytes, source, IN_RAM, largest, largest_outside, fixed,
                          f"fits: {fmt_bytes(need)} <= {fmt_bytes(budget_bytes)} ({source})")
    if not layers:
        raise CheckpointError("this model has no decoder layers (`layers.N.` tensor names) to stream; it cannot be "
                              "scored within the memory budget.")
    if budget_bytes < fixed:
        raise MemoryBudgetError(
            f"the memory budget {fmt_bytes(budget_bytes)} ({source}) is too small even to stream this model: one decoder "
            f"layer is {fmt_bytes(largest)} (three are held: one computing, the next laid out, one read ahead), the "
            "largest other tensor "
            f"{fmt_bytes(largest_outside)}, plus the interpreter; the minimum is about {fmt_bytes(fixed)} + the "
            "hidden states of one record: raise --memory-limit or use a machine with more RAM.", fixed, budget_bytes, source
        )
    why = ("forced by --execution streamed" if execution == STREAMED else
           f"does not fit: {fmt_bytes(need)} > {fmt_bytes(budget_bytes)} ({source})")
    return MemoryPlan(device, weights, need, budget_bytes, source, STREAMED, largest, largest_outside, fixed, why)
