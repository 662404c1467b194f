"""The tokenizer as the server uses it: one lock, classify's encoding rule, and text per token.

* Text prompts are encoded with :func:`paddle_scorer.tasks.prompts.encode` and ``special=True``, the rule
  ``classify`` uses for prompts without a chat template; chat messages go through the tokenizer's
  chat template and are encoded with ``special=False`` (the template writes its own special tokens),
  as ``classify --chat-template`` does. Token-id prompts never pass through here.
* :class:`TextStream` gives each token of a sequence its piece of text, decoded *in context* (the
  way vLLM and HF's streamers do): a character split over several byte-level tokens belongs to the
  token that completes it, and SentencePiece's leading spaces survive. ``"".join(pieces)`` is the
  text, so ``text_offset`` can be the running sum of the pieces' lengths.
* Tokenizers are not documented as thread-safe; the engine thread (stop strings) and the request
  handlers share one, so every call takes :attr:`Codec.lock`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from paddle_scorer.tasks.prompts import encode, has_chat_template

# Tokens of context a piece is decoded with (vLLM uses 5): enough for SentencePiece's leading space
# and for a 4-byte UTF-8 character split over byte tokens.
CONTEXT = 5
REPLACEMENT = "\ufffd"


class Codec:
    def __init__(self, tokenizer, vocab_size: int, tokenizer_path: str | None = None, eos_ids=()):
        self.tok = tokenizer
        self.lock = threading.RLock()
        self.vocab = min(int(vocab_size), len(tokenizer))  # valid token ids: [0, vocab)
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.template_source = _template_source(tokenizer, tokenizer_path)
        self._strs: dict[int, str] = {}

    # ------------------------------------------------------------------ text -> ids

    def encode(self, text: str, special: bool = True) -> list[int]:
        with self.lock:
            return encode(self.tok, text, special)

    @property
    def has_chat(self) -> bool:
        return has_chat_template(self.tok)

    def apply_chat(self, messages: list[dict]) -> str:
        """The prompt text for chat ``messages`` (``add_generation_prompt``: the assistant speaks next)."""
        with self.lock:
            template = self.tok.chat_template
            if hasattr(template, "render"):  # a jinja template (tokenizer_config.json's chat_template)
                return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # PaddleNLP's own chat_template.json format takes [[user, assistant], ..., [user]]
            return self.tok.apply_chat_template(_as_rounds(messages), tokenize=False)

    # ------------------------------------------------------------------ ids -> text

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens written out (what the model saw)."""
        with self.lock:
            try:
                return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            except (IndexError, KeyError, TypeError, ValueError):  # ids the tokenizer cannot decode
                return "".join(self.token_str(i) for i in ids)

    def token_str(self, token: int) -> str:
        """One token's text on its own (top-logprobs keys, special tokens)."""
        token = int(token)
        s = self._strs.get(token)
        if s is None:
            with self.lock:
                try:
                    s = self.tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                except (IndexError, KeyError, TypeError, ValueError):
                    s = f"<token {token}>"
            self._strs[token] = s
        return s

    def token_strs(self, ids) -> list[str]:
        return [self.token_str(i) for i in ids]

    def eos_token(self) -> str | None:
        return getattr(self.tok, "eos_token", None)


class TextStream:
    """Text pieces of a growing token sequence (see the module docstring).

    ``context``: tokens before the sequence (e.g. the prompt's tail before generated tokens); they
    shape how the first pieces decode but are not part of :attr:`text`.
    """

    def __init__(self, codec: Codec, context: list[int] = ()):
        self.codec = codec
        self.ids = list(context)[-CONTEXT:]
        self.prefix = 0  # decode window start
        self.read = len(self.ids)  # ids before this have their text in self.text
        self.pieces: list[str] = []
        self.text = ""
        self._pending: list[int] = []  # indices into pieces still waiting for their text

    def push(self, token: int) -> None:
        self.ids.append(int(token))
        self.pieces.append("")
        self._pending.append(len(self.pieces) - 1)
        done = self.codec.decode(self.ids[self.prefix:self.read])
        new = self.codec.decode(self.ids[self.prefix:])
        if len(new) > len(done) and not new.endswith(REPLACEMENT):
            self._emit(new[len(done):])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self) -> None:
        """End of sequence: tokens still waiting (an incomplete character) get what they decode to."""
        if self._pending:
            done = self.codec.decode(self.ids[self.prefix:self.read])
            new = self.codec.decode(self.ids[self.prefix:])
            self._emit(new[len(done):])

    def _emit(self, piece: str) -> None:
        # All of it goes to the token that completed it; earlier waiting tokens keep "".
        self.pieces[self._pending[-1]] = piece
        self.text += piece
        self._pending = []

    def offsets(self, start: int = 0) -> list[int]:
        out, pos = [], start
        for p in self.pieces:
            out.append(pos)
            pos += len(p)
        return out


def _as_rounds(messages: list[dict]) -> list[list[str]]:
    from paddle_scorer.serve.protocol import ProtocolError

    rounds, turn = [], []
    for m in messages:
        if m["role"] == "system":
            raise ProtocolError("this tokenizer's chat template (PaddleNLP chat_template.json) has its own system "
                                "prompt; send user/assistant messages only.", "messages")
        want = "user" if len(turn) == 0 else "assistant"
        if m["role"] != want:
            raise ProtocolError(f"messages must alternate user/assistant for this chat template; got {m['role']!r} "
                                f"where {want!r} was expected.", "messages")
        turn.append(m["content"])
        if len(turn) == 2:
            rounds.append(turn)
            turn = []
    if len(turn) != 1:
        raise ProtocolError("the last message must come from the user.", "messages")
    rounds.append(turn)
    return rounds


def _template_source(tokenizer, tokenizer_path: str | None) -> str | None:
    """The chat template as jinja text (for /tokenizer_info), when the tokenizer has one."""
    if not has_chat_template(tokenizer):
        return None
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    if tokenizer_path:
        try:
            cfg = json.loads((Path(tokenizer_path) / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        src = cfg.get("chat_template")
        if isinstance(src, str):
            return src
    return None  # PaddleNLP's chat_template.json format: usable here, not expressible as jinja
