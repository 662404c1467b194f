"""`paddle-scorer inspect PATH`: explain a checkpoint folder without loading it into paddle."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from paddle_scorer.tasks.inspect import (
    FULL_MODEL,
    LORA_ADAPTER,
    MERGED_MODEL,
    NOT_A_CHECKPOINT,
    RENAMED_ADAPTER,
    CheckpointInfo,
    inspect_folder,
)
from paddle_scorer import fmt_bytes
from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, err, escape, human_count, out, styled, print_trimmed
from rich.text import Text

_KIND_TITLE = {
    FULL_MODEL: "full model",
    MERGED_MODEL: "merged model",
    LORA_ADAPTER: "LoRA adapter",
    RENAMED_ADAPTER: "renamed LoRA adapter (trap)",
    NOT_A_CHECKPOINT: "not a checkpoint",
}


def _dtypes(d: dict[str, int]) -> str:
    total = sum(d.values()) or 1
    if len(d) == 1:
        return next(iter(d))
    return ", ".join(f"{k} ({100 * v / total:.0f}%)" for k, v in d.items())


def _files(files: list[str]) -> str:
    names = [Path(f).name for f in files]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} files)"


def render(info: CheckpointInfo, a=None) -> None:
    out.print(styled(f"[bold]{escape(info.path)}[/]: {_KIND_TITLE.get(info.kind, info.kind)}"))
    out.print(info.summary, highlight=False)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="cyan", no_wrap=True)
    t.add_column()
    _model_rows(t, info, a)
    _machine_rows(t, a)
    if info.merged_from:
        m = info.merged_from
        t.add_row("merged from", f"base {m.get('base')} + adapter {m.get('adapter')} "
                                 f"(sha256 {str(m.get('adapter_sha256', ''))[:12]}, scaling {m.get('scaling')})")
    _adapter_rows(t, info)
    if info.kind != NOT_A_CHECKPOINT:
        tok = ", ".join(info.tokenizer_files) if info.tokenizer_files else (
            "none here (the base model's is used)" if info.kind == LORA_ADAPTER else "none")
        if info.tokenizer_class:
            tok += f" ({info.tokenizer_class})"
        t.add_row("tokenizer", tok)
        t.add_row("chat template", "yes" if info.chat_template else "no")
    if info.scorer_defaults:
        t.add_row("scorer defaults", json.dumps(info.scorer_defaults, ensure_ascii=False))
    if t.row_count:
        print_trimmed(out, t)
    for w in info.warnings:
        out.print(styled(f"[yellow]warning:[/] {escape(w)}"))
    if info.next_command:
        out.print(styled(f"[bold]next:[/] {escape(info.next_command)}"), soft_wrap=True)


def _family_line(f: dict) -> str:
    experts = ""
    if f["experts"]:
        experts = (f"; {f['experts']} experts, {f['experts_per_token']} per token"
                   + (" + shared" if f["shared_expert_intermediate"] else "")
                   + f" in {f['moe_layers']} of {f['layers']} layers")
    active = (f", {human_count(f['params_active'])} active per token" if f["params_active"] != f["params_total"]
              else "")
    window = f"; a sliding window of {f['window']} tokens on {f['sliding_layers']} of {f['layers']} layers" \
        if f.get("window") else ""
    return (f"{f['title']} ({f['attention']} attention, {f['rope']} RoPE){experts}{window}; "
            f"{human_count(f['params_total'])} parameters{active}; computed by {f['computed_by']} ({f['why']}; "
            f"{f['gpu']})")


def _model_rows(t: Table, info: CheckpointInfo, a) -> None:
    if info.architecture or info.model_type:
        c = info.config
        shape = ", ".join(f"{k}={c[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "vocab_size") if k in c)
        t.add_row("architecture", f"{info.architecture or '?'} ({info.model_type or '?'}) {shape}")
    if info.weights is not None and info.kind != RENAMED_ADAPTER:
        w = info.weights
        t.add_row("weights", f"{_files(w.files)} [{w.format}{', sharded' if w.sharded else ''}]")
        t.add_row("parameters", f"{human_count(w.num_params)} ({w.num_params:,}) in {w.num_tensors} tensors")
        t.add_row("stored dtype", _dtypes(w.dtypes) + (f" (config.json says {info.config_dtype})" if info.config_dtype else ""))
        t.add_row("memory to load",
                  f"float32 {fmt_bytes(info.memory['float32'])} (CPU), float16/bfloat16 "
                  f"{fmt_bytes(info.memory['float16'])} (GPU); weights only, activations extra")
    if a is not None and a.layout:
        lay = a.layout
        t.add_row("layout", lay["description"] + (f"; saved by {lay['saved_by']}" if lay.get("saved_by") else "")
                  + f" ({lay['evidence']})")
    if info.adapter is not None and info.adapter.saved_by:
        held = ("LoRA A [r, in] and B [out, r] as torch holds them, turned into Paddle's [in, r] / [r, out] with each "
                "module's scaling folded into B" if info.adapter.format == "peft" else
                "LoRA A [in, r] and B [r, out] as Paddle holds them")
        t.add_row("saved by", f"{info.adapter.saved_by} ({info.adapter.saved_by_evidence}); {held}, names mapped onto "
                              "the base's on load")
    if a is not None and a.family:
        t.add_row("family", _family_line(a.family))
    elif a is not None and a.library:
        t.add_row("built by", a.library + ("" if a.library_installed else " (NOT installed here)"))


def _machine_rows(t: Table, a) -> None:
    if a is not None and a.gpu_only:
        t.add_row("CPU", a.gpu_only)
    if a is not None and a.memory and not a.gpu_only:
        m = a.memory
        if m.get("execution") == "in-ram":
            t.add_row("this machine", f"fits in RAM as float32 (about {fmt_bytes(m['need'])} <= "
                                      f"{fmt_bytes(m['budget'])}, {m['budget_source']})")
        elif m.get("execution") == "streamed":
            t.add_row("this machine", f"does NOT fit in RAM as float32 (about {fmt_bytes(m['need'])} > "
                                      f"{fmt_bytes(m['budget'])}, {m['budget_source']}): classify streams it layer by "
                                      f"layer, about {m['records_per_block']:,} records of {m['assumed_tokens']} tokens "
                                      "per block (each block reads the weights once); generate needs a bigger machine "
                                      "or a GPU")
        else:
            t.add_row("this machine", m.get("reason", ""))


def _adapter_rows(t: Table, info: CheckpointInfo) -> None:
    if info.adapter is not None:
        a = info.adapter
        if a.scaling is None:
            t.add_row("LoRA", f"r={a.r} (from the tensors); alpha and scaling unknown: lora_config.json is missing")
        elif a.format == "peft":
            t.add_row("LoRA", f"r={a.r}, lora_alpha={a.lora_alpha:g} ({a.scaling_formula})"
                      + (", rsLoRA" if a.rslora else "") + (", DoRA (magnitude per output column)" if a.dora else ""))
            if a.ranks:
                t.add_row("per module", "; ".join(f"{k}: {n} module(s)" for k, n in a.ranks.items()))
            if a.modules_to_save or a.whole_tensors:
                t.add_row("modules_to_save", f"{', '.join(a.modules_to_save) or '-'} (stored whole, used instead of the "
                                              f"base's: {', '.join(a.whole_tensors) or 'none'})")
        else:
            t.add_row("LoRA", f"r={a.r}, lora_alpha={a.lora_alpha:g}, scaling={a.scaling:g} ({a.scaling_formula})"
                      + (", rslora" if a.rslora else ""))
        if a.target_modules:
            t.add_row("target modules", ", ".join(a.target_modules))
        aw = info.adapter_weights if info.adapter_weights is not None else info.weights
        if aw is not None:
            t.add_row("adapter weights", f"{_files(aw.files)} [{aw.format}] {a.adapted_modules} adapted modules, "
                                         f"{human_count(aw.num_params)} params, {_dtypes(aw.dtypes)}, "
                                         f"key prefix `{a.key_prefix}`")
        if a.base_model_name_or_path or info.kind == LORA_ADAPTER:
            where = f"found at {a.base_found}" if a.base_found else "NOT found on this machine"
            t.add_row("base model", f"{a.base_model_name_or_path or '(not recorded)'} -> {where}")
        if a.unsupported_variants:
            t.add_row("unsupported", ", ".join(a.unsupported_variants))


def register(app: typer.Typer) -> None:
    @app.command("inspect", **helptext.command(
        "Explain a checkpoint folder without loading it (no pickle code runs).",
        """Exit codes: 0 a usable model or adapter; otherwise the code the loader would fail with: 3 not a
        checkpoint, 4 broken, ambiguous or a trap (e.g. a LoRA file renamed to model_state.pdparams), 2 a folder
        that cannot play the role it looks like.""",
        """
        paddle-scorer inspect checkpoints/demo-lora
        paddle-scorer inspect checkpoints/demo-base --json
        """))
    @cli_errors
    def inspect(
        path: Path = typer.Argument(..., help="A checkpoint folder: model, LoRA adapter, merged model, ..."),
        as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
    ):
        info, a = inspect_folder(path)
        if not a.usable and info.kind != RENAMED_ADAPTER:
            info.next_command = None  # never suggest loading what the loader refuses (the trap's fix is a rename)
        if as_json:
            typer.echo(json.dumps({**info.to_dict(), "assessment": a.to_dict()}, indent=2, ensure_ascii=False))
        else:
            render(info, a)
            if a.refusal and info.kind != NOT_A_CHECKPOINT:
                err.print(Text.assemble(("refused:", "bold red"), " ", a.refusal))
        if info.kind == RENAMED_ADAPTER:
            raise typer.Exit(4)
        if not a.usable:
            raise typer.Exit(a.exit_code)
