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
