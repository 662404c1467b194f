"""The checkpoint's tokenizer and how texts become ids: the fast tokenizer (HF ``tokenizers`` underneath) where the
files allow one and it encodes exactly as the slow one, texts encoded in batches (:class:`Encoder`)."""

from __future__ import annotations

from pathlib import Path

from paddle_scorer.errors import CheckpointError
from paddle_scorer.model import libraries


def encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class Encoder:
    """Token ids of texts, one or many at a time. A fast tokenizer (HF ``tokenizers`` underneath: PaddleNLP's
    ``...Fast`` classes, PaddleFormers' tokenizers) encodes a batch in one call of its Rust backend, without the Python
    wrapper around every text (PaddleNLP's ``__call__`` inspects its own signature per call); the loader checked its
    ids against the slow tokenizer's (:func:`paddle_scorer.model.loader.load_tokenizer`). Any other tokenizer is called
    text by text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.backend = getattr(tokenizer, "_tokenizer", None)
        if self.backend is not None and not hasattr(self.backend, "encode_batch"):
            self.backend = None

    def one(self, text: str, special: bool) -> list[int]:
        return self.many([text], special)[0]

    def many(self, texts: list[str], special: bool) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=special)]
        return [encode(self.tok, t, special) for t in texts]


# Texts the fast tokenizer must encode exactly as the slow one before it is used: words, digits, spaces and line
# breaks in runs, accents, CJK, emoji, and (added at check time) every special token inside text.
TOKENIZER_CHECKS = (
    "Query: what is the price of cabbage today?\nIs this query about goods or life? Answer: goods",
    "  leading, trailing  and  double  spaces  ", "tabs\tand\nnew\n\nlines\r\n", "12 345.678 -9 3e10 0x1F",
    "naïve café déjà vu ¿Qué? Straße", "中文的句子，还有标点。", "emoji 🙂👍 mixed中文English", "a" * 64, "",
)


def _auto(lib, folder: Path, **kw):
    try:
        return lib.module("transformers").AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as exc:  # the libraries raise many types here
        detail = " ".join(str(exc).split())[:300]  # one line: library messages carry newlines
        raise CheckpointError(f"the tokenizer in {folder} could not be loaded ({type(exc).__name__}: {detail}).") from exc


def tokenizers_differ(slow, fast, texts) -> str | None:
    """Where ``fast`` encodes otherwise than ``slow`` (the first difference, as a phrase), or None."""
    for what in ("chat_template", "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(slow, what, None) != getattr(fast, what, None):
            return f"its {what} differs"
    if len(slow) != len(fast):
        return f"it has {len(fast)} tokens, the slow one {len(slow)}"
    specials = [f"x{t}y {t}" for t in getattr(slow, "all_special_tokens", [])]
    texts = list(texts) + specials
    for special in (True, False):
        got = Encoder(fast).many(texts, special)
        for text, ids in zip(texts, got):
            if ids != encode(slow, text, special):
                return f"it encodes {text[:40]!r} otherwise"
    return None


def load_tokenizer(plan):
    """The checkpoint's tokenizer, fast where its files allow one: PaddleNLP's AutoTokenizer gives its Python
    classes (437 us a prompt on the demo) unless ``use_fast``; the fast one (HF ``tokenizers``, identical ids, batches
    in one call) is used only when it encodes the check texts (:data:`TOKENIZER_CHECKS`, every special token) exactly
    as the slow one, and the run checks its first prompts again (:func:`check_first_prompts`). A difference keeps
    the slow one, said in a note."""
    lib = plan.model.library if not plan.model.library.native else libraries.tokenizer_library()
    folder = plan.tokenizer_dir
    tok = _auto(lib, folder)
    tok.paddle_scorer_slow = None
    tok.paddle_scorer_note = None
    if getattr(tok, "_tokenizer", None) is None:  # a Python tokenizer: is there a fast one that agrees?
        try:
            fast = _auto(lib, folder, use_fast=True)
        except CheckpointError:
            fast = None
        if fast is not None and getattr(fast, "_tokenizer", None) is not None:
            why = tokenizers_differ(tok, fast, TOKENIZER_CHECKS)
            if why is None:
                fast.paddle_scorer_slow, fast.paddle_scorer_note = tok, None
                tok = fast
            else:
                tok.paddle_scorer_note = (f"the fast tokenizer ({type(fast).__name__}) is not used: {why} than the "
                                          f"slow one ({type(tok).__name__})")
    vocab = plan.model.info.config.get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        raise CheckpointError(
            f"the tokenizer in {folder} has {len(tok)} tokens but the model's vocab_size is {vocab}; "
            "they do not belong together: pass the matching --tokenizer."
        )
    return tok


def check_first_prompts(loaded, texts: list[str]) -> str | None:
    """The run's own prompts through the fast tokenizer and the slow one it replaced: on a difference the slow one
    is used from here on (``loaded.tokenizer`` replaced) and the note saying so is returned (recorded too)."""
    tok = loaded.tokenizer
    slow = getattr(tok, "paddle_scorer_slow", None)
    if slow is None or not texts:
        return None
    why = tokenizers_differ(slow, tok, texts)
    if why is None:
        return None
    note = f"the fast tokenizer ({type(tok).__name__}) is not used: on this run's prompts {why} than the slow one"
    slow.paddle_scorer_slow, slow.paddle_scorer_note = None, note
    loaded.tokenizer = slow
    loaded.facts.tokenizer = tokenizer_facts(slow)
    loaded.facts.notes.append(note)
    return note


def tokenizer_facts(tok) -> dict:
    slow = getattr(tok, "paddle_scorer_slow", None)
    return {"class": type(tok).__name__, "fast": getattr(tok, "_tokenizer", None) is not None,
            "checked_against": type(slow).__name__ if slow is not None else None,
            "note": getattr(tok, "paddle_scorer_note", None)}
