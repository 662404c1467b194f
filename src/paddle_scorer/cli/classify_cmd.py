"""`paddle-scorer classify`: exact P(label | prompt) for any labels, over prompts or a JSONL dataset."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from paddle_scorer.cli import flags
from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, err, escape, out, styled
from paddle_scorer.cli.options import hooks, resume_line

EXAMPLES = """
  # the demo: labels and template from checkpoints/demo-lora/scorer.json
  paddle-scorer classify --model checkpoints/demo-base \\
      --lora checkpoints/demo-lora \\
      --input checkpoints/demo-queries.jsonl --output out/scores.jsonl

  # your labels and template ($'...' makes \\n a real newline in bash)
  paddle-scorer classify -m BASE -l ADAPTER --labels goods,life \\
      --template $'Query: {query}\\nAnswer:' \\
      --prompt "what is the price of cabbage today?"
"""


def register(app: typer.Typer) -> None:
    @app.command("classify", **helptext.command(
        "Exact, calibrated P(label | prompt) for any labels (teacher forcing).",
        """Each label's log-probability is summed over all of its tokens after the prompt, and the probabilities
        are normalised over the labels you give: no generation, no top-k cut. Without --output a dataset prints
        its summary and the first --show records; --output writes every record (JSONL + .meta.json).""",
        EXAMPLES))
    @cli_errors
    def classify(
        model: flags.Model = None,
        lora: flags.Lora = None,
        labels: flags.Labels = None,
        prompt: flags.Prompt = None,
        input: flags.Input = None,
        template: flags.Template = None,
        output: flags.Output = None,
        as_json: flags.Json = False,
        resume: flags.Resume = False,
        overwrite: flags.Overwrite = False,
        label_prefix: flags.LabelPrefix = None,
        chat_template: flags.ChatTemplate = None,
        length_norm: str = typer.Option("none", "--length-norm", help="none | per-token (mean log-prob per label token)."),
        calibration: str = typer.Option("none", "--calibration", help="none | contextual (Zhao et al. 2021) | pmi (Holtzman et al. 2021)."),
        content_free: Optional[list[str]] = typer.Option(None, "--content-free", help="Content-free inputs for contextual calibration (repeatable; default N/A, '', [MASK])."),
        pmi_domain: Optional[str] = typer.Option(None, "--pmi-domain", help="Domain premise for PMI (default: the template's text after its last placeholder)."),
        id_field: flags.IdField = "id",
        gold_field: str = typer.Option("label", "--gold-field", help="Record field holding the gold label, for metrics."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", show_default="up to 1024 tokens",
                                                 help="Prompts per forward pass (sorted by length, order restored). "
                                                      "Default: as many as fit in 1024 padded tokens."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Token limit for prompt + label (default: the model's context)."),
        truncate: flags.Truncate = "error",
        limit: flags.Limit = None,
        max_line_size: flags.MaxLineSize = None,
        show: int = typer.Option(5, "--show", help="Print this many records after the summary (the rest: --output FILE, or --json for all)."),
        mode: flags.Mode = "attach",
        device: flags.Device = "auto",
        dtype: flags.Dtype = "auto",
        tokenizer: flags.Tokenizer = None,
        memory_limit: flags.MemoryLimit = None,
        execution: flags.Execution = "auto",
        stream_block_records: Optional[int] = typer.Option(None, "--stream-block-records", help="Streamed: records per block (default: as many as the memory limit allows; each block reads every layer once)."),
        allow_noop_adapter: flags.AllowNoopAdapter = False,
        coerce_fields: flags.CoerceFields = False,
        prefix_reuse: flags.PrefixReuse = True,
        force_max_length: bool = typer.Option(False, "--force-max-length", help="Allow --max-length beyond the model's context (recorded in the output)."),
    ):
        from paddle_scorer.tasks.classify import classify_file, options_with_defaults
        from paddle_scorer.tasks.job import Destination, Source, check_numbers
        from paddle_scorer.tasks.loading import LoadOptions

        source, dest = Source(prompt, input, id_field, limit, max_line_size), Destination(output, resume, overwrite)
        check_numbers(show=show)
        opts, template_source = options_with_defaults(
            model, lora, labels=labels, template=template, label_prefix=label_prefix, chat_template=chat_template,
            length_norm=length_norm, calibration=calibration, content_free=list(content_free) if content_free else None,
            pmi_domain=pmi_domain, batch_size=batch_size, max_length=max_length, truncate=truncate,
            gold_field=gold_field, coerce_fields=coerce_fields, force_max_length=force_max_length,
            prefix_reuse=prefix_reuse)
        load = LoadOptions(model, lora, mode, device, dtype, tokenizer, memory_limit, allow_noop_adapter, execution)
        run = classify_file(load, opts, source, dest, hooks(), stream_block_records=stream_block_records,
                            template_source=template_source)
        if as_json:
            for rec in run.records:
                typer.echo(json.dumps(rec, ensure_ascii=False))
        _summary(run.stats, run.metrics, run.loaded, run.calibration, to_stderr=as_json)
        if not as_json:
            _table(run.records, opts.labels, show, kept=output is not None)
        if run.written is not None:
            (err if as_json else out).print(f"wrote {run.written} and {run.written}.meta.json", highlight=False,
                                            markup=False)


def _table(records: list[dict], labels: list[str], limit: int, kept: bool) -> None:
    """The first ``limit`` records (all of them when that is every one), after the summary; the title says how to
    see the rest."""
    shown = records[:limit]
    if not shown:
        return
    if len(shown) == len(records):
        title = None
    elif kept:
        title = f"first {len(shown)} of {len(records)} records (all are in the output file; --show N for more here)"
    else:
        title = (f"first {len(shown)} of {len(records)} records: pass --output FILE to keep them all, --json to "
                 "print them all, or --show N")
    t = Table(title=title, title_justify="left")
    t.add_column("id")
    for lab in labels:
        t.add_column(f"P({lab})", justify="right")
    t.add_column("prediction")
    if any("gold" in r for r in shown):
        t.add_column("gold")
    for r in shown:
        row = [str(r["id"])] + [f"{r['probs'][lab]:.4f}" for lab in labels] + [r["prediction"]]
        if "gold" in r:
            mark = "" if r["prediction"] == str(r["gold"]) else " (x)"
            row.append(f"{r['gold']}{mark}")
        t.add_row(*row)
    out.print(t)


def _summary(stats, metrics, loaded, calib, to_stderr: bool) -> None:
    con = err if to_stderr else out
    p = loaded.facts.policy
    per = f"{stats.seconds / stats.scored * 1000:.1f} ms/record" if stats.scored else "nothing new to score"
    con.print(f"scored {stats.scored} record(s)" + (f", {stats.skipped} already done" if stats.skipped else "")
              + f" in {stats.seconds:.2f}s ({per}) on {p['device']} in {p['dtype']}"
              + (f", calibration: {calib['method']}" if calib.get("method") != "none" else ""), highlight=False)
    resume_line(con, stats)
    if metrics and metrics.get("n"):
        con.print(f"accuracy {metrics['accuracy']:.4f}  log-loss {metrics['log_loss']:.4f}  brier {metrics['brier']:.4f}  "
                  f"ECE {metrics['ece']:.4f}  (n={metrics['n']})", highlight=False)
        labels = list(metrics["confusion"])
        t = Table(title="confusion (rows: gold, columns: predicted)")
        t.add_column("gold")
        for lab in labels:
            t.add_column(lab, justify="right")
        for g in labels:
            t.add_row(g, *[str(metrics["confusion"][g][p]) for p in labels])
        con.print(t)
    if metrics and metrics.get("unknown_gold_labels"):
        con.print(styled(f"[yellow]warning:[/] {metrics.get('n_unknown_gold', '')} record(s) have gold labels that are not "
                         f"candidates ({escape(', '.join(map(str, metrics['unknown_gold_labels'])))}); they are left out "
                         "of the metrics."))
