"""`paddle-scorer smoke`: a CPU check that answers "will my GPU job work, and will it fit?"."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from paddle_scorer.cli.common import cli_errors, err, human_bytes, out

EXAMPLES = """
Examples:

  paddle-scorer smoke --model checkpoints/demo-base --lora checkpoints/demo-lora \\
      --input checkpoints/demo-queries.jsonl --gpu-memory 80GB

  # what if this machine had only 2 GB of RAM? (runs the partial pipeline check)
  paddle-scorer smoke -m BASE -l ADAPTER --input data.jsonl --memory-limit 2GB

Exit code 0 when every check passes, 1 when any check FAILs.
"""

_STYLE = {"PASS": "green", "FAIL": "bold red", "WARN": "yellow", "INFO": "cyan", "SKIP": "dim"}


def _status(s: str) -> str:
    return f"[{_STYLE.get(s, '')}]{s}[/]"


def _checks_table(title: str, checks) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("check", no_wrap=True)
    t.add_column("result", no_wrap=True)
    t.add_column("detail")
    for c in checks:
        t.add_row(c.name, _status(c.status), escape(c.detail))
    return t


def _memory_table(rows) -> Table:
    t = Table(title="memory", title_justify="left",
              caption="CPU: float32 weights + 10% (the loader's rule). GPU: weights x1.2 + 1 GB CUDA context, an "
                      "estimate; long prompts or big batches need more.", caption_justify="left")
    for col in ("device", "dtype", "weights", "needed", "available", "verdict"):
        t.add_column(col, justify="right" if col in ("weights", "needed", "available") else "left")
    for r in rows:
        verdict = "-" if r.fits is None else ("[green]fits[/]" if r.fits else "[bold red]does not fit[/]")
        have = human_bytes(r.available) if r.available is not None else "pass --gpu-memory"
        t.add_row(escape(r.device), r.dtype, human_bytes(r.weights), human_bytes(r.needed), have, verdict)
    return t


def register(app: typer.Typer) -> None:
    @app.command("smoke", help="Check on CPU, in minutes, that a GPU job will work and fit: checkpoint, adapter, "
                               "tokenizer, memory, a few real scores, attach vs merge, projected time." + EXAMPLES)
    @cli_errors
    def smoke(
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base (or merged) model folder. Optional when the adapter's lora_config.json names a local base."),
        lora: Optional[Path] = typer.Option(None, "--lora", "-l", help="LoRA adapter folder."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels (default: scorer.json's; without any, the next-token distribution is checked)."),
        template: Optional[str] = typer.Option(None, "--template", "-t", help="Prompt template with {field} placeholders (default: scorer.json's)."),
        label_prefix: Optional[str] = typer.Option(None, "--label-prefix", help="Text put before each label (default: scorer.json's, else ' ')."),
        input: Optional[Path] = typer.Option(None, "--input", "-i", help="The JSONL dataset of the GPU job: every record is checked, --limit of them scored."),
        limit: int = typer.Option(5, "--limit", help="Records to score on CPU."),
        gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of the GPU the job will run on, e.g. 80GB, 24GB."),
        memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Pretend this machine has only this much free RAM (what-if, e.g. 2GB); default: the real free RAM."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder, when the model folder has none."),
        id_field: str = typer.Option("id", "--id-field", help="Record field holding the id."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ):
        from paddle_scorer import smoke as sm
        from paddle_scorer.prompts import parse_labels

        opts = sm.SmokeOptions(
            model=model, lora=lora,
            labels=parse_labels(labels) if labels is not None else None,
            template=template, label_prefix=label_prefix, input=input, limit=limit,
            gpu_memory=sm.parse_size(gpu_memory) if gpu_memory is not None else None,
            memory_limit=sm.parse_size(memory_limit) if memory_limit is not None else None,
            tokenizer=tokenizer, id_field=id_field,
        )
        pre = sm.preflight(opts)
        if not as_json:
            out.print(_checks_table(f"preflight: {pre.model_dir}" + (f" + {pre.lora_dir}" if pre.lora_dir else ""),
                                    pre.checks))
            if pre.memory:
                out.print(_memory_table(pre.memory))
        with err.status("loading and scoring on CPU...", spinner="dots") if err.is_terminal and pre.ready \
                else contextlib.nullcontext():
            ex = sm.exercise(pre)
        result = sm.SmokeResult(pre, ex, sm.command_for(pre))
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
        else:
            _render_exercise(result)
        if not result.passed:
            raise typer.Exit(1)


def _render_exercise(result) -> None:
    ex = result.exercise
    pre = result.preflight
    if ex.path == "partial":
        out.print(f"[bold yellow]PIPELINE CHECK, NOT A QUALITY CHECK:[/] the model does not fit in RAM, so only "
                  f"{ex.layers} of {pre.model_info.config.get('num_hidden_layers')} decoder layers were loaded; "
                  "the probabilities below test the code path, not the model.", highlight=False)
    title = {"full": "scoring (full model, float32, CPU)", "partial": "scoring (partial model: pipeline check only)",
             "none": "scoring"}[ex.path]
    out.print(_checks_table(title, ex.checks))
    if ex.records and pre.labels:
        t = Table(title=f"{len(ex.records)} scored record(s)" + (" (partial model: not meaningful)" if ex.path == "partial" else ""),
                  title_justify="left")
        t.add_column("id")
        for lab in pre.labels:
            t.add_column(f"P({escape(lab)})", justify="right")
        t.add_column("prediction")
        for r in ex.records:
            t.add_row(escape(str(r["id"])), *[f"{r['probs'][lab]:.4f}" for lab in pre.labels], escape(r["prediction"]))
        out.print(t)
    checks = result.all_checks
    fails = [c for c in checks if c.status == "FAIL"]
    passes = sum(c.status == "PASS" for c in checks)
    if fails:
        out.print(f"[bold red]FAIL[/]: {len(fails)} check(s) failed ({', '.join(c.name for c in fails)}); "
                  f"{passes} passed. Fix these before submitting the GPU job.", highlight=False)
    else:
        verdict = "the pipeline works (partial model)" if ex.path == "partial" else "the job should work"
        out.print(f"[bold green]PASS[/]: all {passes} checks passed; {verdict}.", highlight=False)
    if result.command:
        note = ""
        if pre.gpu_dtype == "bfloat16":
            note = "  (bfloat16 needs an Ampere or newer GPU; on a V100/T4 use --dtype float16)"
        out.print(f"[bold]GPU run:[/] {escape(result.command)}{note}", highlight=False, soft_wrap=True)
