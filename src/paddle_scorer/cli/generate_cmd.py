"""`paddle-scorer generate`: greedy or seeded sampled generation with per-step raw softmax top-k."""

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
  paddle-scorer generate --model checkpoints/demo-base \\
      --lora checkpoints/demo-lora --max-new-tokens 3 --top-k 5 \\
      --prompt "what is the price of cabbage today?"

  paddle-scorer generate -m BASE -l ADAPTER --input data.jsonl \\
      --output traces.jsonl --sample --seed 1
"""


def register(app: typer.Typer) -> None:
    @app.command("generate", **helptext.command(
        "Generate and record, per step, the raw softmax: chosen token, prob, entropy, top-k.",
        """Prompts go through the adapter's scorer.json template like classify's (--template to change it,
        --raw to send them as given).""",
        EXAMPLES))
    @cli_errors
    def generate(
        model: flags.Model = None,
        lora: flags.Lora = None,
        prompt: flags.Prompt = None,
        input: flags.Input = None,
        template: flags.Template = None,
        raw: bool = typer.Option(False, "--raw", help="Use prompts as given: no template from scorer.json."),
        output: flags.Output = None,
        as_json: flags.Json = False,
        resume: flags.Resume = False,
        overwrite: flags.Overwrite = False,
        max_new_tokens: int = typer.Option(20, "--max-new-tokens", "-n", help="Stop after this many tokens (or at EOS)."),
        top_k: int = typer.Option(5, "--top-k", "-k", help="Top-k tokens recorded per step (raw softmax)."),
        sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
        temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (recorded probabilities stay raw)."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed (per record)."),
        renormalize_top_k: bool = typer.Option(False, "--renormalize-top-k", help="Also record the OLD method's renormalised top-k, labelled as such."),
        stop: Optional[list[str]] = typer.Option(None, "--stop", help="Finish a record when its text contains this "
                                                 "string (repeatable; the string is not part of the text)."),
        chat_template: flags.ChatTemplate = None,
        id_field: flags.IdField = "id",
        truncate: flags.Truncate = "error",
        limit: flags.Limit = None,
        max_line_size: flags.MaxLineSize = None,
        mode: flags.Mode = "attach",
        device: flags.Device = "auto",
        dtype: flags.Dtype = "auto",
        tokenizer: flags.Tokenizer = None,
        memory_limit: flags.MemoryLimit = None,
        execution: flags.Execution = "auto",
        allow_noop_adapter: flags.AllowNoopAdapter = False,
        coerce_fields: flags.CoerceFields = False,
        prefix_reuse: flags.PrefixReuse = True,
    ):
        from paddle_scorer.tasks.generate import generate_file, options_with_defaults
        from paddle_scorer.tasks.job import Destination, Source
        from paddle_scorer.tasks.loading import LoadOptions

        source, dest = Source(prompt, input, id_field, limit, max_line_size), Destination(output, resume, overwrite)
        opts, template_source = options_with_defaults(
            model, lora, template=template, raw=raw, max_new_tokens=max_new_tokens, top_k=top_k, sample=sample,
            temperature=temperature, seed=seed, renormalize_top_k=renormalize_top_k, chat_template=chat_template,
            truncate=truncate, coerce_fields=coerce_fields, prefix_reuse=prefix_reuse, stop=tuple(stop or ()))
        load = LoadOptions(model, lora, mode, device, dtype, tokenizer, memory_limit, allow_noop_adapter, execution)
        run = generate_file(load, opts, source, dest, hooks(), template_source=template_source)
        stats, loaded = run.stats, run.loaded
        if as_json:
            for rec in stats.records:
                typer.echo(json.dumps(rec, ensure_ascii=False))
        else:
            for rec in stats.records[: (None if output is None else 3)]:
                _show(rec)
        con = err if as_json else out
        con.print(f"generated for {stats.scored} record(s)" + (f", {stats.skipped} already done" if stats.skipped else "")
                  + f" in {stats.seconds:.2f}s on {loaded.device} in {loaded.dtype}"
                  + (f"; wrote {output}" if output else ""), highlight=False)
        resume_line(con, stats)


def _show(rec: dict) -> None:
    out.print(styled(f"[bold]{escape(str(rec['id']))}[/]: {escape(repr(rec['text']))} ({rec['finish_reason']})"))
    shown = min(5, max((len(s["top"]) for s in rec["steps"]), default=0))
    t = Table(title=f"per step: the chosen token and the {shown} most likely" + (
                  " (all --top-k in --output/--json)" if any(len(s["top"]) > shown for s in rec["steps"]) else ""),
              title_justify="left")
    for col in ("step", "token", "prob", "logprob", "entropy", "top"):
        t.add_column(col)
    for i, s in enumerate(rec["steps"]):
        # one candidate per line: a token is never split across lines (' st' wrapped as "'" / "st'")
        top = "\n".join(f"{x['token']!r} {x['prob']:.3f}" for x in s["top"][:5])
        t.add_row(str(i), repr(s["token"]), f"{s['prob']:.4f}", f"{s['logprob']:.3f}", f"{s['entropy']:.3f}", top)
    out.print(t)
