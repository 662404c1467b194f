"""The `paddle-scorer` command. Each command lives in its own module and is imported only when run,
so `--help` and `inspect` never import paddle."""

from __future__ import annotations

from paddle_scorer import prepare_process

prepare_process()  # thread counts before numpy's BLAS and paddle load (the command modules import numpy)

import typer  # noqa: E402

from paddle_scorer.cli import helptext  # noqa: E402

helptext.quiet_flag_types()

from paddle_scorer import __version__  # noqa: E402

app = typer.Typer(
    name="paddle-scorer",
    help="Load a fine-tuned PaddleNLP or PaddleFormers LLM (Llama, Qwen2, ERNIE 4.5; base + LoRA) safely and read its "
         "real softmax outputs: exact label probabilities, per-step generation traces, an OpenAI-style server."
         "\n\nStart with `paddle-scorer inspect FOLDER`: it says what the folder holds and the command to run next.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool):
    if value:
        typer.echo(f"paddle-scorer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """paddle-scorer: inspect checkpoints, load LoRA safely, score labels exactly."""


from paddle_scorer.cli import classify_cmd, gather_cmd, generate_cmd, inspect_cmd  # noqa: E402
from paddle_scorer.cli import merge_cmd  # noqa: E402
from paddle_scorer.cli import doctor_cmd, report_cmd, smoke_cmd  # noqa: E402
from paddle_scorer.cli import serve_cmd  # noqa: E402

inspect_cmd.register(app)
merge_cmd.register(app)
classify_cmd.register(app)
generate_cmd.register(app)
gather_cmd.register(app)
smoke_cmd.register(app)
doctor_cmd.register(app)
report_cmd.register(app)
serve_cmd.register(app)


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a job scheduler's stop, `kill`) takes the same clean path as Ctrl-C: working files kept for
    --resume, outputs not replaced, temporary folders removed."""
    import signal

    def _raise(*_):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # pragma: no cover - not the main thread
        pass


def _lenient_streams() -> None:
    """Text that cannot be encoded (a file name with non-UTF-8 bytes listed by inspect) is printed escaped
    instead of failing the whole command."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # pragma: no cover - replaced or closed streams
            pass


def main() -> None:
    _sigterm_as_interrupt()
    _lenient_streams()
    app()
