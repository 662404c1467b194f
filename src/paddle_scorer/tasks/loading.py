"""The loading options every model-running task shares, and the one way they become a loaded model: the plan (every
check, nothing loaded; the memory budget decided once by :mod:`paddle_scorer.model.memory_budget`), then the load,
with what was decided for the user said through the caller's hooks (and recorded in provenance)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from paddle_scorer.errors import UsageError
from paddle_scorer.tasks.job import Hooks


@dataclass
class LoadOptions:
    model: Path | None = None
    lora: Path | None = None
    mode: str = "attach"
    device: str = "auto"
    dtype: str = "auto"
    tokenizer: Path | None = None
    memory_limit: str | int | None = None  # bytes, or a size such as "24GB"
    allow_noop_adapter: bool = False
    execution: str = "auto"


def plan_for(o: LoadOptions):
    """The load plan of ``o`` (:func:`paddle_scorer.model.load_plan.make_plan`)."""
    from paddle_scorer.model.load_plan import make_plan
    from paddle_scorer.model.memory_budget import parse_size

    limit = o.memory_limit
    if isinstance(limit, str):
        limit = parse_size(limit, "--memory-limit")
    return make_plan(o.model, o.lora, device=o.device, dtype=o.dtype, mode=o.mode, tokenizer=o.tokenizer,
                     memory_limit=limit, allow_noop_adapter=o.allow_noop_adapter, execution=o.execution)


def plan_in_ram(o: LoadOptions, what: str):
    """The plan for a task that needs the whole model in memory (serve: requests arrive one by one, and a pass over
    weights read from disk per token of each would make every client wait on the disk): a model that does not fit the
    budget is refused before loading, with the numbers and what does stream."""
    from paddle_scorer.model.memory_budget import MemoryBudgetError, fmt_bytes

    try:
        return plan_for(dataclasses.replace(o, execution="in-ram"))
    except MemoryBudgetError as exc:
        raise UsageError(
            f"{what} needs the whole model in memory: about {fmt_bytes(exc.need)} (float32 weights + the "
            f"interpreter), but the budget is {fmt_bytes(exc.budget)} ({exc.source}); run it on a GPU or a bigger "
            "machine (classify and generate stream models that do not fit, layer by layer, a block of records at a "
            "time: use them for a dataset)."
        ) from None


def load_model(o: LoadOptions, hooks: Hooks = Hooks(), plan=None):
    """The loaded model of ``o`` (or of ``plan``), a streamed plan said first; the load's notes said afterwards."""
    from paddle_scorer.model.loader import load_plan
    from paddle_scorer.model.memory_budget import fmt_bytes

    plan = plan or plan_for(o)
    if plan.streamed:
        m = plan.memory
        hooks.note(f"the model needs about {fmt_bytes(m.in_ram_need)} in RAM but the budget is "
                   f"{fmt_bytes(m.budget)} ({m.budget_source}): scoring layer by layer (streamed), each layer read "
                   "once per block of records")
    with hooks.busy("loading model..."):
        loaded = load_plan(plan)
    say_notes(loaded, hooks)
    return loaded


def say_notes(loaded, hooks: Hooks) -> None:
    """The notes of ``loaded`` not said yet (the load's; the backend's, such as the GEMM kernel's, come later)."""
    said = getattr(loaded, "notes_said", 0)
    for note in loaded.facts.notes[said:]:
        hooks.note(note)
    loaded.notes_said = len(loaded.facts.notes)


FIRST_PROMPTS = 64  # records whose texts check the fast tokenizer against the slow one before a run


def check_tokenizer(loaded, records, texts_of, hooks: Hooks) -> None:
    """The fast tokenizer against the slow one it replaced (:func:`paddle_scorer.model.tokenizer.check_first_prompts`)
    on the texts ``texts_of(record, where)`` of the run's first :data:`FIRST_PROMPTS` records: on a difference the slow
    one is used from here on, said in a note. A record whose text cannot be made is left to its window's refusal."""
    import itertools

    from paddle_scorer.errors import UsageError
    from paddle_scorer.model.tokenizer import check_first_prompts

    if getattr(loaded.tokenizer, "paddle_scorer_slow", None) is None:
        return
    texts = []
    for _rid, rec, where in itertools.islice(records, FIRST_PROMPTS):
        try:
            texts += texts_of(rec, where)
        except UsageError:
            continue
    note = check_first_prompts(loaded, texts)
    if note:
        hooks.note(note)
