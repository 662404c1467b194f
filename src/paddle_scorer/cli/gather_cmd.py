"""`paddle-scorer gather OUTPUT`: assemble a sharded run's part files into OUTPUT, in input order."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, out


def register(app: typer.Typer) -> None:
    @app.command("gather", **helptext.command(
        "Assemble OUTPUT from the part files of a paddle.distributed.launch run.",
        """The last worker to finish does this itself; use it after a partial rerun, or to see which parts are
        done.""",
        """
        paddle-scorer gather out/scores.jsonl
        """))
    @cli_errors
    def gather_cmd(
        output: Path = typer.Argument(..., help="The --output the workers were given (e.g. out.jsonl)."),
    ):
        from paddle_scorer.errors import IncompleteRunError
        from paddle_scorer.tasks.gather import gather_output

        g = gather_output(output)
        world, status, meta = g.world, g.status, g.meta
        t = Table(title=f"{output}: {world} worker(s)")
        for col in ("rank", "state", "records", "seconds"):
            t.add_column(col)
        for s in status:
            m = s.get("meta") or {}
            counts = m.get("counts") or {}
            t.add_row(str(s["rank"]), s["state"], str(counts.get("scored_this_run", counts.get("total", "-"))),
                      str(m.get("seconds", "-")))
        out.print(t)
        if meta is None:
            raise IncompleteRunError(
                f"ranks {', '.join(map(str, g.unfinished))} have not finished; rerun the same launch command with --resume "
                "(finished workers skip their done records)."
            )
        out.print(f"assembled {output}: {meta['counts']['total']} records from {world} part(s)", highlight=False)
