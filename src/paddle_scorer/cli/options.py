"""Options shared by the scoring commands: model loading, scorer.json defaults, progress."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from paddle_scorer.cli.common import err


@dataclass
class LoadOptions:
    model: Path | None
    lora: Path | None
    mode: str
    device: str
    dtype: str
    tokenizer: Path | None
    memory_limit: str | None = None
    allow_noop_adapter: bool = False
    execution: str = "auto"


def load_options(model, lora, mode, device, dtype, tokenizer, memory_limit=None, allow_noop_adapter=False,
                 execution="auto") -> LoadOptions:
    return LoadOptions(model, lora, mode, device, dtype, tokenizer, memory_limit, allow_noop_adapter, execution)


def plan_from(o: LoadOptions):
    """The load plan (every check; nothing loaded; the memory budget decided by :mod:`paddle_scorer.model.memory_budget`)."""
    from paddle_scorer.model.memory_budget import parse_size
    from paddle_scorer.model.load_plan import make_plan

    limit = parse_size(o.memory_limit) if o.memory_limit is not None else None
    return make_plan(o.model, o.lora, device=o.device, dtype=o.dtype, mode=o.mode, tokenizer=o.tokenizer,
                     memory_limit=limit, allow_noop_adapter=o.allow_noop_adapter, execution=o.execution)


def plan_in_ram(o: LoadOptions, what: str):
    """The plan for a command that needs the whole model in memory (generate, serve): a model that does
    not fit the budget is refused before loading, with the numbers and what does stream."""
    import dataclasses

    from paddle_scorer.errors import UsageError
    from paddle_scorer.model.memory_budget import MemoryBudgetError, fmt_bytes

    try:
        return plan_from(dataclasses.replace(o, execution="in-ram"))
    except MemoryBudgetError as exc:
        raise UsageError(
            f"{what} needs the whole model in memory: about {fmt_bytes(exc.need)} (float32 weights + the "
            f"interpreter), but the budget is {fmt_bytes(exc.budget)} ({exc.source}); run it on a GPU or a bigger "
            "machine (classify streams models that do not fit: it scores labels layer by layer)."
        ) from None


def loaded_from(o: LoadOptions, plan=None):
    from paddle_scorer.model.loader import load_plan

    plan = plan or plan_from(o)
    if plan.streamed:
        m = plan.memory
        from paddle_scorer.model.memory_budget import fmt_bytes

        err.print(f"note: the model needs about {fmt_bytes(m.in_ram_need)} in RAM but the budget is "
                  f"{fmt_bytes(m.budget)} ({m.budget_source}): scoring layer by layer (streamed), each layer read "
                  "once per block of records.", highlight=False, markup=False)
    with err.status("loading model...", spinner="dots") if err.is_terminal else contextlib.nullcontext():
        loaded = load_plan(plan)
    for note in loaded.facts.notes:  # what was decided for the user (a default, a mapping): said, and recorded
        err.print(f"note: {note}.", highlight=False, markup=False)
    return loaded


@contextlib.contextmanager
def progress_bar(what: str, total: int):
    """A rich progress bar on stderr (only on a terminal); yields ``advance(n)``."""
    if not err.is_terminal:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


def check_io(prompt, input, output, resume: bool, overwrite: bool, limit: int | None = None) -> None:
    """The input/output flag combinations the scoring commands refuse, before anything is loaded."""
    from paddle_scorer.errors import UsageError
    from paddle_scorer.runs.output_file import check_output_path

    if (prompt is None) == (input is None):
        raise UsageError("give either --prompt TEXT (repeatable) or --input data.jsonl.")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one.")
    if resume and output is None:
        raise UsageError("--resume needs --output (the file to continue).")
    if overwrite and output is None:
        raise UsageError("--overwrite needs --output (the file to replace).")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}.")
    if output is not None:
        check_output_path(Path(output), [Path(input)] if input is not None else [], resume=resume, overwrite=overwrite)


def read_rows(prompt, input, id_field: str, limit: int | None) -> list[tuple[object, dict, str]]:
    """``[(id, record, where)]`` from --input (ids from the record) or --prompt (ids 0, 1, ...)."""
    from paddle_scorer import jsonio

    if input is not None:
        rows = jsonio.read_jsonl(input, id_field)
    else:
        rows = [(i, {"query": p}, f"--prompt #{i + 1}") for i, p in enumerate(prompt)]
    return rows if limit is None else rows[:limit]


def check_numbers(**values) -> None:
    """Range checks of integer options (before anything is loaded): batch sizes >= 1, counts >= 0, ..."""
    from paddle_scorer.errors import UsageError

    rules = {"batch_size": (1, "--batch-size"), "max_length": (2, "--max-length"), "show": (0, "--show"),
             "max_new_tokens": (1, "--max-new-tokens"), "top_k": (0, "--top-k"), "limit": (1, "--limit"),
             "stream_block_records": (1, "--stream-block-records")}
    for name, value in values.items():
        if value is None:
            continue
        low, flag = rules[name]
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}.")


def resume_line(con, stats) -> None:
    """After --resume: what was done with the previous results when the input had changed since."""
    r = stats.resume
    if r.changed or r.removed:
        con.print(f"resume: {r.changed} record(s) rescored because their input changed since they were scored, "
                  f"{r.removed} dropped because their id is no longer in the input (kept {r.kept}).", highlight=False)


def template_note(template: str | None, source: str = "--template") -> None:
    """One ``note:`` line when a template holds a literal backslash-n (see :func:`prompts.literal_escape_note`)."""
    from paddle_scorer.tasks.prompts import literal_escape_note

    note = literal_escape_note(template, source)
    if note:
        err.print(f"note: {note}", highlight=False, markup=False)
