"""OpenAI request validation and response shapes, as pure functions (no model, no HTTP).

Every bad request becomes a :class:`ProtocolError`: a 4xx status and one sentence in OpenAI's error
shape ``{"error": {"message", "type", "param", "code"}}``. Fields are checked for type and range;
fields we do not implement (``best_of``, penalties, ``logit_bias``, ``suffix``) are refused when they ask for
something other than the default, rather than silently ignored, because the answer would not be what was
asked for. Every string of a request must be valid Unicode text (a lone surrogate such as ``"\ud800"`` is
refused, not passed to the tokenizer), and a body nested deeper than :data:`MAX_DEPTH` is refused. Field names we do not know are ignored (clients such as
lm-evaluation-harness pass extra generation settings through), and reported by :func:`unknown_fields`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from paddle_scorer.tasks.generate import MIN_TEMPERATURE  # below it logits / temperature overflow; 0 means greedy

COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "echo", "logprobs", "temperature", "top_p", "seed", "stop", "n", "best_of",
    "stream", "stream_options", "suffix", "logit_bias", "presence_penalty", "frequency_penalty", "user",
}
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "temperature", "top_p",
    "seed", "stop", "n", "stream", "stream_options", "logit_bias", "presence_penalty", "frequency_penalty", "user",
}
CLASSIFY_FIELDS = {"model", "labels", "prompt", "prompts", "records", "template", "calibration", "content_free",
                   "pmi_domain", "chat_template", "label_prefix", "length_norm", "user"}
MAX_DEPTH = 64  # nesting of a request body (a JSON request here is at most ~4 levels deep)
MAX_N = 16
ROLES = ("system", "user", "assistant")


class ProtocolError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-shaped body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    context: int  # the model's max positions: prompt + max_tokens must fit
    vocab: int  # token ids must be in [0, vocab)
    max_tokens: int = 2048  # cap on a request's max_tokens
    max_logprobs: int = 20  # cap on logprobs / top_logprobs
    max_prompts: int = 1024  # prompts in one completions request
    max_stop: int = 16  # stop strings in one request
    max_stop_chars: int = 1000  # length of one stop string
    max_labels: int = 1024  # labels of one /v1/classify request (their cost grows linearly: packing.label_rows)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class CompletionRequest:
    prompts: list  # each a str (text) or a list[int] (token ids, used as given)
    max_tokens: int
    echo: bool
    logprobs: int | None
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    model: str | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    messages: list[dict]  # [{"role", "content": str}]
    max_tokens: int | None  # None: up to the context (and the server's cap)
    logprobs: bool
    top_logprobs: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    model: str | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False


@dataclass
class ClassifyRequest:
    labels: list[str]
    records: list[dict]  # each filled into template (a prompt p is {"query": p})
    template: str | None
    calibration: str = "none"
    content_free: list[str] | None = None
    pmi_domain: str | None = None
    chat_template: bool | None = None
    label_prefix: str | None = None
    length_norm: str = "none"
    model: str | None = None


# ------------------------------------------------------------------------------------------ parsing


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (NaN/Infinity refused: they are not JSON)."""

    def no_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise ProtocolError("the request body is not UTF-8 text; send JSON.") from None
    except RecursionError:
        raise ProtocolError(f"the request body is nested too deeply (more than {MAX_DEPTH} levels); send a flat "
                            "JSON object.") from None
    except ValueError as exc:
        raise ProtocolError(f"the request body is not valid JSON ({exc}).") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, not {_kind(body)}.")
    _check_text(body, "", 0)
    return body


def _check_text(v, where: str, depth: int) -> None:
    """Every string is valid Unicode (no lone surrogate); the body is at most MAX_DEPTH levels deep."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"the request body is nested too deeply (more than {MAX_DEPTH} levels); send a flat JSON "
                            "object.")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = v[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
            raise ProtocolError(f"{where or 'a string'} contains {bad}, a lone surrogate that is not a Unicode "
                                "character; send valid text.", where.split("[")[0].split(".")[0] or None) from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_text(k, where or "a field name", depth + 1)
            _check_text(x, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_text(x, f"{where}[{i}]", depth + 1)


def unknown_fields(body: dict, known: set[str]) -> list[str]:
    return sorted(k for k in body if k not in known)


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    _unsupported(body, with_suffix=True)
    echo = _bool(body, "echo", False)
    max_tokens = _int(body, "max_tokens", 16, 0, limits.max_tokens)
    logprobs = _int(body, "logprobs", None, 0, limits.max_logprobs)
    stream, usage = _stream(body)
    n = _int(body, "n", 1, 1, MAX_N)
    if n > 1 and max_tokens == 0:
        raise ProtocolError("n > 1 needs max_tokens >= 1 (the samples are generated tokens).", "n")
    return CompletionRequest(
        prompts=_prompts(body, limits), max_tokens=max_tokens, echo=echo, logprobs=logprobs,
        sampling=_sampling(body), stop=_stop(body, limits), model=_model(body), n=n, stream=stream,
        include_usage=usage,
    )


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    _unsupported(body, with_suffix=False)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ProtocolError("give max_tokens or max_completion_tokens, not both.", "max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, None, 1, limits.max_tokens)  # None: what fits in the context
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, limits.max_logprobs)
    if top is not None and not logprobs:
        raise ProtocolError("top_logprobs needs logprobs: true.", "top_logprobs")
    stream, usage = _stream(body)
    return ChatRequest(
        messages=_messages(body), max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top or 0,
        sampling=_sampling(body), stop=_stop(body, limits), model=_model(body), n=_int(body, "n", 1, 1, MAX_N),
        stream=stream, include_usage=usage,
    )


CALIBRATIONS = ("none", "contextual", "pmi")
LENGTH_NORMS = ("none", "per-token")


def parse_classify(body: dict, limits: Limits) -> ClassifyRequest:
    """``/v1/classify``: labels and one of ``prompt`` (a string), ``prompts`` (strings) or ``records`` (objects
    filled into ``template``)."""
    labels = body.get("labels")
    if isinstance(labels, str):
        labels = [x.strip() for x in labels.split(",")]
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise ProtocolError("labels must be an array of at least two non-empty strings (or one comma-separated "
                            "string).", "labels")
    if len(set(labels)) != len(labels):
        raise ProtocolError("labels must be different from each other.", "labels")
    if len(labels) > limits.max_labels:
        raise ProtocolError(f"{len(labels)} labels in one request; at most {limits.max_labels} are allowed (split them "
                            "over several requests).", "labels")
    given = [k for k in ("prompt", "prompts", "records") if body.get(k) is not None]
    if len(given) != 1:
        raise ProtocolError("give exactly one of prompt (a string), prompts (an array of strings) or records (an "
                            "array of objects for template).", "prompt")
    template = body.get("template")
    if template is not None and not isinstance(template, str):
        raise ProtocolError(f"template must be a string, not {_kind(template)}.", "template")
    kind = given[0]
    v = body[kind]
    if kind == "prompt":
        if not isinstance(v, str) or not v:
            raise ProtocolError("prompt must be a non-empty string.", "prompt")
        records = [{"query": v}]
    elif kind == "prompts":
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise ProtocolError("prompts must be a non-empty array of non-empty strings.", "prompts")
        records = [{"query": x} for x in v]
    else:
        if not isinstance(v, list) or not v or not all(isinstance(x, dict) for x in v):
            raise ProtocolError("records must be a non-empty array of objects (their fields fill the template).",
                                "records")
        if template is None:
            raise ProtocolError("records need a template with {field} placeholders.", "template")
        records = list(v)
    if len(records) > limits.max_prompts:
        raise ProtocolError(f"{len(records)} prompts in one request; at most {limits.max_prompts} are allowed.", kind)
    calibration = body.get("calibration", "none") or "none"
    if calibration not in CALIBRATIONS:
        raise ProtocolError(f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}.",
                            "calibration")
    length_norm = body.get("length_norm", "none") or "none"
    if length_norm not in LENGTH_NORMS:
        raise ProtocolError(f"length_norm must be one of {', '.join(LENGTH_NORMS)}; got {length_norm!r}.",
                            "length_norm")
    content_free = body.get("content_free")
    if content_free is not None and (not isinstance(content_free, list) or not content_free
                                     or not all(isinstance(x, str) for x in content_free)):
        raise ProtocolError("content_free must be a non-empty array of strings (the content-free inputs contextual "
                            "calibration averages over).", "content_free")
    for name in ("pmi_domain", "label_prefix"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ProtocolError(f"{name} must be a string, not {_kind(body[name])}.", name)
    chat = body.get("chat_template")
    if chat is not None and not isinstance(chat, bool):
        raise ProtocolError(f"chat_template must be true or false, not {_kind(chat)}.", "chat_template")
    return ClassifyRequest(labels, records, template, calibration, content_free, body.get("pmi_domain"), chat,
                           body.get("label_prefix"), length_norm, _model(body))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise ProtocolError("stream_options needs stream: true.", "stream_options")
    if not isinstance(opts, dict):
        raise ProtocolError(f"stream_options must be an object, not {_kind(opts)}.", "stream_options")
    return stream, _bool(opts, "include_usage", False)


def parse_tokenize(body: dict) -> tuple[str, bool]:
    text = body.get("prompt")
    if not isinstance(text, str):
        raise ProtocolError(f"prompt must be a string, not {_kind(text)}.", "prompt")
    return text, _bool(body, "add_special_tokens", True)


def parse_detokenize(body: dict, limits: Limits) -> list[int]:
    return _token_ids(body.get("tokens"), "tokens", limits, allow_empty=True)


def check_fits(n_prompt: int, max_tokens: int, limits: Limits, where: str, param: str) -> None:
    if n_prompt + max_tokens > limits.context:
        raise ProtocolError(
            f"this model's maximum context length is {limits.context} tokens, but {where} has {n_prompt} tokens "
            f"and max_tokens is {max_tokens} ({n_prompt + max_tokens} in all); shorten the prompt or lower max_tokens.",
            param, code="context_length_exceeded",
        )


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ProtocolError(f"the model {requested!r} is not served here; this server serves {served!r} "
                            "(GET /v1/models), or leave model out.", "model", status=404, code="model_not_found")


# ------------------------------------------------------------------------------------------ fields


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ProtocolError(f"{name} must be true or false, not {_kind(v)}.", name)
    return v


def _int(body: dict, name: str, default, lo: int, hi: int | None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{name} must be an integer, not {_kind(v)}.", name)
    if v < lo or (hi is not None and v > hi):
        upper = f" and at most {hi}" if hi is not None else ""
        cap = " (this server's cap)" if hi is not None else ""
        raise ProtocolError(f"{name} must be at least {lo}{upper}{cap}; got {v}.", name)
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"{name} must be a number, not {_kind(v)}.", name)
    if not math.isfinite(v):
        raise ProtocolError(f"{name} must be a finite number; got {v} (a value beyond a float's range).", name)
    if v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise ProtocolError(f"{name} must be in {left}{lo:g}, {hi:g}]; got {v}.", name)
    return float(v)


def _model(body: dict) -> str | None:
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise ProtocolError(f"model must be a string, not {_kind(v)}.", "model")
    return v


def _sampling(body: dict) -> Sampling:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ProtocolError(f"seed must be an integer, not {_kind(seed)}.", "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise ProtocolError(f"seed must be between 0 and 2**63 - 1; got {seed}.", "seed")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ProtocolError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; got {temperature:g} "
                            "(dividing the logits by it would overflow).", "temperature")
    return Sampling(temperature, _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed)


def _stop(body: dict, limits: Limits) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ProtocolError(f"stop must be a string or an array of strings, not {_kind(v)}.", "stop")
    if len(stops) > limits.max_stop:
        raise ProtocolError(f"stop has {len(stops)} strings; at most {limits.max_stop} are allowed.", "stop")
    if any(not s for s in stops):
        raise ProtocolError("stop strings must not be empty.", "stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise ProtocolError(f"stop strings must be at most {limits.max_stop_chars} characters.", "stop")
    return list(dict.fromkeys(stops))


def _unsupported(body: dict, with_suffix: bool) -> None:
    """Settings we do not implement: refused unless they ask for the default."""
    v = body.get("best_of")
    if v is not None and v != 1:
        raise ProtocolError("best_of must be 1 (use n for several samples).", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and v != 0:
            raise ProtocolError(f"{name} is not supported (the outputs are the model's own probabilities); "
                                "leave it out or send 0.", name)
    if body.get("logit_bias") not in (None, {}):
        raise ProtocolError("logit_bias is not supported (the outputs are the model's own probabilities).",
                            "logit_bias")
    if with_suffix and body.get("suffix") not in (None, ""):
        raise ProtocolError("suffix (insertion) is not supported.", "suffix")


def _token_ids(v, param: str, limits: Limits, allow_empty: bool = False) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise ProtocolError(f"{param} must be an array of token ids (integers), not {_kind(v)}.", param)
    if not v and not allow_empty:
        raise ProtocolError(f"{param} is empty; give at least one token.", param)
    bad = [t for t in v if not 0 <= t < limits.vocab]
    if bad:
        raise ProtocolError(f"{param} holds token id {bad[0]}, outside this model's vocabulary [0, {limits.vocab}).",
                            param)
    return list(v)


def _prompts(body: dict, limits: Limits) -> list:
    if "prompt" not in body or body["prompt"] is None:
        raise ProtocolError("prompt is missing; give a string, an array of strings, an array of token ids or an "
                            "array of token-id arrays.", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list):
        if not p:
            raise ProtocolError("prompt is an empty array; give at least one prompt.", "prompt")
        if all(isinstance(x, str) for x in p):
            prompts = list(p)
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            prompts = [_token_ids(p, "prompt", limits)]
        elif all(isinstance(x, list) for x in p):
            prompts = [_token_ids(x, f"prompt[{i}]", limits) for i, x in enumerate(p)]
        else:
            raise ProtocolError("prompt mixes types; give a string, an array of strings, an array of token ids or "
                                "an array of token-id arrays.", "prompt")
    else:
        raise ProtocolError(f"prompt must be a string or an array, not {_kind(p)}.", "prompt")
    if len(prompts) > limits.max_prompts:
        raise ProtocolError(f"{len(prompts)} prompts in one request; at most {limits.max_prompts} are allowed.",
                            "prompt")
    for i, x in enumerate(prompts):
        if isinstance(x, str) and not x:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ProtocolError(f"{where} is an empty string; give some text.", "prompt")
    return prompts


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ProtocolError("messages must be a non-empty array of {role, content} objects.", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ProtocolError(f"messages[{i}] must be an object, not {_kind(m)}.", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise ProtocolError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}.", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ProtocolError(f"messages[{i}].content: only text parts are supported.", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ProtocolError(f"messages[{i}].content must be a string, not {_kind(content)}.", "messages")
        out.append({"role": role, "content": content})
    return out


# ------------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_with_cache(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    """OpenAI's usage, with ``prompt_tokens_details.cached_tokens``: prompt tokens a computed prefix supplied."""
    return {**usage(prompt_tokens, completion_tokens), "prompt_tokens_details": {"cached_tokens": int(cached)}}


def completion_response(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int,
                        cached: int = 0) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_with_cache(prompt_tokens, completion_tokens, cached)}


def chat_response(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_with_cache(prompt_tokens, completion_tokens, cached)}


def sse(data) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    return b"data: " + (data.encode() if isinstance(data, str) else json.dumps(data, ensure_ascii=False).encode()) + b"\n\n"


def top_dict(keys: list[str], values, chosen_key: str | None = None, chosen_value: float | None = None) -> dict:
    """``{token text: logprob}``: the top entries, then the chosen token if it is not among them.

    Two token ids can share a text; the first (more likely) keeps the key. Values are the floats
    given (the same float32 numbers as ``token_logprobs``: lm-eval's ``is_greedy`` compares them
    for equality).
    """
    d: dict[str, float] = {}
    for k, v in zip(keys, values):
        d.setdefault(k, float(v))
    if chosen_key is not None and chosen_key not in d:
        d[chosen_key] = float(chosen_value)
    return d


def chat_logprob_entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    return {"token": token, "logprob": float(logprob), "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": float(v), "bytes": list(t.encode("utf-8"))} for t, v in top]}
