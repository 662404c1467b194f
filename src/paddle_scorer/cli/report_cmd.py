"""`paddle-scorer report`: metrics, calibration and distributions of a classify output."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, err, escape, out, styled
from rich.text import Text

EXAMPLES = """
  paddle-scorer report out/demo-scores.jsonl     # in the terminal
  paddle-scorer report out/demo-scores.jsonl --html out/report.html
"""

_BAR = 40
MAX_BINS = 1000


def _histogram_table(counts: list[int], title: str) -> Table:
    t = Table(title=title, title_justify="left", box=None, pad_edge=False)
    t.add_column("probability", justify="right")
    t.add_column("records", justify="right")
    t.add_column("")
    top = max(counts) or 1
    n = len(counts)
    used = [i for i, c in enumerate(counts) if c] or [0]
    for i in range(used[0], used[-1] + 1):  # empty bins at either end are left out
        t.add_row(f"{i / n:.2f}-{(i + 1) / n:.2f}", str(counts[i]), "#" * round(_BAR * counts[i] / top))
    return t


def render_summary(summary: dict) -> None:
    labels = summary["labels"]
    out.print(styled(f"[bold]{escape(summary['file'])}[/]: {summary['n_records']} records, labels "
                     f"{escape(', '.join(labels))}"))
    m = summary["metrics"]
    if m:
        out.print(f"accuracy {m['accuracy']:.4f}  log-loss {m['log_loss']:.4f}  brier {m['brier']:.4f}  "
                  f"ECE {m['ece']:.4f}  (n={m['n']})", highlight=False)
        agree = summary["recorded_metrics_agree"]
        if agree is False:
            out.print(styled("[yellow]warning:[/] these differ from the metrics in the .meta.json: the output was "
                             "changed after classify wrote it."))
        t = Table(title="confusion (rows: gold, columns: predicted)", title_justify="left")
        t.add_column("gold")
        for lab in labels:
            t.add_column(lab, justify="right")
        for g in labels:
            t.add_row(g, *[str(m["confusion"][g][p]) for p in labels])
        out.print(t)
        r = Table(title="reliability (confidence = probability of the predicted label)", title_justify="left")
        for col in ("bin", "records", "mean confidence", "accuracy"):
            r.add_column(col, justify="right")
        for b in summary["reliability"]:
            if b["count"]:
                r.add_row(f"{b['lo']:.1f}-{b['hi']:.1f}", str(b["count"]), f"{b['confidence']:.4f}", f"{b['accuracy']:.4f}")
        out.print(r)
    else:
        out.print("no gold labels: per-label probabilities only (add a `label` field to the input for metrics)")
    t = Table(title="per label", title_justify="left")
    t.add_column("label")
    t.add_column("mean probability", justify="right")
    t.add_column("predicted", justify="right")
    for lab in labels:
        s = summary["per_label"][lab]
        t.add_row(lab, f"{s['mean_prob']:.4f}", str(s["predicted"]))
    out.print(t)
    out.print(_histogram_table(summary["confidence_histogram"], "probability of the predicted label"))


def register(app: typer.Typer) -> None:
    @app.command("report", **helptext.command(
        "Summarise a classify output: metrics, reliability, confusion, probability histograms.",
        """--html writes one self-contained page with the figures (no network needed to view it).""",
        EXAMPLES))
    @cli_errors
    def report(
        path: Path = typer.Argument(..., help="A classify --output JSONL file (its .meta.json is read when present)."),
        html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
        bins: int = typer.Option(10, "--bins", help="Confidence bins for the reliability diagram and ECE."),
    ):
        from paddle_scorer.errors import UsageError
        from paddle_scorer.tasks.report import check_html_path, load_run, summarize, write_html

        if not 1 <= bins <= MAX_BINS:
            raise UsageError(f"--bins must be between 1 and {MAX_BINS}, got {bins}.")
        run = load_run(path)
        if html is not None:
            check_html_path(run, html)  # before the notes, so a refused path prints one line
        for note in run.notes:
            err.print(Text.assemble(("note:", "bold yellow"), " ", note))
        if html is not None:
            summary = write_html(run, html, bins)
            m = summary["metrics"]
            what = (f"accuracy {m['accuracy']:.4f}  log-loss {m['log_loss']:.4f}  brier {m['brier']:.4f}  "
                    f"ECE {m['ece']:.4f}  (n={m['n']})") if m else "no gold labels: per-label histograms"
            out.print(f"wrote {html} ({summary['n_records']} records; {what})")
        else:
            render_summary(summarize(run, bins))
