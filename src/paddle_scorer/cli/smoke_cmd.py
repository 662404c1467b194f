"""`paddle-scorer smoke`: a CPU check that answers "will my GPU job work, and will it fit?"."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text
from rich.table import Table

from paddle_scorer.cli import flags
from paddle_scorer import fmt_bytes, parse_size
from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, err, out

EXAMPLES = """
  paddle-scorer smoke --model checkpoints/demo-base \\
      --lora checkpoints/demo-lora \\
      --input checkpoints/demo-queries.jsonl --gpu-memory 80GB

  # with only 2 GB of RAM (the model is then scored layer by layer)
  paddle-scorer smoke -m BASE -l ADAPTER --input data.jsonl \\
      --memory-limit 2GB
"""

_STYLE = {"PASS": "green", "FAIL": "bold red", "WARN": "yellow", "INFO": "cyan", "SKIP": "dim"}


def _status(s: str) -> Text:
    return Text(s, style=_STYLE.get(s, ""))


def _checks_table(title: str, checks) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("check", no_wrap=True)
    t.add_column("result", no_wrap=True)
    t.add_column("detail")
    for c in checks:
        t.add_row(c.name, _status(c.status), c.detail)
    return t


def _memory_table(rows) -> Table:
    t = Table(title="memory", title_justify="left",
              caption="CPU: the loader's rule (float32 weights x 1.1 + the interpreter), else streamed layer by layer. "
                      "GPU: weights x1.2 + 1 GB CUDA context, an estimate; long prompts or big batches need more.",
              caption_justify="left")
    for col in ("device", "dtype", "weights", "needed", "available", "verdict"):
        t.add_column(col, justify="right" if col in ("weights", "needed", "available") else "left")
    for r in rows:
        if r.fits is None:
            verdict = Text("-")
        elif r.device == "CPU":
            verdict = Text("fits", style="green") if r.fits else Text("streams", style="yellow")
        else:
            verdict = Text("fits", style="green") if r.fits else Text("does not fit", style="bold red")
        have = fmt_bytes(r.available) if r.available is not None else "pass --gpu-memory"
        t.add_row(r.device, r.dtype, fmt_bytes(r.weights), fmt_bytes(r.needed), have, verdict)
    return t


def register(app: typer.Typer) -> None:
    @app.command("smoke", **helptext.command(
        "Check on CPU, in minutes, that a GPU job will work and fit.",
        """Checks the checkpoint, the adapter, the tokenizer, every input record and the memory; scores real records
        (streamed when the model does not fit in RAM), compares attach with merge, and projects the GPU time.
        Exit code 0 when every check passes, 1 when any check FAILs.""",
        EXAMPLES))
    @cli_errors
    def smoke(
        model: flags.Model = None,
        lora: flags.Lora = None,
        labels: flags.Labels = None,
        template: flags.Template = None,
        label_prefix: flags.LabelPrefix = None,
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="The JSONL dataset of the GPU job: every record is checked, --limit of them scored."),
        limit: int = typer.Option(5, "--limit", help="Records to score on CPU."),
        gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of the GPU the job will run on, e.g. 80GB, 24GB."),
        memory_limit: flags.MemoryLimit = None,
        tokenizer: flags.Tokenizer = None,
        id_field: flags.IdField = "id",
        as_json: flags.Json = False,
    ):
        from paddle_scorer.tasks import smoke as sm

        opts = sm.SmokeOptions(
            model=model, lora=lora,
            labels=labels,  # parsed once, in smoke, against the label prefix in force (scorer.json's included)
            template=template, label_prefix=label_prefix, input=input, limit=limit,
            gpu_memory=parse_size(gpu_memory, "--gpu-memory") if gpu_memory is not None else None,
            memory_limit=parse_size(memory_limit, "--memory-limit") if memory_limit is not None else None,
            tokenizer=tokenizer, id_field=id_field,
        )
        with err.status("checking, loading and scoring on CPU...", spinner="dots") if err.is_terminal \
                else contextlib.nullcontext():
            result = sm.run(opts)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
        else:
            _render(result)
        if not result.passed:
            raise typer.Exit(1)


def _render(result) -> None:
    title = f"smoke: {result.model_dir}" + (f" + {result.lora_dir}" if result.lora_dir else "")
    out.print(_checks_table(title, result.checks))
    if result.memory:
        out.print(_memory_table(result.memory))
    if result.records and result.labels:
        streamed = result.execution == "streamed"
        t = Table(title=f"{len(result.records)} scored record(s)" + (" (streamed: the full model)" if streamed else ""),
                  title_justify="left")
        t.add_column("id")
        for lab in result.labels:
            t.add_column(f"P({lab})", justify="right")
        t.add_column("prediction")
        for r in result.records:
            t.add_row(str(r["id"]), *[f"{r['probs'][lab]:.4f}" for lab in result.labels], str(r["prediction"]))
        out.print(t)
    fails = [c for c in result.checks if c.status == "FAIL"]
    passes = sum(c.status == "PASS" for c in result.checks)
    if fails:
        out.print(Text.assemble(("FAIL", "bold red"), f": {len(fails)} check(s) failed "
                                f"({', '.join(c.name for c in fails)}); {passes} passed. Fix these before submitting the GPU job."))
    else:
        out.print(Text.assemble(("PASS", "bold green"), f": all {passes} checks passed; the job should work."))
    if result.command:
        note = ""
        if result.gpu_dtype == "bfloat16":
            note = "  (bfloat16 needs an Ampere or newer GPU; on a V100/T4 use --dtype float16)"
        out.print(Text.assemble(("GPU run:", "bold"), f" {result.command}{note}"), soft_wrap=True)
