"""Shared CLI helpers: error handling, consoles, formatting."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape  # noqa: F401 - re-exported for the commands
from rich.text import Text

from paddle_scorer.errors import ScorerError

# Markup is off: user text (paths, ids, labels, templates such as "[/INST]") is printed literally. Our own
# styling goes through styled(), which parses markup only in the strings we write (user parts escaped).
out = Console(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def styled(markup: str) -> Text:
    """Rich markup written by us (interpolate user text through ``escape``)."""
    return Text.from_markup(markup)


EXIT_OS = 6  # the machine refused: disk full, read-only, permission, out of memory
EXIT_INTERNAL = 70  # a bug in paddle-scorer (EX_SOFTWARE)


def os_error_sentence(exc: OSError) -> str:
    """One sentence for an OSError a user can provoke (disk full, read-only, is a directory, ...)."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hints = {
        errno.ENOSPC: "the disk is full; free some space and rerun (scoring commands: with --resume)",
        errno.EDQUOT: "the disk quota is exhausted; free some space and rerun",
        errno.EROFS: "the file system is read-only; write to another place",
        errno.EACCES: "permission denied; write to a place you own or fix the permissions",
        errno.EPERM: "operation not permitted; check the permissions",
        errno.EISDIR: "that is a directory, not a file; pass a file path",
        errno.ENOTDIR: "a part of that path is a file, not a directory",
        errno.ENOENT: "no such file or directory",
        errno.EMFILE: "too many open files; raise `ulimit -n`",
        errno.EFBIG: "the file would exceed the size limit (`ulimit -f` or the file system's); write to another place",
        errno.EXDEV: "the rename crossed file systems; keep the output and its folder on one file system",
    }
    hint = hints.get(exc.errno, "check the path and the disk")
    return f"{exc.strerror or type(exc).__name__}{where}: {hint}."


def _not_utf8(value) -> bool:
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _flag_names(fn) -> dict[str, str]:
    """Parameter name -> its first command-line flag (``--output``) or ARGUMENT, from typer's declarations
    (``name: str = typer.Option(...)`` or ``name: Annotated[str, typer.Option(...)]``)."""
    import inspect
    import typing

    names = {}
    hints = typing.get_type_hints(fn, include_extras=True)
    for name, param in inspect.signature(fn).parameters.items():
        infos = [param.default] + list(getattr(hints.get(name), "__metadata__", ()))
        decls = []
        for info in infos:
            first = getattr(info, "default", None)  # in an Annotated declaration typer keeps the first flag here
            decls += [d for d in [first, *(getattr(info, "param_decls", None) or ())]
                      if isinstance(d, str) and d.startswith("--")]
        names[name] = decls[0].split("/")[0] if decls else name.upper()
    return names


def check_text_arguments(kwargs: dict, flags: dict[str, str] | None = None) -> None:
    """Refuse command-line values (paths, prompts, labels, templates) holding bytes that are not UTF-8.

    Such bytes arrive as lone surrogates (Python's surrogateescape); they cannot be written into a JSON
    output or its provenance, so they would fail after the work was done. Refused before anything runs."""
    import os

    from paddle_scorer.errors import UsageError

    flags = flags or {}
    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and _not_utf8(v):
                shown = os.fsencode(str(v)).decode("utf-8", "backslashreplace")
                raise UsageError(f"{flags.get(name, name)} '{shown}' contains bytes that are not UTF-8; paths and text "
                                 "go into UTF-8 JSON outputs and provenance: rename the file or re-encode the text.")


def cli_errors(fn):
    """Turn every exception into one message on stderr and a non-zero exit; never a traceback.

    Domain errors carry their own exit code; OSError and MemoryError exit 6; anything else is a bug
    (exit 70) and the traceback is shown only with PADDLE_SCORER_DEBUG=1. A KeyboardInterrupt (Ctrl-C,
    or SIGTERM through ``app.main``) exits 130; one raised with a message says what was already done."""

    flags = _flag_names(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        try:
            check_text_arguments(kwargs, flags)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ScorerError as exc:
            _refuse(exc)
        except KeyboardInterrupt as exc:
            err.print(f"interrupted: {exc}" if str(exc) else
                      "interrupted: existing outputs were not replaced; rerun with --resume to continue.")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `... --json | head`: the reader left; stop quietly, as a shell tool does
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            raise typer.Exit(141) from None
        except OSError as exc:
            if os.environ.get("PADDLE_SCORER_DEBUG"):
                raise
            err.print(Text.assemble(("error:", "bold red"), " ", os_error_sentence(exc)))
            raise typer.Exit(EXIT_OS) from None
        except MemoryError:
            err.print(Text.assemble(("error:", "bold red"), " ", "ran out of memory; pass a smaller --memory-limit "
                                    "(classify then streams the model layer by layer) or a smaller --batch-size."))
            raise typer.Exit(EXIT_OS) from None
        except ModuleNotFoundError as exc:
            if exc.name != "paddle" or os.environ.get("PADDLE_SCORER_DEBUG"):
                return _internal(exc)
            from paddle_scorer import missing_paddle

            _refuse(missing_paddle())  # the model library imported paddle itself, before runtime.paddle() could say it
        except Exception as exc:  # a bug: one sentence, the traceback on request
            return _internal(exc)

    def _refuse(exc: ScorerError):
        err.print(Text.assemble(("error:", "bold red"), " ", str(exc)))
        raise typer.Exit(exc.exit_code) from None

    def _internal(exc: Exception):
        import os

        if os.environ.get("PADDLE_SCORER_DEBUG"):
            raise exc
        err.print(Text.assemble(("internal error:", "bold red"), " ",
                                f"{type(exc).__name__}: {exc}; this is a bug in paddle-scorer: rerun with "
                                "PADDLE_SCORER_DEBUG=1 for the traceback and report it with `paddle-scorer doctor --json`."))
        raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def print_trimmed(con: Console, renderable) -> None:
    """Print a table without the trailing spaces rich pads every line with (copied text stays clean)."""
    from rich.segment import Segment

    for line in con.render_lines(renderable, con.options, pad=False):
        segments = list(line)
        while segments and not segments[-1].control and not segments[-1].text.strip():
            segments.pop()
        if segments:
            last = segments[-1]
            segments[-1] = Segment(last.text.rstrip(), last.style, last.control)
        con.print(Text.assemble(*((s.text, s.style) for s in segments if not s.control)), soft_wrap=True)
