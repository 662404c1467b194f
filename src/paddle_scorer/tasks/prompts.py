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

import json
import string
from dataclasses import dataclass

from paddle_scorer.errors import UsageError
from paddle_scorer.model.tokenizer import Encoder, encode  # noqa: F401 - encode: the one text -> ids call

DEFAULT_FIELDS = ("query", "prompt", "text")


def template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"the template {template!r} is not valid ({exc}); use {{field}} placeholders, {{{{ for a literal brace.") from exc


def literal_escape_note(template: str | None, source: str = "--template") -> str | None:
    """A ``note:`` for a template typed as ``"Query: {query}\\nAnswer:"`` in double quotes: the shell passes a
    backslash and an ``n``, not a newline, and the model scores that text. Said only when the template has the
    two characters and no real newline or tab (a template with both is taken as meant)."""
    if template is None or "\n" in template or "\t" in template:
        return None
    found = [seq for seq in ("\\n", "\\t") if seq in template]
    if not found:
        return None
    shown = " and ".join(found)
    fix = ("in bash write --template $'Query: {query}\\nAnswer:' for a real newline" if source == "--template"
           else f"write a real newline in {source} (\"\\n\" in JSON) if one was meant")
    return (f"the template ({source}) contains the two characters {shown} (a backslash and a letter), not a newline "
            f"or tab, and is scored that way; {fix}.")


def check_template(template: str | None) -> None:
    """A template must be parseable and use at least one field: otherwise every record gets the same prompt."""
    if template is None:
        return
    fields = template_fields(template)
    if not fields:
        raise UsageError(
            f"the template {template!r} has no {{field}} placeholder, so every record would be scored with the same "
            "prompt; add one, e.g. {query}."
        )
    bad = [f for f in fields if not f.isidentifier()]
    if bad:
        raise UsageError(f"the template's placeholder {{{bad[0]}}} is not a plain field name; use {{field}} "
                         "(attribute access, indexing and format specs are not supported).")
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            what = f"the conversion !{conversion} (it would add quotes or escapes)" if conversion else \
                f"the format spec :{spec} (it could cut or pad the text)"
            raise UsageError(f"the template's placeholder {shown} has {what}; use plain {{{name}}}, which puts "
                             "the field's text in unchanged.")


def _typed(value, field_name: str, where: str, coerce: bool) -> str:
    if isinstance(value, str):
        return value
    if coerce:
        return str(value)
    kind = "null" if value is None else type(value).__name__.replace("dict", "object").replace("list", "list")
    raise UsageError(
        f"{where}: field {field_name!r} is {kind} ({json.dumps(value, ensure_ascii=False)[:40]}), not text; it would be "
        "scored as the text of a Python value: fix the data, or pass --coerce-fields to score str(value)."
    )


def fill_template(template: str | None, record: dict, where: str, coerce: bool = False) -> str:
    """The prompt text for ``record``. Without a template, the first of query/prompt/text is used.
    Every field used must be a string (null, numbers, lists, objects are refused unless ``coerce``)."""
    if template is None:
        for f in DEFAULT_FIELDS:
            if f in record:
                return _typed(record[f], f, where, coerce)
        raise UsageError(
            f"{where}: the record has none of the fields {', '.join(DEFAULT_FIELDS)}; add one or pass "
            "--template with {field} placeholders."
        )
    fields = template_fields(template)
    missing = [f for f in fields if f not in record]
    if missing:
        raise UsageError(
            f"{where}: the template needs field(s) {', '.join(missing)} that the record does not have "
            f"(it has: {', '.join(sorted(map(str, record))) or 'nothing'}); fix the data or the --template."
        )
    values = {f: _typed(record[f], f, where, coerce) for f in dict.fromkeys(fields)}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise UsageError(f"{where}: the template could not be filled ({exc}).") from exc


def parse_labels(spec: str | list[str] | None, label_prefix: str = " ") -> list[str]:
    """Comma-separated labels (spaces around each are dropped: ``goods, life``), or a list kept exactly
    (scorer.json). Spaces the user typed around a label are refused unless ``label_prefix`` supplies the
    leading space anyway (``" "``, ``"auto"``): with another prefix (``""``) they would silently not be scored."""
    if spec is None:
        raise UsageError("no labels given; pass --labels goods,life (any number, comma-separated).")
    labels = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    if isinstance(spec, str) and label_prefix not in (" ", "auto") and any(s != s.strip() for s in spec.split(",")):
        scored = ", ".join(repr(label_prefix + s) for s in labels if s)
        raise UsageError(
            f"--labels {spec!r} has spaces around labels, which are dropped, so with --label-prefix {label_prefix!r} "
            f"the scored texts would be {scored}; to score a leading space pass --label-prefix ' ' (or 'auto'), or "
            "write the labels without spaces."
        )
    if any(not s for s in labels):
        raise UsageError(f"--labels {spec!r} contains an empty label; give non-empty, comma-separated labels.")
    dupes = sorted({s for s in labels if labels.count(s) > 1})
    if dupes:
        raise UsageError(f"--labels lists {', '.join(dupes)} more than once; each label must be distinct.")
    if len(labels) < 2:
        raise UsageError("--labels needs at least two labels to compare.")
    return labels


def apply_chat(tokenizer, text: str, use_chat: bool, where: str = "the prompt") -> str:
    """``text`` wrapped in the tokenizer's chat template. The template is the checkpoint's code (Jinja): an
    error it raises (``raise_exception``, an undefined variable) is the checkpoint's, said as one sentence."""
    if not use_chat:
        return text
    from paddle_scorer.errors import CheckpointError

    try:
        return tokenizer.apply_chat_template(text, tokenize=False)
    except Exception as exc:  # jinja2 raises many types
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{where}: the tokenizer's chat template failed on this prompt ({type(exc).__name__}: "
                              f"{detail}); fix chat_template in the tokenizer files, or pass --no-chat-template.") from None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prefix(prefix: str, prompt: str) -> str:
    if prefix != "auto":
        return prefix
    return "" if (prompt and prompt[-1].isspace()) else " "


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


# --------------------------------------------------------------------------------------------------
# The one prompt path: record -> text -> token ids
# --------------------------------------------------------------------------------------------------

TRUNCATIONS = ("error", "left")


@dataclass(frozen=True)
class PromptOptions:
    template: str | None = None
    chat_template: bool | None = None  # None: on when the tokenizer has one
    max_length: int | None = None  # None: the model's context
    truncate: str = "error"  # error | left
    coerce_fields: bool = False
    force_max_length: bool = False  # allow max_length beyond the model's context (recorded as forced)


class Prompter:
    """Record -> prompt text -> token ids, shared by classify, generate, smoke and serve.

    * the template is filled with typed fields (:func:`fill_template`);
    * the tokenizer's chat template wraps the text when it has one (unless turned off); special tokens
      (BOS) are added by the tokenizer only when no chat template is used, since a chat template
      writes its own;
    * :meth:`fit` applies the length rule: a prompt plus what follows it (label tokens, new tokens)
      must fit ``max_length``, or ``truncate="left"`` drops prompt tokens from the start.
    """

    def __init__(self, tokenizer, options: PromptOptions, context_length: int | None):
        if options.truncate not in TRUNCATIONS:
            raise UsageError(f"--truncate {options.truncate!r} must be error or left.")
        check_template(options.template)
        self.tok = tokenizer
        self.opts = options
        has_chat = has_chat_template(tokenizer)
        if options.chat_template and not has_chat:
            raise UsageError("--chat-template was asked for but the tokenizer has no chat template; drop the flag.")
        self.use_chat = has_chat if options.chat_template is None else bool(options.chat_template)
        self.encoder = Encoder(tokenizer)
        self.special = not self.use_chat  # a chat template writes its own special tokens
        self.context_length = context_length
        self.forced: list[str] = []
        if options.max_length is not None:
            if options.max_length < 2:
                raise UsageError(f"--max-length {options.max_length} is too small; give at least 2 tokens.")
            if context_length and options.max_length > context_length:
                if not options.force_max_length:
                    raise UsageError(
                        f"--max-length {options.max_length} is larger than the model's context of {context_length} "
                        "tokens (max_position_embeddings): positions beyond it were never trained; lower it, or "
                        "pass --force-max-length to score anyway (recorded in the output)."
                    )
                self.forced.append(f"max_length {options.max_length} > model context {context_length}")
        self.max_length = options.max_length or context_length

    @property
    def pad_id(self) -> int:
        pid = getattr(self.tok, "pad_token_id", None)
        return int(pid) if pid is not None else 0

    def text(self, record: dict, where: str) -> str:
        return apply_chat(self.tok, fill_template(self.opts.template, record, where, self.opts.coerce_fields),
                          self.use_chat, where)

    def encode(self, text: str) -> list[int]:
        return self.encoder.one(text, self.special)

    def fit(self, ids: list[int], where: str, following: int = 0) -> tuple[list[int], int]:
        """``ids`` cut to leave ``following`` tokens of room within ``max_length``: (ids, tokens dropped)."""
        if not ids:
            raise UsageError(f"{where}: the prompt is empty after tokenization; give some text to score.")
        total = len(ids) + following
        if not self.max_length or total <= self.max_length:
            return ids, 0
        if self.opts.truncate == "left":
            drop = total - self.max_length
            if drop >= len(ids):
                raise UsageError(f"{where}: what follows the prompt alone ({following} tokens) exceeds the context of "
                                 f"{self.max_length} tokens.")
            return ids[drop:], drop
        raise UsageError(
            f"{where}: the prompt and what follows it is {total} tokens, longer than the context of {self.max_length}; "
            "shorten it or pass --truncate left to drop tokens from the start."
        )

    def prompt_ids(self, record: dict, where: str, following: int = 0) -> tuple[str, list[int], int]:
        """(text, ids, tokens dropped) for a record whose prompt is followed by ``following`` tokens."""
        text = self.text(record, where)
        ids, dropped = self.fit(self.encode(text), where, following)
        return text, ids, dropped
