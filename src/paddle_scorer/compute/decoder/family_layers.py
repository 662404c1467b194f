"""A family model's decoder layer (:mod:`paddle_scorer.model.families`) from its runtime tensors, named by suffix
(``self_attn.qkv_proj.weight``, ``mlp.experts.3.up_gate_proj.weight``...), with LoRA pairs on any projection: the
attention (standard with optional q/k norms, or DeepSeek's MLA), and the MLP (dense, or routed experts with shared
ones). Every tensor is used or refused (:class:`~paddle_scorer.compute.decoder.weights.UnsupportedWeights`): the
loader checked the names against the family's model already (:mod:`paddle_scorer.model.family_tensors`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from paddle_scorer.compute.decoder.moe import Expert, Moe
from paddle_scorer.compute.decoder.weights import Layer, Linear, UnsupportedWeights, as_mat, vec


@dataclass
class Mla:
    """DeepSeek's multi-head latent attention: low-rank q (or a plain ``q_proj``), the compressed kv with one shared
    rotary key, their norms (eps 1e-6, as transformers fixes it)."""

    kv_a: Linear
    kv_a_norm: np.ndarray
    kv_b: Linear
    q: Linear | None = None
    q_a: Linear | None = None
    q_a_norm: np.ndarray | None = None
    q_b: Linear | None = None


class _Modules:
    """The layer's tensors grouped by module: ``take(name)`` gives a :class:`Linear` (weight, bias, LoRA pair) and
    marks its tensors used; :meth:`check_all_used` refuses anything left over."""

    def __init__(self, tensors: dict, lora: dict | None, scaling: float):
        self.tensors, self.lora, self.scaling = dict(tensors), dict(lora or {}), scaling

    def has(self, module: str) -> bool:
        return f"{module}.weight" in self.tensors

    def take(self, module: str) -> Linear:
        w = self.tensors.pop(f"{module}.weight", None)
        if w is None:
            raise UnsupportedWeights(f"{module}.weight is missing")
        b = self.tensors.pop(f"{module}.bias", None)
        lin = Linear(as_mat(w), vec(b) if b is not None else None)
        if module in self.lora:
            a, bb = self.lora.pop(module)
            lin.set_lora(a, bb, self.scaling)
        return lin

    def vector(self, name: str) -> np.ndarray:
        v = self.tensors.pop(name, None)
        if v is None:
            raise UnsupportedWeights(f"{name} is missing")
        return vec(v)

    def check_all_used(self) -> None:
        if self.tensors:
            raise UnsupportedWeights(f"the layer tensor {sorted(self.tensors)[0]!r}")
        if self.lora:
            raise UnsupportedWeights(f"a LoRA pair on {sorted(self.lora)[0]!r}")


def _expert(mods: _Modules, base: str, names: tuple[str, str, str]) -> Expert:
    gate, up, down = names
    if mods.has(f"{base}.up_gate_proj"):
        return Expert(down=mods.take(f"{base}.{down}"), gate_up=mods.take(f"{base}.up_gate_proj"))
    return Expert(down=mods.take(f"{base}.{down}"), gate=mods.take(f"{base}.{gate}"), up=mods.take(f"{base}.{up}"))


def _moe(fc, mods: _Modules, p: str, experts=None) -> Moe:
    spec = fc.moe
    router = mods.take(f"{p}.gate")
    if (router.b is not None and not spec.router_bias) or router.lora is not None:
        raise UnsupportedWeights(f"{p}.gate: a router with a bias or a LoRA pair")
    bias = mods.vector(f"{p}.{spec.correction_bias}").reshape(-1) if spec.correction_bias else None
    if experts is None:
        experts = [_expert(mods, f"{p}.experts.{e}", fc.expert_names) for e in range(spec.experts)]
    shared = _expert(mods, f"{p}.{spec.shared_name}", ("gate_proj", "up_proj", "down_proj")) \
        if spec.shared_intermediate else None
    gate = mods.take(f"{p}.shared_expert_gate") if spec.shared_gated else None
    return Moe(spec, router.w, experts, None if bias is None else bias.astype(np.float32), shared, gate,
               router_bias=None if router.b is None else np.asarray(router.b, np.float32))


def _attention(fc, mods: _Modules, layer: Layer) -> None:
    p = "self_attn"
    if fc.mla is not None:
        m = Mla(kv_a=mods.take(f"{p}.kv_a_proj_with_mqa"), kv_a_norm=mods.vector(f"{p}.kv_a_layernorm.weight"),
                kv_b=mods.take(f"{p}.kv_b_proj"))
        if fc.mla["q_lora_rank"]:
            m.q_a, m.q_a_norm, m.q_b = (mods.take(f"{p}.q_a_proj"), mods.vector(f"{p}.q_a_layernorm.weight"),
                                        mods.take(f"{p}.q_b_proj"))
        else:
            m.q = mods.take(f"{p}.q_proj")
        layer.mla = m
    elif mods.has(f"{p}.qkv_proj"):
        layer.qkv = mods.take(f"{p}.qkv_proj")
    else:
        layer.q, layer.k, layer.v = (mods.take(f"{p}.{x}_proj") for x in "qkv")
    layer.o = mods.take(f"{p}.o_proj")
    if fc.qk_norm:
        layer.q_norm, layer.k_norm = mods.vector(f"{p}.q_norm.weight"), mods.vector(f"{p}.k_norm.weight")
    if fc.sinks:
        layer.sinks = mods.vector(f"{p}.sinks").astype(np.float32)


def make_family_layer(fc, index: int, tensors: dict, lora: dict | None = None, scaling: float = 1.0,
                      experts=None) -> Layer:
    """Layer ``index`` of a family model from its tensors by suffix and LoRA pairs ``{module suffix: (A, B)}``.
    ``experts``: the routed experts of a MoE layer as a sequence built elsewhere (a streamed layer's, read when a
    token first chooses one: :class:`LazyExperts`); its tensors and pairs are then not in ``tensors``/``lora``."""
    mods = _Modules(tensors, lora, scaling)
    if fc.post_norms:  # Gemma 3: post_attention_layernorm norms the attention's output; the MLP has its own pair
        layer = Layer(mods.vector("input_layernorm.weight"), mods.vector("pre_feedforward_layernorm.weight"),
                      post_attn=mods.vector("post_attention_layernorm.weight"),
                      post_mlp=mods.vector("post_feedforward_layernorm.weight"))
    else:
        layer = Layer(mods.vector("input_layernorm.weight"), mods.vector("post_attention_layernorm.weight"))
    layer.local = index in fc.local_layers
    _attention(fc, mods, layer)
    if index in fc.moe_layers:
        layer.moe = _moe(fc, mods, fc.mlp_name, experts)
    else:
        e = _expert(mods, "mlp", ("gate_proj", "up_proj", "down_proj"))
        layer.down, layer.gate_up, layer.gate, layer.up = e.down, e.gate_up, e.gate, e.up
    mods.check_all_used()
    if fc.norm_offset:
        for name in ("ln1", "ln2", "post_attn", "post_mlp", "q_norm", "k_norm"):
            v = getattr(layer, name)
            if v is not None:
                setattr(layer, name, norm_weight(fc, v))
    return layer


class LazyExperts:
    """A MoE layer's routed experts, each built by ``load(e)`` (its tensors by suffix and LoRA pairs) the first time a
    token chooses it, then kept for the layer's life; ``loaded`` counts them."""

    def __init__(self, fc, count: int, load):
        self.fc, self.count, self.load = fc, count, load
        self.built: dict[int, Expert] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, e: int) -> Expert:
        if e not in self.built:
            tensors, lora, scaling = self.load(e)
            mods = _Modules(tensors, lora, scaling)
            self.built[e] = _expert(mods, f"{self.fc.mlp_name}.experts.{e}", self.fc.expert_names)
            mods.check_all_used()
        return self.built[e]

    @property
    def loaded(self) -> int:
        return len(self.built)


def norm_weight(fc, weight: np.ndarray) -> np.ndarray:
    """An RMSNorm weight as the forward multiplies by it: the stored one, or Gemma's ``offset + weight`` (float32)."""
    if not fc.norm_offset:
        return weight
    return (np.asarray(weight, np.float32) + np.float32(fc.norm_offset)).astype(np.float32)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def family_modules(names) -> set[str]:
    """The module suffixes (``mlp.experts.3.up_gate_proj``) of runtime weight names: where LoRA pairs may land."""
    out = set()
    for n in names:
        m = _LAYER.match(n)
        if m and n.endswith(".weight"):
            out.add(m.group(2)[: -len(".weight")])
    return out
