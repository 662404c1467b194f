"""Rotary tables: read from the model's own rotary module (every variant and its float32 rounding), per call for
dynamic ones; positions past a bounded table are refused with one sentence."""

from __future__ import annotations

import numpy as np

from paddle_scorer.errors import UsageError


class ContextLimit(UsageError):
    """A position past the model's rotary table (PaddleNLP's Llama tables stop at max_position_embeddings)."""

    def __init__(self, position: int, limit: int):
        self.position, self.limit = position, limit
        super().__init__(
            f"a prompt needs position {position}, but this model's rotary table ends at {limit} positions "
            f"(max_position_embeddings): nothing can be computed past it, --force-max-length included; use "
            f"--max-length {limit} (or less), with --truncate left to cut long prompts from the start."
        )


class LongRopeLimit(UsageError):
    """A position past LongRoPE's original context, where transformers switches every position to the long factors."""

    def __init__(self, position: int, limit: int):
        self.position, self.limit = position, limit
        super().__init__(
            f"a prompt needs position {position}, but past {limit} positions (original_max_position_embeddings) this "
            "model's LongRoPE switches every position to its long factors, which paddle-scorer does not compute yet: "
            f"use --max-length {limit} (or less), with --truncate left to cut long prompts from the start."
        )


def rotary_is_dynamic(library: str, module) -> bool:
    """A rotary module whose frequencies depend on the length of the call (dynamic NTK scaling: PaddleNLP's
    ``LlamaDynamicNTKScalingRotaryEmbedding``; PaddleFormers' ``rope_type`` dynamic or longrope)."""
    if library == "paddlenlp":
        return "DynamicNTK" in type(module).__name__
    return getattr(module, "rope_type", "default") in ("dynamic", "longrope")


class Rope:
    """cos/sin rows ``[N, head_dim]`` for position ids, read from the model's rotary module (its table or its
    per-position formula).

    A static module's table is kept and grown. A dynamic one (:func:`rotary_is_dynamic`) rescales every frequency
    for the length of the call once that passes the trained context, so its rows are asked for per call, with the
    length the library's forward would give it: PaddleNLP's ``kv_seq_len`` (cached + padded new tokens), or
    PaddleFormers' largest position id + 1. A longer table would rotate every position differently (round 4 of the
    hostile tests: 0.165 off in log-prob); so results depend on how the work is split into calls, as in the
    library, and prefix reuse is off for such models (:attr:`dynamic`)."""

    def __init__(self, library: str, module):
        self.library = library
        self.module = module
        self.dynamic = rotary_is_dynamic(library, module)
        self.cos = np.zeros((0, 0), np.float32)
        self.sin = np.zeros((0, 0), np.float32)
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None

    def _table(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The module's rows for positions ``0..n-1`` (asked as the library asks: a length, or position ids)."""
        from paddle_scorer.compute.gemm import to_numpy
        from paddle_scorer.process.environment import paddle

        pd = paddle()
        x = pd.zeros([1], dtype="float32")
        with pd.no_grad():
            if self.library == "paddlenlp":
                cos, sin = self.module(x, seq_len=n)
            else:
                cos, sin = self.module(x, pd.arange(n, dtype="int64").unsqueeze(0))
        cos = to_numpy(cos.astype("float32").cpu()).reshape(-1, cos.shape[-1]).copy()
        sin = to_numpy(sin.astype("float32").cpu()).reshape(-1, sin.shape[-1]).copy()
        return cos, sin

    def _extend(self, n: int) -> None:
        self.cos, self.sin = self._table(n)

    def __call__(self, positions: np.ndarray, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows for ``positions`` (the real tokens'). ``span``: the call's length as a dynamic module sees it
        (:meth:`span`); without it, the largest position + 1."""
        top = int(positions.max()) + 1 if positions.size else 1
        if self.dynamic:
            n = max(top, span or 0)
            if self._last is None or self._last[0] != n:
                self._last = (n, *self._table(n))
            _, cos, sin = self._last
        else:
            if top > self.cos.shape[0]:
                self._extend(max(top, 2 * self.cos.shape[0], 64))
            cos, sin = self.cos, self.sin
        if top > cos.shape[0]:  # PaddleNLP's table stops at max_position_embeddings
            raise ContextLimit(top - 1, cos.shape[0])
        return cos[positions], sin[positions]

    def span(self, positions: np.ndarray, past: int = 0) -> int:
        """The call's length for a dynamic module, from the call's whole ``[B, T]`` position ids (padding slots
        included, as the library gets them) and the cached tokens: PaddleNLP ``past + T``, PaddleFormers
        ``max(position ids) + 1``."""
        positions = np.asarray(positions)
        if self.library == "paddlenlp":
            return past + (positions.shape[-1] if positions.ndim else 1)
        return int(positions.max()) + 1 if positions.size else 1


def find_rotary(body):
    """The rotary-embedding module of a decoder body (PaddleFormers: the body's; PaddleNLP: layer 0's attention)."""
    mod = getattr(body, "rotary_emb", None)
    if mod is None and hasattr(body, "layers") and len(body.layers):
        mod = getattr(body.layers[0].self_attn, "rotary_emb", None)
    return mod


class NativeRope:
    """cos/sin rows for a model with no library rotary module (the families of
    :mod:`paddle_scorer.model.families`), computed as HF transformers does in float32: ``inv_freq = 1 / theta^(2i/d)``
    (linear scaling divides it by the factor; YaRN blends the interpolated and extrapolated frequencies over its ramp
    and scales cos/sin by its attention factor), ``angle = position * inv_freq``, rows ``[freqs, freqs]``. Any position
    can be computed; the table grows as needed. Not dynamic: prefix reuse applies."""

    dynamic = False

    def __init__(self, spec):
        self.spec = spec
        self.inv_freq, self.factor = native_inv_freq(spec)
        self.cos = np.zeros((0, spec.dim), np.float32)
        self.sin = np.zeros((0, spec.dim), np.float32)

    def __call__(self, positions: np.ndarray, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        top = int(positions.max()) + 1 if positions.size else 1
        if self.spec.type == "longrope" and top > self.spec.original_max and \
                self.spec.long_factor != self.spec.short_factor:
            raise LongRopeLimit(top - 1, self.spec.original_max)
        if top > self.cos.shape[0]:
            n = max(top, 2 * self.cos.shape[0], 64)
            ang = np.arange(n, dtype=np.float32)[:, None] * self.inv_freq[None, :]
            emb = np.concatenate([ang, ang], axis=-1)
            self.cos = (np.cos(emb) * np.float32(self.factor)).astype(np.float32)
            self.sin = (np.sin(emb) * np.float32(self.factor)).astype(np.float32)
        return self.cos[positions], self.sin[positions]

    def span(self, positions: np.ndarray, past: int = 0) -> int:
        positions = np.asarray(positions)
        return int(positions.max()) + 1 if positions.size else 1


def _llama3(inv: np.ndarray, spec) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling, as transformers computes it in float32: long wavelengths divided by
    the factor, short ones kept, the band between blended smoothly."""
    factor, low, high = np.float32(spec.factor), np.float32(spec.low_freq_factor), np.float32(spec.high_freq_factor)
    old = np.float32(spec.original_max)
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (np.float32(2 * np.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((np.float32(1) - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def native_inv_freq(spec) -> tuple[np.ndarray, float]:
    """``(inv_freq [d/2] float32, attention factor)`` of a :class:`~paddle_scorer.model.families.RopeSpec`."""
    import math

    d, base = spec.dim, np.float32(spec.theta)
    exps = (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)).astype(np.float32)
    pos_freqs = np.power(base, exps, dtype=np.float32)
    inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if spec.type == "default":
        return inv, 1.0
    if spec.type == "linear":
        return (inv / np.float32(spec.factor)).astype(np.float32), 1.0
    if spec.type == "llama3":
        return _llama3(inv, spec), 1.0
    if spec.type == "longrope":
        ext = np.asarray(spec.short_factor, dtype=np.float32)
        return (np.float32(1.0) / (ext * pos_freqs)).astype(np.float32), float(spec.attention_factor)
    factor, orig = spec.factor, spec.original_max

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    att = spec.attention_factor
    if att is None:
        att = mscale(factor, spec.mscale) / mscale(factor, spec.mscale_all_dim) \
            if (spec.mscale and spec.mscale_all_dim) else mscale(factor)

    def corr(n):
        return (d * math.log(orig / (n * 2 * math.pi))) / (2 * math.log(spec.theta))

    low, high = corr(spec.beta_fast), corr(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolate = (np.float32(1) - ramp).astype(np.float32)
    inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (inter * (np.float32(1) - extrapolate) + inv * extrapolate).astype(np.float32), float(att)


class DualRope:
    """Two native tables side by side, ``[global | local]`` in each row (Gemma 3: full-attention layers rotate with
    ``rope_theta`` and its scaling, sliding ones with ``rope_local_base_freq``); the forward gives each layer its half
    (:attr:`dual`). Everything that passes rows along (prefix reuse, the KV cache, streaming) does so unchanged."""

    dynamic = False
    dual = True

    def __init__(self, spec, local_spec):
        self.parts = (NativeRope(spec), NativeRope(local_spec))

    def __call__(self, positions: np.ndarray, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        (cg, sg), (cl, sl) = (r(positions, span) for r in self.parts)
        return np.concatenate([cg, cl], axis=-1), np.concatenate([sg, sl], axis=-1)

    def span(self, positions: np.ndarray, past: int = 0) -> int:
        return self.parts[0].span(positions, past)


def native_rope(fc):
    """The rotary tables of a family model (:mod:`paddle_scorer.model.families`)."""
    if fc.local_rope is not None:
        return DualRope(fc.rope, fc.local_rope)
    return NativeRope(fc.rope)
