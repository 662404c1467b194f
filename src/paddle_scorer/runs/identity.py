"""What makes two runs "the same": the one list of everything that changes an output value.

``--resume`` continues an output only when the identity is equal key by key, and ``gather`` only
assembles parts with equal identities. Per-record input content is compared separately (each output
line carries its ``input_fingerprint``, see :mod:`paddle_scorer.runs.output_file`), so an edited input file is
noticed record by record. Computed results (calibration constants, timings, metrics) are provenance,
not identity: they are recomputed, never compared.

``--limit`` is in it: which records an output holds is part of what it is, and a resume with a smaller
limit would otherwise drop the results beyond it as "no longer in the input".

What makes the prompt text and its tokens is in it by content: the chat template's sha256 when one is used
(``chat_template_sha256``; editing ``chat_template`` in tokenizer_config.json changes every chat prompt) and a
sha256 over the tokenizer's files (``tokenizer_sha256``: vocabulary, merges, special tokens, the template), so a
``--resume`` after either was edited is refused instead of keeping records made from other prompts.

Not in the identity, deliberately: batch size and execution (in RAM or streamed; results agree to
float32 noise, tested to 1e-5), thread counts, the input file's path (its content is fingerprinted).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# What a tokenizer folder holds that changes token ids or prompt text (the formats of both libraries and HF).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


def tokenizer_sha256(folder) -> str | None:
    """sha256 over the tokenizer files of ``folder`` (names and contents; see :data:`TOKENIZER_FILES`)."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def chat_template_sha256(tokenizer, use_chat: bool) -> str | None:
    """sha256 of the chat template a run applies (None when it applies none)."""
    template = getattr(tokenizer, "chat_template", None) if use_chat else None
    if not template:
        return None
    text = template if isinstance(template, str) else repr(template)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_identity(loaded) -> dict:
    f = loaded.facts
    return {
        "model_fingerprint": loaded.fingerprint(),
        "adapter_sha256": f.adapter_sha256,
        "mode": f.mode,
        "dtype": f.policy["dtype"],
        "device_kind": "cpu" if f.policy["device"] == "cpu" else "gpu",
        "library": f.library,
        "tokenizer": f.tokenizer_path and str(f.tokenizer_path),
        "tokenizer_sha256": tokenizer_sha256(f.tokenizer_path),
        "noop_adapter_allowed": f.noop_adapter_allowed,
    }


def classify_identity(loaded, opts, *, use_chat: bool, max_length: int | None, id_field: str,
                      limit: int | None = None) -> dict:
    """Everything that changes a classify output value. ``opts``: ClassifyOptions."""
    return {
        "command": "classify",
        **model_identity(loaded),
        "labels": list(opts.labels),
        "template": opts.template,
        "label_prefix": opts.label_prefix,
        "chat_template": use_chat,
        "chat_template_sha256": chat_template_sha256(loaded.tokenizer, use_chat),
        "length_norm": opts.length_norm,
        "calibration": opts.calibration,
        "content_free": list(opts.content_free) if opts.calibration == "contextual" else None,
        "pmi_domain": opts.pmi_domain if opts.calibration == "pmi" else None,
        "max_length": max_length,
        "truncate": opts.truncate,
        "coerce_fields": opts.coerce_fields,
        "gold_field": opts.gold_field,
        "id_field": id_field,
        "limit": limit,
    }


def generate_identity(loaded, opts, *, use_chat: bool, max_length: int | None, id_field: str,
                      limit: int | None = None) -> dict:
    """Everything that changes a generate output value. ``opts``: GenerateOptions."""
    return {
        "command": "generate",
        **model_identity(loaded),
        "template": opts.template,
        "chat_template": use_chat,
        "chat_template_sha256": chat_template_sha256(loaded.tokenizer, use_chat),
        "max_new_tokens": opts.max_new_tokens,
        "top_k": opts.top_k,
        "sample": opts.sample,
        "temperature": opts.temperature if opts.sample else None,
        "seed": opts.seed if opts.sample else None,
        "renormalize_top_k": opts.renormalize_top_k,
        "stop_at_eos": opts.stop_at_eos,
        "max_length": max_length,
        "truncate": opts.truncate,
        "coerce_fields": opts.coerce_fields,
        "id_field": id_field,
        "limit": limit,
    }
