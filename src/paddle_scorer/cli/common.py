"""Shared CLI helpers: error handling, consoles, formatting."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from paddle_scorer.errors import ScorerError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def cli_errors(fn):
    """Turn domain errors into one message on stderr and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ScorerError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing partial was left behind; rerun with --resume to continue.")
            raise typer.Exit(130) from None

    return wrapper


def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
