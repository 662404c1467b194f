"""Every command-line option that more than one command takes, declared once (typer ``Annotated`` aliases):
the same flag has the same name, short form and help text in classify, generate, serve, smoke and merge.

Use: ``model: flags.Model = None``; a required one: ``lora: flags.Lora = ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# ---------------------------------------------------------------------------------------- loading a model

Model = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Base (or merged) model folder. Optional when the adapter's lora_config.json names a "
                          "local base.")]
Lora = Annotated[Optional[Path], typer.Option(
    "--lora", "-l", help="LoRA adapter folder (lora_config.json + weights).")]
Mode = Annotated[str, typer.Option(
    "--mode", help="attach (LoRA layers kept separate) | merge (merged into the weights on load).")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | gpu | gpu:N.")]
Dtype = Annotated[str, typer.Option(
    "--dtype", help="auto | float32 | float16 | bfloat16 (on CPU: float32 only).")]
Tokenizer = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="Tokenizer folder, when the model folder has none (or to use another chat template).")]
MemoryLimit = Annotated[Optional[str], typer.Option(
    "--memory-limit", help="RAM this process may use, e.g. 16GB (default: the available RAM minus a margin). A "
                           "model that does not fit is run layer by layer by classify, generate and smoke, and "
                           "refused before loading by serve.")]
Execution = Annotated[str, typer.Option(
    "--execution", help="auto | in-ram | streamed: where the weights live while scoring (auto: in RAM when they fit "
                        "the memory limit).")]
PrefixReuse = Annotated[bool, typer.Option(
    "--prefix-reuse/--no-prefix-reuse", help="Compute a prompt prefix that records share (few-shot examples, a system "
                                            "prompt) once and reuse it (same results; --no-prefix-reuse for A/B checks).")]
AllowNoopAdapter = Annotated[bool, typer.Option(
    "--allow-noop-adapter", help="Use an adapter that changes nothing (all-zero lora_B or lora_alpha 0) instead of "
                                 "refusing it.")]

# ---------------------------------------------------------------------------------------- inputs

Prompt = Annotated[Optional[list[str]], typer.Option(
    "--prompt", "-p", help="A prompt (repeatable). Filled into --template as {query}.")]
Input = Annotated[Optional[Path], typer.Option(
    "--input", "-i", help="JSONL file, one object per line (fields for the template, an optional id and gold label).")]
Template = Annotated[Optional[str], typer.Option(
    "--template", "-t", help="Prompt template with {field} placeholders (default: scorer.json's, else the record's "
                             "query/prompt/text).")]
Labels = Annotated[Optional[str], typer.Option(
    "--labels", help="Comma-separated candidate labels (default: the adapter's scorer.json).")]
LabelPrefix = Annotated[Optional[str], typer.Option(
    "--label-prefix", help="Text put before each label, e.g. ' ' (default: scorer.json's, else ' '; 'auto': a space "
                           "unless the prompt ends with whitespace).")]
ChatTemplate = Annotated[Optional[bool], typer.Option(
    "--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template (default: on when it "
                                               "has one).")]
IdField = Annotated[str, typer.Option(
    "--id-field", help="Record field holding the id (default: id; else the 0-based line index).")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Only the first N records.")]
MaxLineSize = Annotated[Optional[str], typer.Option(
    "--max-line-size", show_default="8MB", help="Longest input line accepted, e.g. 64MB: a longer line is refused by "
                                                "its length, before it is parsed or tokenized.")]
Truncate = Annotated[str, typer.Option(
    "--truncate", help="error | left: what to do with a prompt longer than the context.")]
CoerceFields = Annotated[bool, typer.Option(
    "--coerce-fields", help="Fill null/number/list/object fields into the template as str(value) instead of refusing "
                            "them.")]

# ---------------------------------------------------------------------------------------- outputs

Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write JSONL results here (+ .meta.json provenance).")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted --output: skip records already written with unchanged input.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")]
