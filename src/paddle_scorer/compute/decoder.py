"""The decoder's float32 CPU forward, written out: RMSNorm, rotary embeddings, attention over packed (tree-masked)
batches with an optional KV cache, SwiGLU MLP, LoRA; the matrix products on the kernel :mod:`paddle_scorer.compute.gemm`
chose. The math of PaddleNLP's Llama / Qwen2 and PaddleFormers' Llama / ERNIE 4.5 (dense), as those libraries
compute it in eval mode (read in their sources and checked against their forward: the tests hold every
reference to 1e-5), without their eager overheads: measured on a ~58M Llama, a packed batch of 800 tokens took
1.23 s through PaddleNLP's forward and 0.38 s here, RMSNorm's ``pow`` alone was 15 % of it there
(benchmarks/RESULTS.md, the profile).

What the libraries own stays theirs: the rotary tables come from the model's own rotary module (every RoPE
variant and its float32 rounding), the weights are the model's own parameters (zero-copy views) or the
streamed executor's arrays. An architecture or setting this forward does not implement is reported by
:func:`spec_for` with the reason, and the library's own forward runs instead.

Per architecture (``ArchSpec``): the rotation layout (Llama's halves, ERNIE's interleaved pairs), where
``1/sqrt(head_dim)`` is applied (PaddleNLP Llama multiplies q, Qwen2 divides q, PaddleFormers scales the
scores), the LM head's layout, fused ``qkv_proj`` (columns grouped per KV head: ``[q_g..., k_g, v_g]``) and
``up_gate_proj`` (``[gate | up]``), PaddleFormers Llama's zero embedding of ``pad_token_id``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from paddle_scorer.compute import config_support
from paddle_scorer.errors import UsageError
from paddle_scorer.compute.gemm import Kernel, Mat

MASKED = np.finfo(np.float32).min  # what the libraries add at masked positions (not -inf: no NaN rows)
ATTENTION_ROWS = 512  # query rows per attention block: scores stay ~heads x 512 x keys floats
PARALLEL_ELEMENTS = 1 << 17  # element-wise work this big is split over the compute threads


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor | None:
    """Threads for element-wise numpy work (numpy releases the GIL in its loops): as many as the process's
    compute threads (OMP_NUM_THREADS, divided between launcher workers by :mod:`paddle_scorer.process.environment`).
    SiLU over a [797, 5504] activation: 19.8 ms on one thread, 8.7 ms on two."""
    from paddle_scorer.process.environment import usable_cores

    n = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(n) if n.isdigit() and int(n) > 0 else usable_cores()
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="paddle-scorer-ew") if threads > 1 else None


def parallel_rows(fn, n: int, elements: int) -> None:
    """``fn(slice)`` over the rows ``0..n``, split between the compute threads when the work is big enough."""
    pool = _pool()
    if pool is None or n < 2 or elements < PARALLEL_ELEMENTS:
        fn(slice(0, n))
        return
    parts = min(pool._max_workers, n)
    step = -(-n // parts)
    list(pool.map(fn, [slice(i, min(n, i + step)) for i in range(0, n, step)]))


@dataclass(frozen=True)
class ArchSpec:
    library: str
    architecture: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rotation: str  # "half" | "interleaved"
    qk_scale: str  # "multiply-q" | "divide-q" | "scores"
    head_out_in: bool  # the LM head weight is [vocab, hidden]: logits = h @ W.T
    prefix: str  # the decoder body's name prefix ("llama", "qwen2", "model")
    zero_embedding_id: int | None = None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def spec_for(library: str, architecture: str, prefix: str, config) -> tuple[ArchSpec | None, str | None]:
    """The spec of a model this forward computes exactly, or ``(None, why not)``."""
    get = lambda k, d=None: getattr(config, k, d)  # noqa: E731
    known = {("paddlenlp", "LlamaForCausalLM"), ("paddlenlp", "Qwen2ForCausalLM"),
             ("paddleformers", "LlamaForCausalLM"), ("paddleformers", "Ernie4_5ForCausalLM")}
    if (library, architecture) not in known:
        return None, f"{architecture} ({library}) has no CPU fast path"
    why = config_support.unsupported(config)
    if why:
        return None, why
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv = int(get("num_key_value_heads", None) or heads)
    if library == "paddleformers":
        head_dim = int(get("head_dim", None) or hidden // heads)
    else:
        head_dim = hidden // heads
    if heads % kv:
        return None, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
    scale = {"LlamaForCausalLM": "multiply-q", "Qwen2ForCausalLM": "divide-q"}[architecture] \
        if library == "paddlenlp" else "scores"
    zero = None
    if library == "paddleformers" and architecture == "LlamaForCausalLM":
        pad = get("pad_token_id", None)
        zero = int(pad) if isinstance(pad, int) and not isinstance(pad, bool) else None
    return ArchSpec(
        library=library, architecture=architecture, hidden=hidden, heads=heads, kv_heads=kv, head_dim=head_dim,
        eps=float(get("rms_norm_eps", 1e-6)), rotation="interleaved" if architecture == "Ernie4_5ForCausalLM" else "half",
        qk_scale=scale, head_out_in=library == "paddleformers", prefix=prefix, zero_embedding_id=zero,
    ), None


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


@dataclass
class Linear:
    w: Mat  # [in, out] (Paddle's layout)
    b: np.ndarray | None = None
    lora: tuple[Mat, Mat] | None = None  # (A [in, r], B * scaling [r, out]): y += (x @ A) @ (B * scaling)

    def set_lora(self, a, b, scaling: float) -> None:
        """Attach a LoRA pair; the scaling is folded into a copy of B once (B is rank x out: small), so the
        forward adds one product instead of scaling a whole activation."""
        b = _as_mat(b)
        if scaling != 1.0:
            b = Mat(b.np * np.float32(scaling))
        self.lora = (_as_mat(a), b)


@dataclass
class Layer:
    ln1: np.ndarray
    ln2: np.ndarray
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    qkv: Linear | None = None  # fused, columns grouped per KV head
    o: Linear | None = None
    gate: Linear | None = None
    up: Linear | None = None
    gate_up: Linear | None = None  # fused [gate | up]
    down: Linear | None = None


@dataclass
class Outside:
    embed: np.ndarray  # [vocab, hidden]
    norm: np.ndarray  # [hidden]
    head: Mat  # [hidden, vocab], or [vocab, hidden] when spec.head_out_in or tied
    head_transposed: bool
    head_bias: np.ndarray | None = None


_LINEARS = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "self_attn.qkv_proj": "qkv", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "mlp.up_gate_proj": "gate_up", "mlp.gate_up_fused_proj": "gate_up",
}
_NORMS = {"input_layernorm.weight": "ln1", "post_attention_layernorm.weight": "ln2"}


class UnsupportedWeights(ValueError):
    """A tensor this forward has no place for: the library's forward is used instead."""


def _as_mat(a) -> Mat:
    return a if isinstance(a, Mat) else Mat(np.asarray(a))


def _vec(a) -> np.ndarray:
    return a.np if isinstance(a, Mat) else np.asarray(a)


def make_layer(tensors: dict, lora: dict | None = None, scaling: float = 1.0) -> Layer:
    """A decoder layer from its tensors named by suffix (``self_attn.q_proj.weight``, ...: numpy arrays or
    :class:`Mat`) and, optionally, LoRA pairs ``{module suffix: (A, B)}`` with their scaling."""
    parts: dict[str, dict[str, object]] = {}
    norms = {}
    for name, value in tensors.items():
        if name in _NORMS:
            norms[_NORMS[name]] = _vec(value)
            continue
        module, _, kind = name.rpartition(".")
        role = _LINEARS.get(module)
        if role is None or kind not in ("weight", "bias", "lora_A", "lora_B"):
            raise UnsupportedWeights(f"the layer tensor {name!r}")
        parts.setdefault(role, {})[kind] = value
    for module, (a, b) in (lora or {}).items():
        role = _LINEARS.get(module)
        if role is None:
            raise UnsupportedWeights(f"a LoRA pair on {module!r}")
        parts.setdefault(role, {}).update(lora_A=a, lora_B=b)
    if set(norms) != {"ln1", "ln2"}:
        raise UnsupportedWeights("a layer without input_layernorm and post_attention_layernorm")
    layer = Layer(norms["ln1"], norms["ln2"])
    for role, p in parts.items():
        if "weight" not in p:
            raise UnsupportedWeights(f"{role} without a weight")
        lin = Linear(_as_mat(p["weight"]), _vec(p["bias"]) if "bias" in p else None)
        if "lora_A" in p or "lora_B" in p:
            if not ("lora_A" in p and "lora_B" in p):
                raise UnsupportedWeights(f"{role}: half a LoRA pair")
            lin.set_lora(p["lora_A"], p["lora_B"], scaling)
        setattr(layer, role, lin)
    attn_ok = layer.qkv is not None or all(getattr(layer, r) is not None for r in "qkv")
    mlp_ok = layer.gate_up is not None or (layer.gate is not None and layer.up is not None)
    if not (attn_ok and layer.o is not None and mlp_ok and layer.down is not None):
        raise UnsupportedWeights("a layer without q/k/v/o and gate/up/down projections")
    return layer


# --------------------------------------------------------------------------------------------------
# Rotary tables from the library's own module
# --------------------------------------------------------------------------------------------------


class ContextLimit(UsageError):
    """A position past the model's rotary table (PaddleNLP's Llama tables stop at max_position_embeddings)."""

    def __init__(self, position: int, limit: int):
        self.position, self.limit = position, limit
        super().__init__(
            f"a prompt needs position {position}, but this model's rotary table ends at {limit} positions "
            f"(max_position_embeddings): nothing can be computed past it, --force-max-length included; use "
            f"--max-length {limit} (or less), with --truncate left to cut long prompts from the start."
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


# --------------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """The layout of one call's new tokens: ``B`` rows of ``T`` slots, of which the real tokens are the flat slots
    ``index`` (``b * T + t``, in order; ``None``: every slot is real). Hidden states, positions and the GEMMs hold
    only the real tokens: padding costs no matrix work (a length-sorted batch of 24 demo prompts on 1008 slots
    held 797 tokens). Attention sees:

    * ``keep[b, i, j]``: new token ``i`` sees new token ``j`` (causal / tree / padding), ``[B, T, T]`` bool;
    * ``past_keep [B, S]``: which slots of a per-row KV cache are real.

    The additive mask and the key range each block of queries needs are computed once per call, for every layer.
    """

    B: int
    T: int
    keep: np.ndarray
    index: np.ndarray | None = None
    past_keep: np.ndarray | None = None
    _bias: np.ndarray | None = field(default=None, repr=False)
    _blocks: list | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray, T: int, past: int = 0, lengths=None) -> "Batch":
        keep, past_keep = keep_from_mask(np.asarray(mask), T, past)
        B = keep.shape[0]
        if lengths is None:
            lengths = real_lengths(np.asarray(mask), T)
        lengths = np.asarray(lengths, dtype=np.int64)
        index = None
        if (lengths < T).any():
            index = np.concatenate([b * T + np.arange(n) for b, n in enumerate(lengths)])
        return cls(B, T, keep, index, past_keep)

    @property
    def size(self) -> int:
        return self.B * self.T if self.index is None else len(self.index)

    def pick(self, a: np.ndarray) -> np.ndarray:
        """The real tokens' entries of a ``[B, T, ...]`` array, as ``[N, ...]``."""
        flat = a.reshape(self.B * self.T, *a.shape[2:])
        return flat if self.index is None else flat[self.index]

    def spread(self, a: np.ndarray) -> np.ndarray:
        """``[N, ...]`` real-token rows back into ``[B, T, ...]`` slots (padding zero)."""
        if self.index is None:
            return a.reshape(self.B, self.T, *a.shape[1:])
        out = np.zeros((self.B * self.T, *a.shape[1:]), dtype=a.dtype)
        out[self.index] = a
        return out.reshape(self.B, self.T, *a.shape[1:])

    def bias(self) -> np.ndarray:
        """``[B, T, S + T]`` float32: 0 where a query sees a key, the libraries' masked value elsewhere."""
        if self._bias is None:
            keep = self.keep
            if self.past_keep is not None:
                keep = np.concatenate([np.broadcast_to(self.past_keep[:, None, :], (self.B, self.T, self.past_keep.shape[1])),
                                       keep], axis=2)
            self._bias = np.where(keep, np.float32(0.0), MASKED).astype(np.float32)
        return self._bias

    def blocks(self, rows: int) -> list[tuple[int, int, int]]:
        """Query blocks ``(t0, t1, key_end)``: keys past ``key_end`` are masked for every query of the block
        (causal masks need only the keys up to the block's last query)."""
        if self._blocks is None or self._blocks[0] != rows:
            bias = self.bias()
            seen = (bias > MASKED).any(axis=0)  # [T, K]
            out = []
            for t0 in range(0, self.T, rows):
                t1 = min(self.T, t0 + rows)
                cols = np.flatnonzero(seen[t0:t1].any(axis=0))
                out.append((t0, t1, int(cols[-1]) + 1 if cols.size else 1))
            self._blocks = (rows, out)
        return self._blocks[1]


def real_lengths(mask: np.ndarray, T: int) -> np.ndarray:
    """Real tokens per row (rows are right-padded). A 2-D mask marks them; in a 4-D tree mask every real token
    sees the row's first token, and a padding slot sees only itself."""
    if mask.ndim == 4:
        col0 = mask[:, 0, :, 0].astype(bool)
        return np.maximum(col0.sum(axis=1), 1)
    return mask.astype(bool)[:, -T:].sum(axis=1)


@dataclass
class KV:
    """Per-layer keys and values ``[B, kv_heads, S, head_dim]`` (after RoPE) and which slots are real."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    keep: np.ndarray | None = None  # [B, S]
    prefix: object = None  # a prefixes.Prefix every row continues (not copied per row)

    @property
    def length(self) -> int:
        return 0 if self.keep is None else self.keep.shape[1]

    def rows(self, index) -> "KV":
        idx = np.asarray(index, dtype=np.int64)
        return KV([k[idx] for k in self.keys], [v[idx] for v in self.values], None if self.keep is None else self.keep[idx],
                  self.prefix)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * w``; the mean of squares accumulated in float64 (more exact than the
    libraries' float32 reduction, at the cost of one pass over ``x``)."""
    out = np.empty_like(x)

    def rows(sl):
        var = np.einsum("ij,ij->i", x[sl], x[sl], dtype=np.float64) / x.shape[1]
        scale = (1.0 / np.sqrt(var + eps)).astype(np.float32)
        np.multiply(x[sl], scale[:, None], out=out[sl])
        out[sl] *= w

    parallel_rows(rows, x.shape[0], x.size)
    return out


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    """x ``[N, heads, d]``; cos/sin ``[N, d]`` as the library builds them (``[freqs, freqs]``)."""
    d = x.shape[-1]
    h = d // 2
    if layout != "half":  # ERNIE: pairs (2j, 2j+1) rotate by freq j
        cos = np.repeat(cos[:, :h], 2, axis=-1)
        sin = np.repeat(sin[:, :h], 2, axis=-1)
    out = np.empty(x.shape, dtype=np.float32)

    def rows(sl):
        xs, c, s = x[sl], cos[sl, None, :], sin[sl, None, :]
        rot = np.empty_like(xs)
        if layout == "half":
            np.negative(xs[..., h:], out=rot[..., :h])
            rot[..., h:] = xs[..., :h]
        else:
            np.negative(xs[..., 1::2], out=rot[..., 0::2])
            rot[..., 1::2] = xs[..., 0::2]
        np.multiply(xs, c, out=out[sl])
        rot *= s
        out[sl] += rot

    parallel_rows(rows, x.shape[0], x.size)
    return out


def _silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` as ``gate / (1 + exp(-gate)) * up``, in place on ``gate``."""

    def rows(sl):
        g = gate[sl]
        t = np.negative(g)
        np.exp(t, out=t)
        t += np.float32(1.0)
        np.divide(g, t, out=g)
        g *= up[sl]

    parallel_rows(rows, gate.shape[0], gate.size)
    return gate


class Forward:
    """One model's decoder math on a kernel. Stateless between calls; every array is float32."""

    def __init__(self, spec: ArchSpec, kernel: Kernel, rope: Rope):
        self.spec = spec
        self.k = kernel
        self.rope = rope

    # ---------------------------------------------------------------- pieces

    def linear(self, lin: Linear, x: np.ndarray) -> np.ndarray:
        y = self.k.mm(x, lin.w)
        if lin.b is not None:
            y += lin.b
        if lin.lora is not None:
            a, b = lin.lora
            y += self.k.mm(self.k.mm(x, a), b)
        return y

    def embed(self, out: Outside, ids: np.ndarray) -> np.ndarray:
        flat = ids.reshape(-1)
        h = out.embed[flat].astype(np.float32, copy=True)
        if self.spec.zero_embedding_id is not None:
            h[flat == self.spec.zero_embedding_id] = 0.0
        return h

    def logprobs(self, out: Outside, rows: np.ndarray, normed: bool = False) -> np.ndarray:
        """Final norm (unless ``normed``) + LM head + float32 log-softmax on hidden rows ``[N, H]``."""
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits are refused by the caller, by record
            x = rows if normed else rms_norm(np.ascontiguousarray(rows, dtype=np.float32), out.norm, self.spec.eps)
            logits = self.k.mm(np.ascontiguousarray(x), out.head, trans_w=out.head_transposed)
            if out.head_bias is not None:
                logits += out.head_bias
            m = logits.max(axis=-1, keepdims=True)
            z = logits - m
            lse = np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float32))
            z -= lse
        return z

    def _qkv(self, layer: Layer, x: np.ndarray):
        sp = self.spec
        n, d = x.shape[0], sp.head_dim
        if layer.qkv is not None:
            y = self.linear(layer.qkv, x).reshape(n, sp.kv_heads, sp.group + 2, d)
            q = y[:, :, : sp.group].reshape(n, sp.heads, d)
            return q, y[:, :, sp.group], y[:, :, sp.group + 1]
        q = self.linear(layer.q, x).reshape(n, sp.heads, d)
        k = self.linear(layer.k, x).reshape(n, sp.kv_heads, d)
        v = self.linear(layer.v, x).reshape(n, sp.kv_heads, d)
        return q, k, v

    def _mlp(self, layer: Layer, x: np.ndarray) -> np.ndarray:
        if layer.gate_up is not None:
            gu = self.linear(layer.gate_up, x)
            inter = gu.shape[1] // 2
            act = _silu_mul(np.ascontiguousarray(gu[:, :inter]), gu[:, inter:])
        else:
            act = _silu_mul(self.linear(layer.gate, x), self.linear(layer.up, x))
        return self.linear(layer.down, act)

    # ---------------------------------------------------------------- attention

    def attention(self, q, k, v, batch: Batch, past_k=None, past_v=None, prefix=None) -> np.ndarray:
        """q ``[N, heads, d]``, k/v ``[N, kv, d]`` of the new (real) tokens; ``past_k/v [B, kv, S, d]`` (per row);
        ``prefix``: ``(K, V) [kv, P, d]`` of a prefix every row continues (seen by every query, computed once, never
        copied per row: its scores are one product over all rows). Returns ``[N, heads*d]``."""
        sp = self.spec
        B, T = batch.B, batch.T
        G, d, kv = sp.group, sp.head_dim, sp.kv_heads
        q4, k4, v4 = batch.spread(q), batch.spread(k), batch.spread(v)
        # [B, kv, G, T, d]: the query heads of one KV head side by side (head h uses KV head h // G)
        qh = q4.reshape(B, T, kv, G, d).transpose(0, 2, 3, 1, 4)
        if sp.qk_scale == "multiply-q":
            qh = qh * np.float32(1.0 / np.sqrt(d))
        elif sp.qk_scale == "divide-q":
            qh = qh / np.float32(np.sqrt(d))
        keys, vals = k4.transpose(0, 2, 1, 3), v4.transpose(0, 2, 1, 3)  # [B, kv, T, d]
        if past_k is not None and past_k.shape[2]:
            keys = np.concatenate([past_k, keys], axis=2)
            vals = np.concatenate([past_v, vals], axis=2)
        kt = np.ascontiguousarray(keys.transpose(0, 1, 3, 2))  # [B, kv, d, S+T]
        vals = np.ascontiguousarray(vals)
        if prefix is not None:
            pk_t = np.ascontiguousarray(prefix[0].transpose(0, 2, 1))  # [kv, d, P]
            pv = np.ascontiguousarray(prefix[1])  # [kv, P, d]
        bias = batch.bias()  # [B, T, S+T]
        out = np.empty((B, kv, G, T, d), dtype=np.float32)
        rows = max(1, ATTENTION_ROWS // G)
        scale = np.float32(d ** -0.5) if sp.qk_scale == "scores" else None
        for t0, t1, end in batch.blocks(rows):
            n = t1 - t0
            qb = np.ascontiguousarray(qh[:, :, :, t0:t1]).reshape(B, kv, G * n, d)
            s = self.k.bmm(qb, np.ascontiguousarray(kt[..., :end])).reshape(B, kv, G, n, end)
            total = np.empty((B, kv, G, n, 1), dtype=np.float32)
            sp_ = None
            if prefix is not None:  # [kv, B*G*n, P]: every row's queries against the one prefix
                qp = np.ascontiguousarray(qb.transpose(1, 0, 2, 3)).reshape(kv, B * G * n, d)
                sp_ = self.k.bmm(qp, pk_t).reshape(kv, B, G, n, -1)

            def softmax_rows(sl, s=s, sp_=sp_, t0=t0, end=end, total=total):  # unnormalised: the output is divided
                part = s[:, :, :, sl]
                if scale is not None:
                    part *= scale
                part += bias[:, None, None, t0 + sl.start:t0 + sl.stop, :end]
                top = part.max(axis=-1, keepdims=True)
                if sp_ is not None:
                    pre = sp_[:, :, :, sl]
                    if scale is not None:
                        pre *= scale
                    top = np.maximum(top, pre.max(axis=-1, keepdims=True).transpose(1, 0, 2, 3, 4))
                    pre -= top.transpose(1, 0, 2, 3, 4)
                    np.exp(pre, out=pre)
                part -= top
                np.exp(part, out=part)
                np.sum(part, axis=-1, keepdims=True, out=total[:, :, :, sl])
                if sp_ is not None:
                    total[:, :, :, sl] += pre.sum(axis=-1, keepdims=True).transpose(1, 0, 2, 3, 4)

            parallel_rows(softmax_rows, n, s.size + (sp_.size if sp_ is not None else 0))
            o = self.k.bmm(s.reshape(B, kv, G * n, end), vals[:, :, :end]).reshape(B, kv, G, n, d)
            if sp_ is not None:
                op = self.k.bmm(sp_.reshape(kv, B * G * n, -1), pv).reshape(kv, B, G, n, d)
                o += op.transpose(1, 0, 2, 3, 4)
            o /= total
            out[:, :, :, t0:t1] = o
        # [B, kv, G, T, d] -> [B, T, heads, d] -> the real tokens [N, heads*d]
        o4 = out.transpose(0, 3, 1, 2, 4).reshape(B, T, sp.heads * d)
        return np.ascontiguousarray(batch.pick(o4))

    # ---------------------------------------------------------------- a layer

    def layer(self, layer: Layer, h: np.ndarray, batch: Batch, cos: np.ndarray, sin: np.ndarray,
              past: tuple[np.ndarray, np.ndarray] | None = None, keep_kv: bool = False,
              prefix: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, tuple | None]:
        """One decoder layer on the real tokens' hidden states ``h [N, H]`` (updated in place and returned); with
        ``keep_kv`` also this call's ``(K, V) [B, kv, T, d]`` (padding slots zero) for a cache; ``prefix``: this
        layer's ``(K, V) [kv, P, d]`` of a prefix shared by every row. Overflow gives inf/NaN silently here: the
        scores' finite checks refuse such records with a sentence."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._layer(layer, h, batch, cos, sin, past, keep_kv, prefix)

    def _layer(self, layer, h, batch, cos, sin, past, keep_kv, prefix=None):
        sp = self.spec
        x = rms_norm(h, layer.ln1, sp.eps)
        q, k, v = self._qkv(layer, x)
        q = _rotate(q, cos, sin, sp.rotation)
        k = _rotate(k, cos, sin, sp.rotation)
        o = self.attention(q, k, v, batch, *(past or (None, None)), prefix=prefix)
        h += self.linear(layer.o, o)
        x = rms_norm(h, layer.ln2, sp.eps)
        h += self._mlp(layer, x)
        new = None
        if keep_kv:
            new = (np.ascontiguousarray(batch.spread(k).transpose(0, 2, 1, 3)),
                   np.ascontiguousarray(batch.spread(np.ascontiguousarray(v)).transpose(0, 2, 1, 3)))
        return h, new


def keep_from_mask(mask: np.ndarray, T: int, past: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The runner's masks as ``(keep [B, T, T], past_keep [B, past])``: a 4-D ``[B, 1, T, T]`` keep-mask is used
    as given (tree/causal already in it); a 2-D ``[B, past + T]`` padding mask becomes padding AND causal."""
    if mask.ndim == 4:
        return mask[:, 0].astype(bool), None
    m = mask.astype(bool)
    causal = np.tril(np.ones((T, T), dtype=bool))
    keep = m[:, None, past:] & causal[None]
    return keep, (m[:, :past] if past else None)
