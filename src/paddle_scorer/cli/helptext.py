"""How a command's ``--help`` is put together, so every command reads the same way:

* ``summary``: one sentence, shown in ``paddle-scorer --help``'s command list and first in the command's help;
* ``body``: paragraphs written hard-wrapped in the source; each is joined into one line here, because typer's
  rich help keeps single line breaks *and* wraps again at the terminal width ("one shard at a / time");
* ``examples``: command lines shown as written, after the options (an ``Examples`` section), each short enough
  for an 80-column terminal and continued with `` \\`` so it can be pasted; ``[`` is escaped for rich.

Also: typer >= 0.2x prints a ``<bool>`` type next to every flag (``--force <bool>``), although a flag takes no
value; :func:`quiet_flag_types` makes flags show no type, as click and argparse do.
"""

from __future__ import annotations

import re

from rich.markup import escape


def _paragraphs(text: str) -> str:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paras)


def command(summary: str, body: str = "", examples: str = "") -> dict:
    """Keyword arguments for ``app.command``: ``help``, ``short_help`` and ``epilog``."""
    help_text = escape(summary) + ("\n\n" + escape(_paragraphs(body)) if body.strip() else "")
    epilog = ""
    if examples.strip():
        lines = [line.rstrip() for line in examples.strip("\n").splitlines()]
        width = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        epilog = "[bold]Examples[/]\n\n" + escape("\n".join(line[width:] for line in lines))
    return {"help": help_text, "short_help": escape(summary), "epilog": epilog or None}


def quiet_flag_types() -> None:
    """Flags (``--force``, ``--json``, ``--help``) show no ``<bool>`` value type in the help."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - an older typer without this class prints no type for flags
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_quiet_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return original(self, ctx)

    display_type_rich._quiet_flags = True
    TyperOption.display_type_rich = display_type_rich
