"""`paddle-scorer merge`: fold a LoRA adapter into its base model's weights (no paddle needed)."""

from __future__ import annotations

import shlex
import signal
from contextlib import contextmanager
from pathlib import Path

import typer

from paddle_scorer.cli import flags
from paddle_scorer import fmt_bytes
from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, err, escape, out, styled


@contextmanager
def _sigterm_as_interrupt():
    """`kill PID` cleans up like Ctrl-C does (the temporary folder is removed)."""

    def _raise(*_):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def render(result) -> None:
    r = result
    out.print(styled(
        f"merged {r.merged_modules} LoRA modules into [bold]{escape(str(r.out))}[/]"
        + (" (replaced the existing folder)" if r.replaced_existing else "")
    ))
    out.print(f"  scaling  {r.scaling_formula}" if r.record.get("adapter_format") == "peft" else
              f"  scaling  {r.scaling:g} ({r.scaling_formula})", highlight=False)
    weights = [f for f in r.files if f.endswith((".safetensors", ".pdparams"))]
    shown = ", ".join(weights) if len(weights) <= 3 else f"{weights[0]} ... {weights[-1]} ({len(weights)} shards)"
    out.print(f"  output   {r.format}, {r.out_dtype}, {fmt_bytes(r.out_bytes)}: {shown}", highlight=False)
    # Below ~64 MB of weights a ratio would only measure the Python interpreter (~50 MB).
    vs = (f" = {r.peak_rss_bytes / r.base_bytes:.2f}x the base's" if r.base_bytes >= 64 * 1024**2 else " for")
    out.print(
        f"  memory   peak RSS {fmt_bytes(r.peak_rss_bytes)}{vs} {fmt_bytes(r.base_bytes)} of weights "
        "(before --verify; includes ~50 MB for Python itself)",
        highlight=False,
    )
    if r.verify is not None:
        v = r.verify
        out.print(
            f"  verify   max |log-prob difference| {v.max_abs_diff:.3g} vs base + attached adapter on a "
            f"{v.probe_tokens}-token probe (tolerance {v.tolerance:.3g}): passed",
            highlight=False,
        )
    for note in r.notes:
        out.print(f"  note     {note}")
    out.print(styled(f"[bold]next:[/] paddle-scorer inspect {escape(shlex.quote(str(r.out)))}"))


def register(app: typer.Typer) -> None:
    @app.command("merge", **helptext.command(
        "Merge a LoRA adapter into its base: W + A @ B * scaling, tensor by tensor.",
        """Works on the weight files directly (no model is built, paddle is not loaded), one shard at a time, and
        writes into a temporary folder that is renamed to --out only when complete: an error or Ctrl-C leaves
        nothing behind. The result loads as a plain model, here and in PaddleNLP / PaddleFormers.

        --force replaces only an earlier merge output (nothing else is ever deleted).

        --verify tolerance: 1e-3 absolute for float32 output; for float16/bfloat16 output 5e-2 x max(1, max
        |logit|), since the merged weights are rounded to half precision.""",
        """
        paddle-scorer merge --model checkpoints/demo-base \\
            --lora checkpoints/demo-lora --out merged --verify
        """))
    @cli_errors
    def merge(
        model: flags.Model = None,
        lora: flags.Lora = ...,
        out_dir: Path = typer.Option(..., "--out", help="New folder for the merged model."),
        dtype: str = typer.Option("auto", "--dtype",
                                  help="auto (keep the stored dtype), float32, float16 or bfloat16."),
        fmt: str = typer.Option("safetensors", "--format", help="safetensors or pdparams."),
        verify: bool = typer.Option(False, "--verify",
                                    help="Before finishing, check merged logits == base + attached adapter (loads paddle)."),
        force: bool = typer.Option(False, "--force", help="Replace --out if it is an earlier merge output (any other folder is refused)."),
        allow_noop_adapter: flags.AllowNoopAdapter = False,
    ):
        from paddle_scorer.tasks import merge as merging

        for note in merging.clean_stale(out_dir):  # said first: it may explain what follows
            err.print(f"note: {note}.", highlight=False)
        try:
            with _sigterm_as_interrupt():
                p = merging.plan(model, lora, out_dir, dtype=dtype, fmt=fmt, force=force, verify=verify,
                                 allow_noop_adapter=allow_noop_adapter)
                if p.adapter_plan.base_note:  # before the work, as classify says it before scoring
                    err.print(f"note: {p.adapter_plan.base_note}.", highlight=False, markup=False)
                result = merging.write(p, verify=verify)
        except KeyboardInterrupt as exc:
            err.print(f"interrupted: {exc}" if str(exc) else
                      "interrupted: the merge was cancelled and nothing was written (--out is as it was); run the "
                      "command again.")
            raise typer.Exit(130) from None
        render(result)
