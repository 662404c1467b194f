"""Element-wise pieces of the forward, in place where numpy allows and split over the compute threads: RMSNorm,
rotary embedding, SiLU- and GeLU-gated products."""

from __future__ import annotations

import numpy as np

from paddle_scorer.compute.decoder.threads import parallel_rows


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


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
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


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
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


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``gelu_tanh(gate) * up`` (PyTorch's ``gelu(approximate="tanh")``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x^3)))``, Gemma's gate), in place on ``gate``."""
    c = np.float32(np.sqrt(2.0 / np.pi))

    def rows(sl):
        g = gate[sl]
        t = g * g
        t *= np.float32(0.044715)
        t += np.float32(1.0)
        t *= g
        t *= c
        np.tanh(t, out=t)
        t += np.float32(1.0)
        t *= np.float32(0.5)
        g *= t
        g *= up[sl]

    parallel_rows(rows, gate.shape[0], gate.size)
    return gate
