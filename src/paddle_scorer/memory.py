"""The one memory rule: load in RAM, stream layer by layer, or refuse — decided before loading.

Every command that loads a model (``classify``, ``generate``, ``serve``, ``smoke``, ``merge --verify``)
and ``inspect`` ask this module, so what ``smoke``/``inspect`` promise is what the loader does.

* The budget is ``--memory-limit`` (the whole process, interpreter included) or, by default, the
  RAM available now plus what this process already holds, minus a margin.
* In RAM (CPU) needs the weights in the compute dtype x 1.1 plus the interpreter with paddle and
  PaddleNLP imported (about 0.65 GB measured on paddle 3.3.1 + paddlenlp 3.0.0b4).
* Streamed needs, at once: the two largest decoder layers (the one computing and the one being
  read ahead), the largest tensor outside the layers (embeddings or LM head, used at the start and
  the end of each block), the interpreter, and the hidden states of one block of records (sized by
  the streaming executor from what is left).
* On GPU the loader always loads in GPU memory (paddle reports OOM itself); ``smoke --gpu-memory``
  projects it beforehand.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from paddle_scorer.errors import CheckpointError, UsageError


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


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def parse_size(text: str) -> int:
    """``"80GB"``, ``"80 GiB"``, ``"512MB"``, ``"80"`` (GB) -> bytes. Units are powers of 1024."""
    import re

    units = {"": GB, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
             "g": GB, "gb": GB, "gib": GB, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in units:
        raise UsageError(f"{text!r} is not a memory size; write it like 80GB, 24GiB or 512MB.")
    size = int(float(m.group(1)) * units[unit])
    if size <= 0:
        raise UsageError(f"{text!r} is not a positive memory size; write it like 80GB.")
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

    @property
    def fits(self) -> bool:
        return self.budget is None or self.in_ram_need <= self.budget

    @property
    def state_budget(self) -> int:
        """Streamed: bytes left for the hidden states of a block."""
        return max(0, (self.budget or 0) - self.stream_fixed)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(layer_bytes: dict[int | None, int], largest_outside: int, device: str,
                limit: int | None = None, execution: str = "auto") -> MemoryPlan:
    """Decide how to execute. ``layer_bytes``: bytes per decoder layer (key None: outside the layers)."""
    if execution not in EXECUTIONS:
        raise UsageError(f"--execution {execution!r} is not one of {', '.join(EXECUTIONS)}.")
    weights = sum(layer_bytes.values())
    need = int(weights * LOAD_FACTOR) + INTERPRETER_BYTES
    layers = [v for k, v in layer_bytes.items() if k is not None]
    largest = max(layers, default=0)
    fixed = 2 * largest + largest_outside + INTERPRETER_BYTES + STREAM_WORKING_BYTES
    if device != "cpu":
        if execution == STREAMED:
            raise UsageError("--execution streamed runs on CPU only; on a GPU the model is loaded into GPU memory.")
        return MemoryPlan(device, weights, need, None, "GPU memory (checked by paddle)", IN_RAM, largest,
                          largest_outside, fixed, "GPU: weights loaded into GPU memory")
    budget = limit if limit is not None else default_budget()
    source = "--memory-limit" if limit is not None else "available RAM"
    fits = need <= budget
    if execution == IN_RAM or (execution == "auto" and fits):
        if not fits:
            raise MemoryBudgetError(
                f"loading this model in RAM needs about {fmt_bytes(need)} (float32 weights {fmt_bytes(weights)} x "
                f"{LOAD_FACTOR} + the interpreter) but the budget is {fmt_bytes(budget)} ({source}); drop "
                "--execution in-ram to let classify stream it layer by layer, or use a GPU.", need, budget, source
            )
        return MemoryPlan(device, weights, need, budget, source, IN_RAM, largest, largest_outside, fixed,
                          f"fits: {fmt_bytes(need)} <= {fmt_bytes(budget)} ({source})")
    if not layers:
        raise CheckpointError("this model has no decoder layers (`layers.N.` tensor names) to stream; it cannot be "
                              "scored within the memory budget.")
    if budget < fixed:
        raise MemoryBudgetError(
            f"the memory budget {fmt_bytes(budget)} ({source}) is too small even to stream this model: one decoder "
            f"layer is {fmt_bytes(largest)} (two are held: one computing, one read ahead), the largest other tensor "
            f"{fmt_bytes(largest_outside)}, plus the interpreter; the minimum is about {fmt_bytes(fixed)} + the "
            "hidden states of one record: raise --memory-limit or use a machine with more RAM.", fixed, budget, source
        )
    why = ("forced by --execution streamed" if execution == STREAMED else
           f"does not fit: {fmt_bytes(need)} > {fmt_bytes(budget)} ({source})")
    return MemoryPlan(device, weights, need, budget, source, STREAMED, largest, largest_outside, fixed, why)
