"""From a record to token ids: template filling, chat template, and the prompt/label boundary.

The boundary is where label scoring usually goes wrong. We follow lm-evaluation-harness:

* trailing whitespace of the prompt moves into the label (``"Answer: " + "goods"`` is scored as
  ``"Answer:" + " goods"``), because tokenizers attach a space to the *following* word;
* prompt and label are encoded **together** and split at the prompt's own token length, so the
  label's tokens are exactly the ones the model would see after this prompt.

The leading-space question is explicit: ``label_prefix`` (default ``" "``) is put before every
label; ``"auto"`` means a space unless the prompt already ends with whitespace or a newline.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from paddle_scorer.errors import UsageError

DEFAULT_FIELDS = ("query", "prompt", "text")


def template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as exc:
        raise UsageError(f"the template {template!r} is not valid ({exc}); use {{field}} placeholders, {{{{ for a literal brace.") from exc


def fill_template(template: str | None, record: dict, where: str) -> str:
    """The prompt text for ``record``. Without a template, the first of query/prompt/text is used."""
    if template is None:
        for f in DEFAULT_FIELDS:
            if f in record:
                if not isinstance(record[f], str):
                    raise UsageError(f"{where}: field {f!r} is not a string; give text to score.")
                return record[f]
        raise UsageError(
            f"{where}: the record has none of the fields {', '.join(DEFAULT_FIELDS)}; add one or pass "
            "--template with {field} placeholders."
        )
    fields = template_fields(template)
    missing = [f for f in fields if f not in record]
    if missing:
        raise UsageError(
            f"{where}: the template needs field(s) {', '.join(missing)} that the record does not have "
            f"(it has: {', '.join(sorted(record)) or 'nothing'}); fix the data or the --template."
        )
    try:
        return template.format(**{f: record[f] for f in fields})
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"{where}: the template could not be filled ({exc}).") from exc


def parse_labels(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        raise UsageError("no labels given; pass --labels goods,life (any number, comma-separated).")
    labels = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    if any(not s for s in labels):
        raise UsageError(f"--labels {spec!r} contains an empty label; give non-empty, comma-separated labels.")
    dupes = sorted({s for s in labels if labels.count(s) > 1})
    if dupes:
        raise UsageError(f"--labels lists {', '.join(dupes)} more than once; each label must be distinct.")
    if len(labels) < 2:
        raise UsageError("--labels needs at least two labels to compare.")
    return labels


def apply_chat(tokenizer, text: str, use_chat: bool) -> str:
    if not use_chat:
        return text
    return tokenizer.apply_chat_template(text, tokenize=False)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prefix(prefix: str, prompt: str) -> str:
    if prefix != "auto":
        return prefix
    return "" if (prompt and prompt[-1].isspace()) else " "


def encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass(frozen=True)
class EncodedPair:
    context: list[int]
    continuation: list[int]


def encode_pair(tokenizer, prompt: str, label_text: str, special: bool) -> EncodedPair:
    """lm-evaluation-harness' ``_encode_pair``: encode together, split at the prompt's length."""
    n_space = len(prompt) - len(prompt.rstrip())
    if n_space:
        label_text = prompt[-n_space:] + label_text
        prompt = prompt[:-n_space]
    whole = encode(tokenizer, prompt + label_text, special)
    ctx_len = len(encode(tokenizer, prompt, special))
    return EncodedPair(whole[:ctx_len], whole[ctx_len:])
