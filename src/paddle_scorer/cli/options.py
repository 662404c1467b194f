"""Options shared by the scoring commands: model loading, scorer.json defaults, progress."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from paddle_scorer.checkpoint import SCORER_DEFAULTS
from paddle_scorer.cli.common import err


@dataclass
class LoadOptions:
    model: Path | None
    lora: Path | None
    mode: str
    device: str
    dtype: str
    tokenizer: Path | None


def load_options(model, lora, mode, device, dtype, tokenizer) -> LoadOptions:
    return LoadOptions(model, lora, mode, device, dtype, tokenizer)


def loaded_from(o: LoadOptions):
    from paddle_scorer.loader import load

    with err.status("loading model...", spinner="dots") if err.is_terminal else contextlib.nullcontext():
        return load(o.model, o.lora, device=o.device, dtype=o.dtype, mode=o.mode, tokenizer=o.tokenizer)


def scorer_defaults(model: Path | None, lora: Path | None) -> dict:
    """Template/labels a fine-tune was trained with (scorer.json in the adapter, else the model)."""
    for folder in (lora, model):
        if folder is not None and (Path(folder) / SCORER_DEFAULTS).is_file():
            try:
                data = json.loads((Path(folder) / SCORER_DEFAULTS).read_text())
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    return {}


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


def check_io(prompt, input, output, resume: bool, overwrite: bool) -> None:
    """The input/output flag combinations both scoring commands refuse, before anything is loaded."""
    from paddle_scorer.errors import UsageError

    if (prompt is None) == (input is None):
        raise UsageError("give either --prompt TEXT (repeatable) or --input data.jsonl.")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one.")
    if resume and output is None:
        raise UsageError("--resume needs --output (the file to continue).")
    if output is not None and Path(output).exists() and not (resume or overwrite):
        raise UsageError(f"{output} already exists; pass --resume to continue it or --overwrite to start over.")


def read_rows(prompt, input, id_field: str, limit: int | None) -> list[tuple[object, dict, str]]:
    """``[(id, record, where)]`` from --input (ids from the record) or --prompt (ids 0, 1, ...)."""
    from paddle_scorer import dataio

    if input is not None:
        rows = dataio.read_jsonl(input, id_field)
    else:
        rows = [(i, {"query": p}, f"--prompt #{i + 1}") for i, p in enumerate(prompt)]
    return rows if limit is None else rows[:limit]
