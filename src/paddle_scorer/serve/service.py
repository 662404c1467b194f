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

Streaming (``stream: true``) sends OpenAI's chunks as server-sent events: a chunk per batch of tokens whose
text is final (a stop string could not still cut it), each with its log-probs, then the finish reason, the
usage when ``stream_options.include_usage``, and ``data: [DONE]``; the chunks add up to the non-streamed answer
for the same seed. ``n > 1`` gives independent samples (sample ``j`` of a seeded request draws from its own
stream, seeded by ``(seed, j)``; sample 0 equals ``n: 1``).

Several models can be served on one base (``--lora NAME=PATH``): the request's ``model`` picks one; the engine
never mixes two of them in one forward.

Nothing that takes time runs on the event loop: tokenization and building (and encoding) answers go to a
worker thread, so ``/health`` and other requests keep answering; a request whose client goes away is
cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from paddle_scorer import __version__
from paddle_scorer.serve import protocol as proto
from paddle_scorer.serve.codec import Codec, TextStream
from paddle_scorer.serve.engine import Cancelled, Engine, GenSpec, Outcome, Work
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
    prefix_cache_bytes: int | None = None
    adapters: dict = field(default_factory=dict)  # served name -> adapter folder (several adapters on one base)

    def to_dict(self) -> dict:
        return asdict(self)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Service:
    """``backend``: the served model's backend, or ``backends``: ``{name: backend}`` (the base under
    ``options.model_name`` and one per adapter). ``defaults``: per name, its ``scorer.json`` (template, labels)."""

    def __init__(self, loaded, backend, options: ServeOptions, backends: dict | None = None,
                 defaults: dict | None = None):
        self.loaded = loaded
        self.options = options
        self.name = options.model_name
        self.backends = backends or {self.name: backend}
        self.defaults = defaults or {}
        cfg = loaded.config
        vocab = int(getattr(cfg, "vocab_size", None) or len(loaded.tokenizer))
        eos = loaded.eos_ids
        self.codec = Codec(loaded.tokenizer, vocab, loaded.facts.tokenizer_path, eos)
        context = int(getattr(cfg, "max_position_embeddings", None) or getattr(loaded.tokenizer, "model_max_length", 2048))
        self.limits = proto.Limits(context=context, vocab=self.codec.vocab, max_tokens=options.max_tokens,
                                   max_logprobs=options.max_logprobs, max_prompts=options.max_prompts)
        self.engine = Engine(self.backends, self.codec, eos, max_batch=options.max_batch,
                             window=options.window_ms / 1000)
        # One thread for everything that uses the tokenizer or builds big answers: off the event loop, and the
        # tokenizer is never used by two request threads at once.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paddle-scorer-io")
        self.created = int(time.time())
        self.started = time.time()

    # ------------------------------------------------------------------ plumbing

    def resolve(self, model: str | None) -> str:
        """The served name a request's ``model`` picks (none given: the first)."""
        if model is None:
            return self.name
        if model not in self.backends:
            raise ProtocolError(f"the model {model!r} is not served here; this server serves "
                                f"{', '.join(repr(n) for n in self.backends)} (GET /v1/models).", "model", status=404,
                                code="model_not_found")
        return model

    async def off(self, fn, *args):
        """``fn(*args)`` in the worker thread (tokenization, building answers)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def wait(self, fut: Future, request=None):
        """The engine's answer; the job is cancelled when the client disconnects first."""
        waiting = asyncio.wrap_future(fut)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                return waiting.result()
            if request is not None and await request.is_disconnected():
                self.engine.cancel(fut)
                raise ClientGone()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ completions

    def _completion_work(self, body: dict):
        req = proto.parse_completion(body, self.limits)
        name = self.resolve(req.model)
        prompts = []
        for i, p in enumerate(req.prompts):
            where = "the prompt" if len(req.prompts) == 1 else f"prompt {i}"
            ids = p if isinstance(p, list) else self.codec.encode(p, special=True)
            if not ids:
                raise ProtocolError(f"{where} is empty after tokenization; give some text.", "prompt")
            proto.check_fits(len(ids), req.max_tokens, self.limits, where, "prompt")
            prompts.append(ids)
        score_top = req.logprobs if (req.echo and req.logprobs is not None) else None
        works = []
        for ids in prompts:
            for j in range(req.n):
                gen = GenSpec(req.max_tokens, req.sampling, tuple(req.stop), req.logprobs or 0) if req.max_tokens else None
                works.append(Work(ids, score_top if j == 0 else None, gen, adapter=name, sample=j))
        return req, name, prompts, works

    async def completions(self, body: dict, request=None):
        req, name, prompts, works = await self.off(self._completion_work, body)
        if req.stream:
            return self._stream(req, name, prompts, works, chat=False)
        needed = any(w.score_top is not None or w.gen is not None for w in works)
        outcomes = await self.wait(self.engine.submit(works), request) if needed else [Outcome(None, None)] * len(works)
        return await self.off(self._completion_answer, req, name, prompts, outcomes)

    def _completion_answer(self, req, name, prompts, outcomes) -> bytes:
        n = req.n
        choices = []
        for c, out in enumerate(outcomes):
            i = c // n
            scored = outcomes[i * n].scored
            choices.append(self._completion_choice(c, prompts[i], Outcome(scored, out.generation), req))
        body = proto.completion_response(name, choices, sum(map(len, prompts)), _generated(outcomes),
                                         _cached(outcomes, n))
        return _json(body)

    def _echo(self, ids: list[int], scored, logprobs: bool) -> tuple[str, list, list, list, list]:
        stream = TextStream(self.codec)
        for t in ids:
            stream.push(t)
        stream.finish()
        tokens, values, tops, offsets = [], [], [], []
        if logprobs:
            tokens += stream.pieces
            offsets += stream.offsets()
            values.append(None)
            tops.append(None)
            for j in range(1, len(ids)):
                v = _finite(scored.token_logprobs[j])
                values.append(v)
                tops.append(proto.top_dict(self.codec.token_strs(scored.top_ids[j - 1]),
                                           map(_finite, scored.top_logprobs[j - 1]), self.codec.token_str(ids[j]), v))
        return stream.text, tokens, values, tops, offsets

    def _gen_logprobs(self, g, start: int, end: int, base: int) -> tuple[list, list, list, list]:
        """Tokens ``start:end`` of a generation: their text, log-probs, top entries and offsets (from ``base``)."""
        tokens, values, tops, offsets = [], [], [], []
        for t, txt, off, v, top_ids, top_lps in zip(g.ids[start:end], g.token_text[start:end], g.offsets[start:end],
                                                      g.logprobs[start:end], g.top_ids[start:end],
                                                      g.top_logprobs[start:end]):
            v = _finite(v)
            tokens.append(txt)
            offsets.append(base + off)
            values.append(v)
            tops.append(proto.top_dict(self.codec.token_strs(top_ids), map(_finite, top_lps), self.codec.token_str(t), v))
        return tokens, values, tops, offsets

    def _completion_choice(self, index: int, ids: list[int], out: Outcome, req) -> dict:
        text, tokens, values, tops, offsets = "", [], [], [], []
        if req.echo:
            text, tokens, values, tops, offsets = self._echo(ids, out.scored, req.logprobs is not None)
        g = out.generation
        if g is not None:
            base = len(text)
            text += g.text
            if req.logprobs is not None:
                t, v, tp, o = self._gen_logprobs(g, 0, len(g.ids), base)
                tokens, values, tops, offsets = tokens + t, values + v, tops + tp, offsets + o
        logprobs = None
        if req.logprobs is not None:
            logprobs = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": g.finish_reason if g is not None else "length"}

    # ------------------------------------------------------------------ chat

    def _chat_work(self, body: dict):
        req = proto.parse_chat(body, self.limits)
        name = self.resolve(req.model)
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
        works = [Work(ids, None, GenSpec(max_tokens, req.sampling, tuple(req.stop), top), adapter=name, sample=j)
                 for j in range(req.n)]
        return req, name, [ids], works

    async def chat(self, body: dict, request=None):
        req, name, prompts, works = await self.off(self._chat_work, body)
        if req.stream:
            return self._stream(req, name, prompts, works, chat=True)
        outcomes = await self.wait(self.engine.submit(works), request)
        return await self.off(self._chat_answer, req, name, prompts, outcomes)

    def _chat_entries(self, g, start: int, end: int) -> list[dict]:
        return [proto.chat_logprob_entry(text_, _finite(v), list(zip(self.codec.token_strs(ti), map(_finite, tv))))
                for text_, v, ti, tv in zip(g.token_text[start:end], g.logprobs[start:end], g.top_ids[start:end],
                                            g.top_logprobs[start:end])]

    def _chat_answer(self, req, name, prompts, outcomes) -> bytes:
        choices = []
        for j, out in enumerate(outcomes):
            g = out.generation
            logprobs = {"content": self._chat_entries(g, 0, len(g.ids))} if req.logprobs else None
            choices.append({"index": j, "message": {"role": "assistant", "content": g.text}, "logprobs": logprobs,
                            "finish_reason": g.finish_reason})
        return _json(proto.chat_response(name, choices, len(prompts[0]), _generated(outcomes), _cached(outcomes, req.n)))

    # ------------------------------------------------------------------ streaming

    def _stream(self, req, name: str, prompts: list, works: list[Work], chat: bool):
        """The server-sent events of a streamed completion or chat completion (an async iterator of bytes)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sent = [0] * len(works)  # generated tokens already sent, per choice (engine thread: only it writes)

        def watch(c: int):
            def on_event(kind, payload):  # in the engine thread
                if kind == "scored":
                    loop.call_soon_threadsafe(events.put_nowait, ("scored", c, payload))
                    return
                n = payload.settled()
                if n > sent[c]:
                    g = payload.result() if payload.done else payload.partial()
                    start, sent[c] = sent[c], n
                    loop.call_soon_threadsafe(events.put_nowait, ("tokens", c, (g, start, n)))
            return on_event

        for c, w in enumerate(works):
            w.on_token = watch(c)
        return self._events(req, name, prompts, works, chat, events, loop)

    async def _events(self, req, name, prompts, works, chat, events, loop):
        """The chunks of a streamed request, as the engine reports its progress (``events``: ``("scored", c, scored)``
        and ``("tokens", c, (generation, start, end))``); after the 200, a failure is an error event, then
        ``[DONE]``. The engine's work is cancelled when the client leaves."""
        st = _Stream(self, req, name, prompts, chat, len(works))
        fut = self.engine.submit(works)
        done = asyncio.wrap_future(fut)
        try:
            for b in st.opening():
                yield b
            while True:
                for kind, c, payload in await _next_events(events, done):
                    if kind == "scored" and not chat:
                        for b in await self.off(st.echo_chunks, c // st.n, payload):
                            yield b
                    elif kind == "tokens":
                        yield await self.off(st.token_chunk, c, *payload)
                if done.done() and events.empty():
                    break
            for b in await self.off(st.final_chunks, done.result()):
                yield b
        except Exception as exc:  # after the 200 a failure can only be an event of the stream
            yield proto.sse(_stream_error(exc))
        finally:
            if not fut.done():
                self.engine.cancel(fut)
        yield proto.sse("[DONE]")

    # ------------------------------------------------------------------ classify

    def _classify_work(self, body: dict):
        from paddle_scorer.errors import ScorerError
        from paddle_scorer.tasks.classify import DEFAULT_CONTENT_FREE, Classifier, ClassifyOptions

        req = proto.parse_classify(body, self.limits)
        name = self.resolve(req.model)
        defaults = self.defaults.get(name) or {}
        template = req.template if req.template is not None else defaults.get("template")
        prefix = req.label_prefix if req.label_prefix is not None else defaults.get("label_prefix", " ")
        opts = ClassifyOptions(labels=req.labels, template=template, label_prefix=prefix,
                               chat_template=req.chat_template, length_norm=req.length_norm,
                               calibration=req.calibration,
                               content_free=req.content_free if req.content_free is not None else list(DEFAULT_CONTENT_FREE),
                               pmi_domain=req.pmi_domain)
        try:
            clf = Classifier(self.loaded, opts, score=False)
            preps = [clf.prepare(r, r.get("id", i), f"record {i}") for i, r in enumerate(req.records)]
            cal = clf.calibration_preps()
        except ScorerError as exc:
            raise ProtocolError(str(exc).replace("--", ""), "records") from None
        works = [Work(p.context, labels=p.label_ids, adapter=name, group=0) for p in cal]
        works += [Work(p.context, labels=p.label_ids, adapter=name, group=1) for p in preps]
        return clf, preps, cal, works, name

    async def classify(self, body: dict, request=None):
        clf, preps, cal, works, name = await self.off(self._classify_work, body)
        outcomes = await self.wait(self.engine.submit(works), request)
        return await self.off(self._classify_answer, clf, preps, cal, outcomes, name)

    def _classify_answer(self, clf, preps, cal, outcomes, name) -> bytes:
        from paddle_scorer.errors import ScoringError

        info = clf.set_calibration([(None, o.labels) for o in outcomes[:len(cal)]])
        try:
            records = [clf.record(p, o.labels) for p, o in zip(preps, outcomes[len(cal):], strict=True)]
        except ScoringError as exc:
            raise FloatingPointError(str(exc)) from None
        for r in records:
            r["prompt"] = self.codec.decode(r["prompt_token_ids"])
        n_prompt = sum(len(p.context) for p in preps)
        return _json({"id": proto.new_id("clf"), "object": "classification", "created": int(time.time()),
                      "model": name, "labels": list(clf.opts.labels), "calibration": info, "data": records,
                      "usage": proto.usage_with_cache(n_prompt, 0, sum(o.cached for o in outcomes))})

    # ------------------------------------------------------------------ tokenizer endpoints

    def _tokenize(self, body: dict) -> bytes:
        text, special = proto.parse_tokenize(body)
        ids = self.codec.encode(text, special=special)
        return _json({"tokens": ids, "count": len(ids), "max_model_len": self.limits.context})

    async def tokenize(self, body: dict) -> bytes:
        return await self.off(self._tokenize, body)

    def _detokenize(self, body: dict) -> bytes:
        return _json({"prompt": self.codec.decode(proto.parse_detokenize(body, self.limits))})

    async def detokenize(self, body: dict) -> bytes:
        return await self.off(self._detokenize, body)

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
        return {"object": "list", "data": [self.model_card(n) for n in self.backends]}

    def model_card(self, name: str | None = None) -> dict:
        from paddle_scorer.process.environment import versions

        name = name or self.name
        card = {
            "id": name, "object": "model", "created": self.created, "owned_by": "paddle-scorer",
            "max_model_len": self.limits.context, "root": self.name,
            "paddle_scorer": {"tool": f"paddle-scorer {__version__}", "model": self.loaded.facts.to_dict(),
                              "versions": versions(), "serve": self.options.to_dict(),
                              "limits": asdict(self.limits)},
        }
        if name in self.options.adapters:
            card["paddle_scorer"]["adapter"] = str(self.options.adapters[name])
        backend = self.backends[name]
        if hasattr(backend, "reuse_stats"):
            card["paddle_scorer"]["prefix_reuse"] = backend.reuse_stats()
        return card

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "models": list(self.backends), "device": self.loaded.device,
                "dtype": self.loaded.dtype, "uptime_s": round(time.time() - self.started, 1),
                "batched_decode": self.engine.batched_decode, "engine": dict(self.engine.stats)}


def _generated(outcomes) -> int:
    return sum(o.generation.generated for o in outcomes if o.generation)


def _cached(outcomes, n: int) -> int:
    """Prompt tokens supplied by prefixes computed before this request (per prompt, counted once)."""
    return sum(max(o.cached for o in outcomes[i:i + n]) for i in range(0, len(outcomes), n))


def _json(body: dict) -> bytes:
    """The answer as JSON bytes. A list of choices (or records) is encoded item by item: ``json.dumps`` holds the
    GIL for a whole call, and one call over a 27 MB echo answer stalled every other thread (the event loop
    included) for half a second."""
    dumps = lambda x: json.dumps(x, ensure_ascii=False, allow_nan=False)  # noqa: E731
    for key in ("choices", "data", "tokens"):
        items = body.get(key)
        if isinstance(items, list) and len(items) > 1:
            rest = dumps({k: v for k, v in body.items() if k != key})
            step = 1 if key != "tokens" else 4096
            parts = [dumps(items[i:i + step])[1:-1] for i in range(0, len(items), step)]
            head = rest[:-1] + (", " if len(rest) > 2 else "")
            return (head + f'"{key}": [' + ", ".join(parts) + "]}").encode("utf-8")
    return dumps(body).encode("utf-8")


def _finite(v) -> float:
    v = float(v)
    if not math.isfinite(v):
        raise FloatingPointError("the model produced a non-finite log-probability (NaN or inf); no answer was sent. "
                                 "Check the weights with `paddle-scorer smoke`.")
    return v


async def _next_events(events: asyncio.Queue, done) -> list:
    """The events waiting now (at least one unless the work is done)."""
    getter = asyncio.ensure_future(events.get())
    ready, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
    items = []
    if getter in ready:
        items.append(getter.result())
    else:
        getter.cancel()
    while not events.empty():
        items.append(events.get_nowait())
    return items


def _stream_error(exc: Exception) -> dict:
    """The error event of a streamed request: the request's own error, a non-finite result, the client gone, or a
    bug (logged with its traceback; the server keeps serving)."""
    if isinstance(exc, ProtocolError):
        return exc.body()
    if isinstance(exc, FloatingPointError):
        return proto.error_body(str(exc), "server_error")
    if not isinstance(exc, Cancelled):
        import logging

        logging.getLogger("paddle_scorer.serve").error("a streamed request failed", exc_info=exc)
    return proto.error_body(f"internal error ({type(exc).__name__}); the server logged it and keeps serving.",
                            "server_error")


class _Stream:
    """One streamed request's chunks: what each choice has been sent so far (text, echo, tokens), so the chunks add up
    to the plain answer."""

    def __init__(self, service: "Service", req, name: str, prompts, chat: bool, choices: int):
        self.svc, self.req, self.name, self.prompts, self.chat = service, req, name, prompts, chat
        self.n = req.n
        self.rid = proto.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.text_sent = [0] * choices  # characters of each choice's generated text sent
        self.tokens_sent = [0] * choices  # tokens of each choice's generation sent
        self.echoed = [False] * choices

    def chunk(self, choices, usage=None) -> bytes:
        body = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return proto.sse(body)

    def opening(self) -> list[bytes]:
        if not self.chat:
            return []
        return [self.chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for c in range(len(self.echoed))]

    def echo_chunks(self, i: int, scored) -> list[bytes]:
        out = []
        want = self.req.logprobs is not None
        for c in range(i * self.n, i * self.n + self.n):
            text, tokens, values, tops, offsets = self.svc._echo(self.prompts[i], scored, want)
            self.echoed[c] = True
            lp = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets} if want \
                else None
            out.append(self.chunk([{"index": c, "text": text, "logprobs": lp, "finish_reason": None}]))
        return out

    def token_chunk(self, c: int, g, start: int, end: int) -> bytes:
        base = sum(len(x) for x in g.token_text[:start])
        text = "".join(g.token_text[start:end])
        piece = g.text[self.text_sent[c]:base + len(text)] if end < len(g.ids) else g.text[self.text_sent[c]:]
        self.text_sent[c] += len(piece)
        self.tokens_sent[c] = end
        if self.chat:
            lp = {"content": self.svc._chat_entries(g, start, end)} if self.req.logprobs else None
            return self.chunk([{"index": c, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}])
        lp = None
        if self.req.logprobs is not None:
            echo_len = len(self.svc.codec.decode(self.prompts[c // self.n])) if self.req.echo else 0
            t, v, tp, o = self.svc._gen_logprobs(g, start, end, echo_len)
            lp = {"tokens": t, "token_logprobs": v, "top_logprobs": tp, "text_offset": o}
        return self.chunk([{"index": c, "text": piece, "logprobs": lp, "finish_reason": None}])

    def final_chunks(self, outcomes) -> list[bytes]:
        out, n = [], self.n
        for c, o in enumerate(outcomes):
            g = o.generation
            if not self.chat and self.req.echo and not self.echoed[c]:
                out += self.echo_chunks(c // n, outcomes[(c // n) * n].scored)[c % n:c % n + 1]
            if g is not None and (self.tokens_sent[c] < len(g.ids) or self.text_sent[c] < len(g.text)):
                out.append(self.token_chunk(c, g, self.tokens_sent[c], len(g.ids)))
            reason = g.finish_reason if g is not None else "length"
            delta = {"delta": {}} if self.chat else {"text": ""}
            out.append(self.chunk([{"index": c, **delta, "logprobs": None, "finish_reason": reason}]))
        if self.req.include_usage:
            out.append(self.chunk([], proto.usage_with_cache(sum(map(len, self.prompts)), _generated(outcomes),
                                                             _cached(outcomes, n))))
        return out
