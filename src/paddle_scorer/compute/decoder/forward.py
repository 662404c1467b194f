"""The decoder's float32 CPU forward, written out: RMSNorm, rotary embeddings, attention over packed (tree-masked)
batches with an optional KV cache (in blocks, with an online softmax for long prompts), SwiGLU MLP, LoRA; the matrix products on the kernel :mod:`paddle_scorer.compute.gemm`
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

import numpy as np

from paddle_scorer.compute.decoder import moe
from paddle_scorer.compute.decoder.batch import Batch
from paddle_scorer.compute.decoder.ops import gelu_tanh_mul, rms_norm, rotate, silu_mul
from paddle_scorer.compute.decoder.rope import Rope
from paddle_scorer.compute.decoder.spec import ArchSpec
from paddle_scorer.compute.decoder.threads import parallel_rows
from paddle_scorer.compute.decoder.weights import Layer, Linear, Outside
from paddle_scorer.compute.gemm import Kernel

ATTENTION_ROWS = 128  # query rows per attention block (divided by the query heads per KV head): its scores stay in cache


class Forward:
    """One model's decoder math on a kernel. Stateless between calls; every array is float32."""

    def __init__(self, spec: ArchSpec, kernel: Kernel, rope: Rope):
        self.spec = spec
        self.k = kernel
        self.rope = rope
        fam = spec.family
        self.gate_act = gelu_tanh_mul if fam is not None and fam.activation == "gelu_tanh" else silu_mul
        self.embed_scale = np.float32(fam.embed_scale) if fam is not None and fam.embed_scale else None
        self.softcap = np.float32(fam.final_softcap) if fam is not None and fam.final_softcap else None
        self.dual = getattr(rope, "dual", False)  # per-layer rotary tables side by side (Gemma 3: global | local)
        self.window = fam.window if fam is not None else None  # the sliding window of the layers marked local

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
        if self.embed_scale is not None:
            h *= self.embed_scale
        return h

    def logprobs(self, out: Outside, rows: np.ndarray, normed: bool = False) -> np.ndarray:
        """Final norm (unless ``normed``) + LM head + float32 log-softmax on hidden rows ``[N, H]``."""
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits are refused by the caller, by record
            x = rows if normed else rms_norm(np.ascontiguousarray(rows, dtype=np.float32), out.norm, self.spec.eps)
            logits = self.k.mm(np.ascontiguousarray(x), out.head, trans_w=out.head_transposed)
            if out.head_bias is not None:
                logits += out.head_bias
            if self.softcap is not None:  # Gemma: cap * tanh(logits / cap)
                logits /= self.softcap
                np.tanh(logits, out=logits)
                logits *= self.softcap
            m = logits.max(axis=-1, keepdims=True)
            z = logits - m
            lse = np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float32))
            z -= lse
        return z

    def _qkv(self, layer: Layer, x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
        """Rotated q ``[N, heads, d]``, k ``[N, kv, d]`` and v of the layer's standard attention (q/k norms before
        RoPE when the layer has them; only the first ``rot_dim`` dims rotated when the spec says so)."""
        sp = self.spec
        n, d = x.shape[0], sp.head_dim
        if layer.qkv is not None:
            y = self.linear(layer.qkv, x).reshape(n, sp.kv_heads, sp.group + 2, d)
            q, k, v = y[:, :, : sp.group].reshape(n, sp.heads, d), y[:, :, sp.group], y[:, :, sp.group + 1]
        else:
            q = self.linear(layer.q, x).reshape(n, sp.heads, d)
            k = self.linear(layer.k, x).reshape(n, sp.kv_heads, d)
            v = self.linear(layer.v, x).reshape(n, sp.kv_heads, d)
        if layer.q_norm is not None:
            q = rms_norm(np.ascontiguousarray(q).reshape(-1, d), layer.q_norm, sp.eps).reshape(n, sp.heads, d)
            k = rms_norm(np.ascontiguousarray(k).reshape(-1, d), layer.k_norm, sp.eps).reshape(n, sp.kv_heads, d)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _rotate(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        r = self.spec.rot_dim
        if r is None:
            return rotate(x, cos, sin, self.spec.rotation)
        out = np.array(x, dtype=np.float32)  # GLM-4.5: the first r dims rotate, the rest pass through
        out[..., :r] = rotate(np.ascontiguousarray(x[..., :r]), cos, sin, self.spec.rotation)
        return out

    def _mla(self, layer: Layer, x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
        """DeepSeek's MLA as rotated q, k ``[N, heads, nope + rope]`` and v ``[N, heads, v_head_dim]``: the shared
        rotary key is one head, broadcast to all."""
        m, fc = layer.mla, self.spec.family
        dn, dr, dv, r = fc.mla["qk_nope"], fc.mla["qk_rope"], fc.mla["v_head_dim"], fc.mla["kv_lora_rank"]
        n, heads = x.shape[0], self.spec.heads
        if m.q is not None:
            q = self.linear(m.q, x)
        else:
            q = self.linear(m.q_b, rms_norm(self.linear(m.q_a, x), m.q_a_norm, 1e-6))
        q = q.reshape(n, heads, dn + dr)
        ckv = self.linear(m.kv_a, x)
        kv = self.linear(m.kv_b, rms_norm(np.ascontiguousarray(ckv[:, :r]), m.kv_a_norm, 1e-6))
        kv = kv.reshape(n, heads, dn + dv)
        k_rot = rotate(np.ascontiguousarray(ckv[:, None, r:]), cos, sin, self.spec.rotation)
        q[..., dn:] = rotate(np.ascontiguousarray(q[..., dn:]), cos, sin, self.spec.rotation)
        k = np.empty((n, heads, dn + dr), dtype=np.float32)
        k[..., :dn] = kv[..., :dn]
        k[..., dn:] = k_rot
        return q, k, np.ascontiguousarray(kv[..., dn:])

    def swiglu(self, mlp, x: np.ndarray) -> np.ndarray:
        """``down(silu(gate(x)) * up(x))`` of anything with ``gate_up`` (fused ``[gate | up]``) or ``gate``/``up``, and
        ``down`` (a layer's MLP, an expert)."""
        if mlp.gate_up is not None:
            gu = self.linear(mlp.gate_up, x)
            inter = gu.shape[1] // 2
            act = self.gate_act(np.ascontiguousarray(gu[:, :inter]), gu[:, inter:])
        else:
            act = self.gate_act(self.linear(mlp.gate, x), self.linear(mlp.up, x))
        return self.linear(mlp.down, act)

    def _mlp(self, layer: Layer, x: np.ndarray) -> np.ndarray:
        if layer.moe is not None:
            return moe.forward(self, layer.moe, x, self.swiglu)
        return self.swiglu(layer, x)

    # ---------------------------------------------------------------- attention

    def attention(self, q, k, v, batch: Batch, past_k=None, past_v=None, prefix=None, window=None,
                  sinks=None) -> np.ndarray:
        """q ``[N, heads, d]``, k/v ``[N, kv, d]`` of the new (real) tokens; ``past_k/v [B, kv, S, d]`` (per row);
        ``prefix``: ``(K, V) [kv, P, d]`` of a prefix every row continues (seen by every query, computed once, never
        copied per row: its scores are one product over all rows). Returns ``[N, heads*d]``.

        Exact attention in blocks (flash attention's algorithm, in float32): queries in blocks, and where a block's
        scores would be large (long prompts), keys in blocks too, with an online softmax (a running maximum and sum
        per query, earlier blocks rescaled when the maximum grows), so the scores in memory stay ~:data:`BLOCK_SCORES`
        floats. Key blocks no query of the block sees are skipped (causal, padding, packed labels' tree); blocks
        every query sees fully get no mask. The query heads of one KV head share its keys (GQA, never repeated).
        ``window``: a sliding window (keys more than ``window`` positions back are masked, the prefix's too);
        ``sinks`` ``[heads]``: GPT-OSS's logits that join every softmax with a value of zero."""
        sp = self.spec
        if window is not None:
            batch = batch.windowed(window)
        B, T = batch.B, batch.T
        G, d, dv, kv = sp.group, q.shape[-1], v.shape[-1], sp.kv_heads
        q4, k4, v4 = batch.spread(q), batch.spread(k), batch.spread(v)
        # [B, kv, G, T, d]: the query heads of one KV head side by side (head h uses KV head h // G)
        qh = q4.reshape(B, T, kv, G, d).transpose(0, 2, 3, 1, 4)
        if sp.qk_scale == "divide-q":
            qh = qh / np.float32(np.sqrt(d))
        else:  # the scores' scale applied to q: one pass over q instead of one over every score
            qh = qh * np.float32(1.0 / np.sqrt(d) if sp.qk_scale == "multiply-q"
                                 else sp.scale if sp.scale is not None else d ** -0.5)
        keys, vals = k4.transpose(0, 2, 1, 3), v4.transpose(0, 2, 1, 3)  # [B, kv, T, d]
        if past_k is not None and past_k.shape[2]:
            keys = np.concatenate([past_k, keys], axis=2)
            vals = np.concatenate([past_v, vals], axis=2)
        kt = np.ascontiguousarray(keys.transpose(0, 1, 3, 2))  # [B, kv, d, S+T]
        vals = np.ascontiguousarray(vals)
        pre = None
        if prefix is not None:  # [kv, d, P] and [kv, P, dv]
            pre = (np.ascontiguousarray(prefix[0].transpose(0, 2, 1)), np.ascontiguousarray(prefix[1]))
        out = np.empty((B, kv, G, T, dv), dtype=np.float32)
        rows = max(1, ATTENTION_ROWS // G)
        for t0, t1, key_blocks, size in batch.attention_plan(rows, B * kv * G, (pre[0].shape[2] if pre else 0)):
            qb = np.ascontiguousarray(qh[:, :, :, t0:t1]).reshape(B, kv, G * (t1 - t0), d)
            out[:, :, :, t0:t1] = self._attend(qb, kt, vals, batch, t0, t1, key_blocks, size, pre, G, window, sinks)
        # [B, kv, G, T, d] -> [B, T, heads, d] -> the real tokens [N, heads*d]
        o4 = out.transpose(0, 3, 1, 2, 4).reshape(B, T, sp.heads * dv)
        return np.ascontiguousarray(batch.pick(o4))

    def _attend(self, qb, kt, vals, batch: Batch, t0: int, t1: int, key_blocks: list, size: int, pre,
                G: int, window: int | None = None, sinks: np.ndarray | None = None) -> np.ndarray:
        """One query block's attention output ``[B, kv, G, n, dv]``: the prefix's key blocks, then its own."""
        B, kv, n, dv = qb.shape[0], qb.shape[1], t1 - t0, vals.shape[-1]
        state = _Online(B, kv, G, n, dv, None if sinks is None else sinks.reshape(kv, G))
        if pre is not None:  # [kv, B*G*n, P]: every row's queries against the one prefix, in its own layout
            qp = np.ascontiguousarray(qb.transpose(1, 0, 2, 3)).reshape(kv, B * G * n, -1)
            for p0, p1 in _spans(pre[0].shape[2], size):
                s = self.k.bmm(qp, np.ascontiguousarray(pre[0][:, :, p0:p1])).reshape(kv, B, G, n, p1 - p0)
                state.add(s, batch.prefix_bias(window, t0, t1, p0, p1) if window is not None else None, swapped=True)
                pv = self.k.bmm(s.reshape(kv, B * G * n, p1 - p0), pre[1][:, p0:p1]).reshape(kv, B, G, n, dv)
                state.accumulate(pv.transpose(1, 0, 2, 3, 4))
        bias = batch.bias()
        for k0, k1, masked in key_blocks:
            s = self.k.bmm(qb, np.ascontiguousarray(kt[..., k0:k1])).reshape(B, kv, G, n, k1 - k0)
            state.add(s, bias[:, None, None, t0:t1, k0:k1] if masked else None)
            state.accumulate(self.k.bmm(s.reshape(B, kv, G * n, k1 - k0), vals[:, :, k0:k1]).reshape(B, kv, G, n, dv))
        return state.result()

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
        if self.dual:  # this layer's table: the global one first, the local one second
            d = cos.shape[-1] // 2
            part = slice(d, 2 * d) if layer.local else slice(0, d)
            cos, sin = np.ascontiguousarray(cos[:, part]), np.ascontiguousarray(sin[:, part])
        x = rms_norm(h, layer.ln1, sp.eps)
        q, k, v = (self._mla if layer.mla is not None else self._qkv)(layer, x, cos, sin)
        o = self.attention(q, k, v, batch, *(past or (None, None)), prefix=prefix,
                           window=self.window if layer.local else None, sinks=layer.sinks)
        o = self.linear(layer.o, o)
        h += o if layer.post_attn is None else rms_norm(o, layer.post_attn, sp.eps)
        x = rms_norm(h, layer.ln2, sp.eps)
        m = self._mlp(layer, x)
        h += m if layer.post_mlp is None else rms_norm(m, layer.post_mlp, sp.eps)
        new = None
        if keep_kv:
            new = (np.ascontiguousarray(batch.spread(k).transpose(0, 2, 1, 3)),
                   np.ascontiguousarray(batch.spread(np.ascontiguousarray(v)).transpose(0, 2, 1, 3)))
        return h, new


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(i, min(total, i + size)) for i in range(0, total, size)]


class _Online:
    """The running state of one query block's softmax over key blocks: per query row the largest score so far
    (``top``), the sum of ``exp(score - top)`` (``total``) and the output accumulated with the same weights
    (``acc``). A new block's scores are exponentiated in place (they become its weights); when the largest score
    grows, the earlier sum and output are rescaled. The first block needs no rescaling (one block is the plain
    softmax); the result is ``acc / total``."""

    def __init__(self, B: int, kv: int, G: int, n: int, dv: int, sink: np.ndarray | None = None):
        self.top = None
        self.total = np.empty((B, kv, G, n, 1), dtype=np.float32)
        self.acc = None
        self.n, self.dv = n, dv
        if sink is not None:  # a key every query sees, scored sink[head], whose value is zero: it only adds to the sum
            self.top = np.broadcast_to(sink.astype(np.float32)[None, :, :, None, None], self.total.shape).copy()
            self.total.fill(1.0)
            self.acc = np.zeros((B, kv, G, n, dv), dtype=np.float32)

    def add(self, s: np.ndarray, bias: np.ndarray | None, swapped: bool = False) -> None:
        """Scores ``s [B, kv, G, n, k]`` (``[kv, B, G, n, k]`` when ``swapped``: a prefix's), masked by ``bias``
        (``[B, 1, 1, n, k]`` additive) when given, turned into this block's weights; then the caller passes
        ``weights @ values`` to :meth:`accumulate`."""
        first = self.top is None
        if first:
            self.top = np.empty_like(self.total)
        top, total, acc = self.top, self.total, self.acc
        if swapped:
            top, total = top.transpose(1, 0, 2, 3, 4), total.transpose(1, 0, 2, 3, 4)
            acc = acc.transpose(1, 0, 2, 3, 4) if acc is not None else None

        def rows(sl):
            part = s[:, :, :, sl]
            if bias is not None:
                part += bias[:, :, :, sl]
            m = part.max(axis=-1, keepdims=True)
            if not first:
                old = top[:, :, :, sl]
                np.maximum(m, old, out=m)
                scale = np.exp(old - m)
                total[:, :, :, sl] *= scale
                acc[:, :, :, sl] *= scale
            top[:, :, :, sl] = m
            part -= m
            np.exp(part, out=part)
            if first:
                np.sum(part, axis=-1, keepdims=True, out=total[:, :, :, sl])
            else:
                total[:, :, :, sl] += part.sum(axis=-1, keepdims=True)

        parallel_rows(rows, self.n, s.size)

    def accumulate(self, weighted: np.ndarray) -> None:
        """Add a block's ``weights @ values`` (``[B, kv, G, n, dv]``, or a view in that order)."""
        if self.acc is None:
            self.acc = np.ascontiguousarray(weighted)  # the first block's product as it is (a prefix's: reordered)
        else:
            self.acc += weighted

    def result(self) -> np.ndarray:
        if self.acc is None:  # no key seen (a padding slot's block): its output is never read
            return np.zeros(self.total.shape[:-1] + (self.dv,), dtype=np.float32)
        self.acc /= self.total
        return self.acc
