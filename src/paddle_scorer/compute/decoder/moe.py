"""Mixture-of-experts layers: the router (softmax or sigmoid scores, a correction bias for the choice only,
DeepSeek's group-limited choice, renormalisation and scaling as each family does it, all in float32) and the experts,
each computed only for the tokens routed to it (its rows gathered, one product per projection, the weighted result
added back): no dense pass over every expert. Shared experts (Qwen2-MoE's gated by a sigmoid) run on every token."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from paddle_scorer.compute.decoder.weights import Linear
from paddle_scorer.compute.gemm import Mat


@dataclass
class Expert:
    """A SwiGLU MLP: ``down(silu(gate(x)) * up(x))``, gate and up fused (``[gate | up]``) or apart."""

    down: Linear
    gate_up: Linear | None = None
    gate: Linear | None = None
    up: Linear | None = None


@dataclass
class Moe:
    spec: object  # model.families.MoeSpec
    router: Mat  # [hidden, experts]
    experts: list[Expert]
    bias: np.ndarray | None = None  # [experts]: added to the scores to choose experts, not to weigh them
    shared: Expert | None = None
    shared_gate: Linear | None = None  # [hidden, 1]
    router_bias: np.ndarray | None = None  # [experts], added to the router's logits (GPT-OSS)


def route(spec, logits: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(experts [N, k], weights [N, k])`` from the router's float32 logits ``[N, E]`` (see the module docstring)."""
    if spec.router == "topk_softmax":  # GPT-OSS: the k largest logits, then a softmax over those k
        k = spec.top_k
        n, e = logits.shape
        idx = np.argpartition(-logits, k - 1, axis=-1)[:, :k] if k < e else np.tile(np.arange(e), (n, 1))
        top = np.take_along_axis(logits, idx, axis=-1)
        z = np.exp(top - top.max(axis=-1, keepdims=True))
        return idx, (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)
    with np.errstate(over="ignore"):
        if spec.router == "softmax":
            z = np.exp(logits - logits.max(axis=-1, keepdims=True))
            scores = z / z.sum(axis=-1, keepdims=True)
        else:
            scores = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))
    scores = scores.astype(np.float32, copy=False)
    choice = scores + bias[None, :] if bias is not None else scores
    n, e = choice.shape
    if spec.groups > 1:  # groups ranked by the sum of their two best scores; experts of dropped groups score 0.0
        per = e // spec.groups
        best2 = np.sort(choice.reshape(n, spec.groups, per), axis=-1)[..., -2:].sum(axis=-1)
        keep = np.argsort(-best2, axis=-1, kind="stable")[:, : spec.topk_groups]
        mask = np.zeros((n, spec.groups), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, per, axis=-1), choice, np.float32(0.0))
    k = spec.top_k
    idx = np.argpartition(-choice, k - 1, axis=-1)[:, :k] if k < e else np.tile(np.arange(e), (n, 1))
    w = np.take_along_axis(scores, idx, axis=-1)
    if spec.renormalize == "sum":
        w = w / w.sum(axis=-1, keepdims=True)
    elif spec.renormalize == "sum+eps":
        w = w / (w.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    elif spec.renormalize == "clamp":
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), np.float32(spec.norm_min))
    if spec.scaling != 1.0:
        w = w * np.float32(spec.scaling)
    return idx, w.astype(np.float32, copy=False)


def clamped_swiglu(f, spec, expert: Expert, x: np.ndarray) -> np.ndarray:
    """GPT-OSS's expert: ``g = min(gate, limit)``, ``u = clip(up, -limit, limit)``, ``down((u + 1) * g *
    sigmoid(alpha g))``, gate and up from the fused ``[gate | up]`` (de-interleaved on load), every projection with
    its bias."""
    gu = f.linear(expert.gate_up, x)
    inter = gu.shape[1] // 2
    limit, alpha = np.float32(spec.swiglu_limit), np.float32(spec.swiglu_alpha)
    g = np.minimum(gu[:, :inter], limit)
    u = np.clip(gu[:, inter:], -limit, limit)
    with np.errstate(over="ignore"):
        act = g / (np.float32(1.0) + np.exp(-alpha * g))
    act *= u + np.float32(1.0)
    return f.linear(expert.down, np.ascontiguousarray(act, dtype=np.float32))


def forward(f, m: Moe, x: np.ndarray, swiglu) -> np.ndarray:
    """The MoE layer on ``x [N, hidden]``; ``swiglu(expert, rows)`` computes one expert (the forward's own)."""
    logits = f.k.mm(np.ascontiguousarray(x, dtype=np.float32), m.router)
    if m.router_bias is not None:
        logits += m.router_bias
    idx, w = route(m.spec, logits, m.bias)
    if m.spec.activation == "clamped_swiglu":
        swiglu = functools.partial(clamped_swiglu, f, m.spec)
    out = np.zeros_like(x)
    order = np.argsort(idx, axis=None, kind="stable")  # the (token, slot) pairs grouped by expert
    flat = idx.reshape(-1)[order]
    bounds = np.searchsorted(flat, np.arange(len(m.experts) + 1))
    tokens, slots = np.divmod(order, idx.shape[1])
    for e in range(len(m.experts)):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue  # an expert no token chose is not touched (a streamed layer's is then never read)
        expert = m.experts[e]
        rows = tokens[lo:hi]
        y = swiglu(expert, np.ascontiguousarray(x[rows]))
        y *= w[rows, slots[lo:hi]][:, None]
        out[rows] += y  # a token meets an expert at most once
    if m.shared is not None:
        y = swiglu(m.shared, x)
        if m.shared_gate is not None:
            g = f.linear(m.shared_gate, x)
            y *= np.float32(1.0) / (np.float32(1.0) + np.exp(-g))
        out += y
    return out
