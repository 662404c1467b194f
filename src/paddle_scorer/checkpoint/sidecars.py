"""The small files next to the weights, read and checked without paddle: ``config.json``'s values,
``scorer.json`` (the template and labels a fine-tune was trained with), the tokenizer's JSON and chat
template, and ``paddle_scorer_merge.json`` (what ``merge`` records).
"""

from __future__ import annotations

import json
from pathlib import Path

from paddle_scorer.errors import CheckpointError

MERGE_RECORD = "paddle_scorer_merge.json"  # written by `paddle-scorer merge`
SCORER_DEFAULTS = "scorer.json"  # optional: template and labels a fine-tune was trained with

_ARCH_FIELDS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
]



def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or re-create it.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or re-create it.")
    return data


SCORER_KEYS = {"template": "a string with {field} placeholders", "labels": "a list of label strings",
               "label_prefix": "a string"}


def _json_kind(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def scorer_defaults(model: Path | None, lora: Path | None) -> dict:
    """Template/labels a fine-tune was trained with (scorer.json in the adapter, else the model). A
    scorer.json that is not valid JSON or has values of the wrong type is refused, naming the file."""
    for folder in (lora, model):
        if folder is not None and Path(folder).is_dir():
            data = read_scorer_defaults(folder)
            if data is not None:
                return data
    return {}


def read_scorer_defaults(folder: str | Path) -> dict | None:
    """``scorer.json`` of ``folder`` (None when there is none), typed: refused, naming the file, when it is
    not a JSON object of ``template`` (string), ``labels`` (list of strings) and ``label_prefix`` (string).
    An unknown key is refused too: a misspelt ``label_prefix`` would silently score with the default."""
    path = Path(folder) / SCORER_DEFAULTS
    if not path.is_file():
        return None
    data = read_json(path)
    problems = []
    unknown = sorted(set(data) - set(SCORER_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(SCORER_KEYS)})")
    for key in ("template", "label_prefix"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{key} must be {SCORER_KEYS[key]}, not {_json_kind(data[key])}")
    labels = data.get("labels")
    if "labels" in data and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        what = _json_kind(labels) if not isinstance(labels, list) else "a list holding " + ", ".join(
            sorted({_json_kind(x) for x in labels if not isinstance(x, str)}))
        problems.append(f"labels must be {SCORER_KEYS['labels']}, not {what}")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; fix the file (or delete it and pass --labels and "
                              "--template).")
    return data


_TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json")


def tokenizer_problem(folder: str | Path) -> str | None:
    """What would stop the tokenizer in ``folder`` from loading, found without importing paddle: a JSON file of
    it that does not parse, or a chat template that is not valid Jinja. None when nothing is found (rendering
    errors of a valid template only show on a prompt: see :func:`paddle_scorer.tasks.prompts.apply_chat`)."""
    folder = Path(folder)
    templates = []
    for name in _TOKENIZER_JSON:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            return f"{name} is not valid JSON: {' '.join(str(exc).split())[:120]}"
        if name in ("tokenizer_config.json", "chat_template.json") and isinstance(data, dict):
            templates.append((name, data.get("chat_template")))
    if (folder / "chat_template.jinja").is_file():
        templates.append(("chat_template.jinja", (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")))
    for name, tpl in templates:
        if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
            sources = [t.get("template") for t in tpl if isinstance(t, dict)]
        else:
            sources = [tpl]
        for src in (x for x in sources if isinstance(x, str)):
            try:
                import jinja2
            except ImportError:  # pragma: no cover - a dependency of paddlenlp
                return None
            try:
                jinja2.Environment().parse(src)
            except jinja2.TemplateSyntaxError as exc:
                return f"the chat template in {name} is not valid Jinja ({' '.join(str(exc).split())[:120]})"
    return None



_POSITIVE_INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def config_problem(cfg: dict) -> str | None:
    """A config value of the wrong type or out of range (the library would fail with an assertion, or worse,
    build something else), as one phrase; None when the config is sound."""
    problems = []
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        problems.append(f"`architectures` must be a list of class names, found {archs!r}")
    for k in (*_POSITIVE_INT_FIELDS, "num_key_value_heads", "max_position_embeddings"):
        v = cfg.get(k)
        if v is None and k not in _POSITIVE_INT_FIELDS:
            continue
        if v is None:
            continue  # absent: the library's default applies
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"`{k}` must be a positive integer, found {v!r}")
    h, n, kv = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if not problems and isinstance(h, int) and isinstance(n, int) and cfg.get("head_dim") is None and h % n:
        problems.append(f"hidden_size {h} is not divisible by num_attention_heads {n}")
    if not problems and isinstance(n, int) and isinstance(kv, int) and n % kv:
        problems.append(f"num_attention_heads {n} is not divisible by num_key_value_heads {kv}")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        problems.append(f"`tie_word_embeddings` must be true or false, found {tie!r}")
    return "; ".join(problems) + "; fix config.json (it does not describe the saved weights)" if problems else None


def architecture_difference(a: Path, b: Path) -> str | None:
    """How two model folders' architectures differ (model type, sizes), or None when they agree."""
    try:
        ca, cb = read_json(a / "config.json"), read_json(b / "config.json")
    except CheckpointError:
        return None
    fields = ["model_type", "architectures", *_ARCH_FIELDS]
    diffs = [f"{k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in fields
             if k != "max_position_embeddings" and k != "rope_theta" and ca.get(k) != cb.get(k)]
    return ", ".join(diffs[:3]) if diffs else None


