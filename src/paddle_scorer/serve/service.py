"""A request in, a response out: validation (protocol), tokens (codec), compute (engine).

Completions, as lm-evaluation-harness reads them:

* text prompts are encoded with special tokens (``classify``'s rule without a chat template); token-id
  prompts are used exactly as given (no BOS added);
* with ``echo`` and ``logprobs``, ``token_logprobs``/``top_logprobs``/``tokens``/``text_offset``
  cover the prompt **and** the generated tokens (lm-eval reads ``token_logprobs[ctxlen:-1]`` after
  ``max_tokens: 1``); the first prompt token's entries are ``null``; ``max_tokens: 0`` returns the
  prompt's entries only;
* every log-prob is a float32 value from one log-softmax, and a token's ``top_logprobs`` entry is the
  same float as its ``token_logprobs`` entry (lm-eval's ``is_greedy`` compares them with ``==``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from paddle_scorer import __version__
from paddle_scorer.serve import protocol as proto
from paddle_scorer.serve.codec import Codec, TextStream
from paddle_scorer.serve.engine import Engine, GenSpec, Outcome, Work
from paddle_scorer.serve.protocol import ProtocolError


@dataclass
class ServeOptions:
    model_name: str
    max_batch: int = 32
    window_ms: float = 2.0
    max_tokens: int = 2048
    max_logprobs: int = 20
    max_prompts: int = 1024
    max_body_bytes: int = 8 * 2**20

    def to_dict(self) -> dict:
        return asdict(self)


class Service:
    def __init__(self, loaded, backend, options: ServeOptions):
        self.loaded = loaded
        self.options = options
        self.name = options.model_name
        cfg = loaded.config
        vocab = int(getattr(cfg, "vocab_size", None) or len(loaded.tokenizer))
        eos = loaded.eos_ids
        self.codec = Codec(loaded.tokenizer, vocab, loaded.facts.tokenizer_path, eos)
        context = int(getattr(cfg, "max_position_embeddings", None) or getattr(loaded.tokenizer, "model_max_length", 2048))
        self.limits = proto.Limits(context=context, vocab=self.codec.vocab, max_tokens=options.max_tokens,
                                   max_logprobs=options.max_logprobs, max_prompts=options.max_prompts)
        self.engine = Engine(backend, self.codec, eos, max_batch=options.max_batch, window=options.window_ms / 1000)
        self.created = int(time.time())
        self.started = time.time()

    # ------------------------------------------------------------------ completions

    async def completions(self, body: dict) -> dict:
        req = proto.parse_completion(body, self.limits)
        proto.check_model(req.model, self.name)
        prompts = []
        for i, p in enumerate(req.prompts):
            where = "the prompt" if len(req.prompts) == 1 else f"prompt {i}"
            ids = p if isinstance(p, list) else self.codec.encode(p, special=True)
            if not ids:
                raise ProtocolError(f"{where} is empty after tokenization; give some text.", "prompt")
            proto.check_fits(len(ids), req.max_tokens, self.limits, where, "prompt")
            prompts.append(ids)
        score_top = req.logprobs if (req.echo and req.logprobs is not None) else None
        gen = None
        if req.max_tokens > 0:
            gen = GenSpec(req.max_tokens, req.sampling, tuple(req.stop), req.logprobs or 0)
        works = [Work(ids, score_top, gen) for ids in prompts]
        outcomes = await self.engine.run(works) if (score_top is not None or gen is not None) else [Outcome(None, None)] * len(works)
        choices = [self._completion_choice(i, ids, out, req) for i, (ids, out) in enumerate(zip(prompts, outcomes))]
        return proto.completion_response(self.name, choices, sum(map(len, prompts)),
                                         sum(o.generation.generated for o in outcomes if o.generation))

    def _completion_choice(self, index: int, ids: list[int], out: Outcome, req) -> dict:
        text = ""
        tokens, values, tops, offsets = [], [], [], []
        if req.echo:
            stream = TextStream(self.codec)
            for t in ids:
                stream.push(t)
            stream.finish()
            text = stream.text
            if req.logprobs is not None:
                s = out.scored
                tokens += stream.pieces
                offsets += stream.offsets()
                values.append(None)
                tops.append(None)
                for j in range(1, len(ids)):
                    v = _finite(s.token_logprobs[j])
                    values.append(v)
                    tops.append(proto.top_dict(self.codec.token_strs(s.top_ids[j - 1]), map(_finite, s.top_logprobs[j - 1]),
                                               self.codec.token_str(ids[j]), v))
        g = out.generation
        if g is not None:
            base = len(text)
            text += g.text
            if req.logprobs is not None:
                tokens += g.token_text
                offsets += [base + o for o in g.offsets]
                for t, v, top_ids, top_lps in zip(g.ids, g.logprobs, g.top_ids, g.top_logprobs):
                    v = _finite(v)
                    values.append(v)
                    tops.append(proto.top_dict(self.codec.token_strs(top_ids), map(_finite, top_lps),
                                               self.codec.token_str(t), v))
        logprobs = None
        if req.logprobs is not None:
            logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": g.finish_reason if g is not None else "length"}

    # ------------------------------------------------------------------ chat

    async def chat(self, body: dict) -> dict:
        req = proto.parse_chat(body, self.limits)
        proto.check_model(req.model, self.name)
        if not self.codec.has_chat:
            raise ProtocolError(
                "the model's tokenizer has no chat template, so chat messages cannot be turned into a prompt the "
                "way it was trained; use /v1/completions with your own prompt text, or serve a tokenizer that has "
                "a chat template (--tokenizer).", "messages", code="no_chat_template")
        try:
            text = self.codec.apply_chat(req.messages)
        except ProtocolError:
            raise
        except Exception as exc:  # jinja errors raised by the template itself (e.g. raise_exception)
            raise ProtocolError(f"the chat template refused these messages ({type(exc).__name__}: {exc}).",
                                "messages") from None
        ids = self.codec.encode(text, special=False)  # the template wrote the special tokens
        if not ids:
            raise ProtocolError("the messages are empty after the chat template and tokenization.", "messages")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.limits.max_tokens, self.limits.context - len(ids))
            if max_tokens < 1:
                proto.check_fits(len(ids), 1, self.limits, "the chat prompt", "messages")
        proto.check_fits(len(ids), max_tokens, self.limits, "the chat prompt", "messages")
        top = req.top_logprobs if req.logprobs else 0
        (out,) = await self.engine.run([Work(ids, None, GenSpec(max_tokens, req.sampling, tuple(req.stop), top))])
        g = out.generation
        logprobs = None
        if req.logprobs:
            logprobs = {"content": [
                proto.chat_logprob_entry(text_, _finite(v), list(zip(self.codec.token_strs(ti), map(_finite, tv))))
                for text_, v, ti, tv in zip(g.token_text, g.logprobs, g.top_ids, g.top_logprobs)]}
        choice = {"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": logprobs,
                  "finish_reason": g.finish_reason}
        return proto.chat_response(self.name, [choice], len(ids), g.generated)

    # ------------------------------------------------------------------ tokenizer endpoints

    def tokenize(self, body: dict) -> dict:
        text, special = proto.parse_tokenize(body)
        ids = self.codec.encode(text, special=special)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.limits.context}

    def detokenize(self, body: dict) -> dict:
        return {"prompt": self.codec.decode(proto.parse_detokenize(body, self.limits))}

    def tokenizer_info(self) -> dict:
        tok = self.loaded.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": getattr(tok, "eos_token", None),
            "bos_token": getattr(tok, "bos_token", None),
            "pad_token": getattr(tok, "pad_token", None),
            "unk_token": getattr(tok, "unk_token", None),
            "chat_template": self.codec.template_source,
            "model_max_length": self.limits.context,
            "vocab_size": self.limits.vocab,
            # what a text prompt gets from /v1/completions (classify's rule), vs /tokenize's flag
            "completions_text_prompts_add_special_tokens": True,
        }

    # ------------------------------------------------------------------ models, health

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        from paddle_scorer.runtime import versions

        return {
            "id": self.name, "object": "model", "created": self.created, "owned_by": "paddle-scorer",
            "max_model_len": self.limits.context,
            "paddle_scorer": {"tool": f"paddle-scorer {__version__}", "model": self.loaded.facts.to_dict(),
                              "versions": versions(), "serve": self.options.to_dict(),
                              "limits": asdict(self.limits)},
        }

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "device": self.loaded.device, "dtype": self.loaded.dtype,
                "uptime_s": round(time.time() - self.started, 1), "batched_decode": self.engine.batched_decode,
                "engine": dict(self.engine.stats)}


def _finite(v) -> float:
    v = float(v)
    if not math.isfinite(v):
        raise FloatingPointError("the model produced a non-finite log-probability (NaN or inf); no answer was sent. "
                                 "Check the weights with `paddle-scorer smoke`.")
    return v
