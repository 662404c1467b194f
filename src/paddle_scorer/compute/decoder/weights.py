"""A decoder layer's weights as the forward holds them: linear maps (Paddle layout ``[in, out]``, LoRA pairs), norms,
and what lies outside the layers (embedding, final norm, LM head)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paddle_scorer.compute.gemm import Mat


@dataclass
class Linear:
    w: Mat  # [in, out] (Paddle's layout)
    b: np.ndarray | None = None
    lora: tuple[Mat, Mat] | None = None  # (A [in, r], B * scaling [r, out]): y += (x @ A) @ (B * scaling)

    def set_lora(self, a, b, scaling: float) -> None:
        """Attach a LoRA pair; the scaling is folded into a copy of B once (B is rank x out: small), so the
        forward adds one product instead of scaling a whole activation."""
        b = as_mat(b)
        if scaling != 1.0:
            b = Mat(b.np * np.float32(scaling))
        self.lora = (as_mat(a), b)


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
    q_norm: np.ndarray | None = None  # per-head RMSNorm of q and k before RoPE (Qwen3, GLM-4.5's use_qk_norm)
    k_norm: np.ndarray | None = None
    mla: object = None  # decoder.family_layers.Mla: DeepSeek's low-rank attention
    moe: object = None  # decoder.moe.Moe: routed experts instead of the MLP
    post_attn: np.ndarray | None = None  # Gemma 3: RMSNorm of the attention's output before the residual add
    post_mlp: np.ndarray | None = None  # Gemma 3: RMSNorm of the MLP's output before the residual add
    local: bool = False  # a sliding-window layer (Gemma 3's local layers: with their own rotary table too)
    sinks: np.ndarray | None = None  # GPT-OSS: [heads] logits that join each softmax with a value of zero


@dataclass
class Outside:
    embed: np.ndarray  # [vocab, hidden]
    norm: np.ndarray  # [hidden]
    head: Mat  # [hidden, vocab], or [vocab, hidden] when spec.head_out_in or tied
    head_transposed: bool
    head_bias: np.ndarray | None = None


LINEARS = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "self_attn.qkv_proj": "qkv", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "mlp.up_gate_proj": "gate_up", "mlp.gate_up_fused_proj": "gate_up",
}
NORMS = {"input_layernorm.weight": "ln1", "post_attention_layernorm.weight": "ln2"}


class UnsupportedWeights(ValueError):
    """A tensor this forward has no place for: the library's forward is used instead."""


def as_mat(a) -> Mat:
    return a if isinstance(a, Mat) else Mat(np.asarray(a))


def vec(a) -> np.ndarray:
    return a.np if isinstance(a, Mat) else np.asarray(a)


def make_layer(tensors: dict, lora: dict | None = None, scaling: float = 1.0) -> Layer:
    """A decoder layer from its tensors named by suffix (``self_attn.q_proj.weight``, ...: numpy arrays or
    :class:`Mat`) and, optionally, LoRA pairs ``{module suffix: (A, B)}`` with their scaling."""
    parts: dict[str, dict[str, object]] = {}
    norms = {}
    for name, value in tensors.items():
        if name in NORMS:
            norms[NORMS[name]] = vec(value)
            continue
        module, _, kind = name.rpartition(".")
        role = LINEARS.get(module)
        if role is None or kind not in ("weight", "bias", "lora_A", "lora_B"):
            raise UnsupportedWeights(f"the layer tensor {name!r}")
        parts.setdefault(role, {})[kind] = value
    for module, (a, b) in (lora or {}).items():
        role = LINEARS.get(module)
        if role is None:
            raise UnsupportedWeights(f"a LoRA pair on {module!r}")
        parts.setdefault(role, {}).update(lora_A=a, lora_B=b)
    if set(norms) != {"ln1", "ln2"}:
        raise UnsupportedWeights("a layer without input_layernorm and post_attention_layernorm")
    layer = Layer(norms["ln1"], norms["ln2"])
    for role, p in parts.items():
        if "weight" not in p:
            raise UnsupportedWeights(f"{role} without a weight")
        lin = Linear(as_mat(p["weight"]), vec(p["bias"]) if "bias" in p else None)
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
