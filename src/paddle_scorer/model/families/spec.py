"""What a family is (:class:`Family`, one per module of this package) and what reading a config.json gives
(:class:`FamilyConfig`, :class:`RopeSpec`, :class:`MoeSpec`). Pure: no paddle."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    """What rotates: the base, the scaling type and its parameters, how many dims of a head, in which layout."""

    theta: float
    dim: int  # rotary dims per head (partial rotary: head_dim * partial_rotary_factor; MLA: qk_rope_head_dim)
    layout: str  # "half" (NeoX: dims j and j + dim/2) | "interleaved" (pairs 2j, 2j+1)
    type: str = "default"
    factor: float = 1.0
    original_max: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to original_max
    long_factor: tuple[float, ...] = ()  # longrope: past original_max (not computed: refused there)


@dataclass(frozen=True)
class MoeSpec:
    experts: int
    top_k: int
    intermediate: int
    router: str  # "softmax" | "sigmoid" | "topk_softmax" (the top-k logits, then a softmax over them)
    renormalize: str  # "none" | "sum" | "sum+eps" (1e-20) | "clamp" (max(sum, norm_min))
    norm_min: float = 0.0
    scaling: float = 1.0  # routed_scaling_factor
    groups: int = 1  # group-limited selection: n_group, topk_group
    topk_groups: int = 1
    correction_bias: str | None = None  # tensor name under the MLP (selection only)
    shared_intermediate: int = 0
    shared_gated: bool = False  # sigmoid(shared_expert_gate(x)) * shared(x)
    shared_name: str = "shared_experts"
    router_bias: bool = False  # the router's linear map has a bias
    expert_bias: bool = False  # every expert's projections have biases
    activation: str = "silu"  # "silu" | "clamped_swiglu": (clip(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702


def _none(*_args) -> frozenset:
    return frozenset()


def silu(c) -> str:
    """The gate activation of most families: SiLU (``hidden_act``), anything else refused naming it."""
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        c.refuse(f"hidden_act {act!r} (this family uses SiLU)")
    return "silu"


@dataclass(frozen=True)
class Family:
    """Everything paddle-scorer knows of one family, declared in its module: the names that mean it, its defaults, how
    its checkpoints name and lay out tensors, and the hooks that read what sets it apart from the common decoder.
    Hooks take a :class:`~paddle_scorer.model.families.reading.ConfigReader` (``c``) and refuse with ``c.refuse``."""

    name: str
    title: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...] = ()  # besides ``name``
    fused: tuple[str, ...] = ()  # runtime modules fused as PaddleFormers holds them (its adapters target them)
    stored_fused: bool = False  # the checkpoint stores q/k/v as one [q | k | v] qkv_proj and gate/up as gate_up_proj
    default_theta: float = 10000.0
    default_eps: float = 1e-6
    default_head_dim: int | None = None  # None: hidden_size / num_attention_heads
    tie_default: bool = False
    library_first: bool = False  # a model library builds it too: it runs it where it computes the declaration
    partial_rotary: bool = False  # its forward rotates only the first partial_rotary_factor of each head
    rotary_layout: str = "half"
    qk_norm: Callable = lambda c: False
    mlp_name: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint name fragment -> runtime name fragment
    paddlenlp_prefix: str | None = None  # the body prefix PaddleNLP's own class gives it (its adapters carry it)
    window_on_every_layer: bool = False  # sliding_window, when set, applies to every layer
    window_needs_flag: bool = False  # ... only when use_sliding_window is on (Qwen3-MoE)
    default_layer_types: Callable | None = None  # (c, layers) -> sliding layers when config.json lists none
    check: Callable | None = None  # (c) -> None: settings the family refuses
    activation: Callable = silu  # (c) -> "silu" | "gelu_tanh", checked
    biases: Callable = _none  # (c) -> modules whose bias config.json declares
    moe: Callable | None = None  # (c, experts, top_k, intermediate) -> MoeSpec; None: a dense family
    moe_layers: Callable = lambda c, layers: frozenset(range(layers))
    attention: Callable | None = None  # (c, hidden, heads) -> (head_dim, rot_dim, layout, mla): MLA's own dims
    extras: Callable | None = None  # (c, layers, rot_dim, max_positions) -> FamilyConfig fields it sets itself
    expert_tensors: Callable | None = None  # (fc, shapes, rename) -> {runtime name: RuntimeTensor} of its experts
    library_reading: Callable | None = None  # (library, cfg, where) -> why that library would compute otherwise


@dataclass(frozen=True)
class FamilyConfig:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    intermediate: int
    tie: bool
    rope: RopeSpec
    max_positions: int | None
    kind: Family | None = field(default=None, repr=False, compare=False)
    qk_norm: bool = False
    mla: dict | None = None  # q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head_dim
    moe: MoeSpec | None = None
    moe_layers: frozenset[int] = frozenset()
    mlp_name: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    extra_layers: int = 0  # next-n / MTP layers in the checkpoint, never run when scoring
    biases: frozenset[str] = frozenset()  # modules whose bias config.json declares (q_proj, o_proj, gate_proj...)
    window: int | None = None  # the sliding window of the layers in local_layers
    local_layers: frozenset[int] = frozenset()  # sliding-window layers (with local_rope: their own rotary table too)
    activation: str = "silu"  # "silu" | "gelu_tanh"
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight)
    embed_scale: float | None = None
    post_norms: bool = False  # a norm after the attention and one before and after the MLP
    local_rope: RopeSpec | None = None
    query_scale: float | None = None  # the attention's scale when the config sets it
    final_softcap: float | None = None
    sinks: bool = False  # a learned logit per head that joins every softmax and takes its share of nothing
    notes: tuple[str, ...] = field(default=())

    @property
    def title(self) -> str:
        return self.kind.title if self.kind is not None else self.family

    @property
    def fused(self) -> tuple[str, ...]:
        return self.kind.fused if self.kind is not None else ()

    @property
    def exact_positions(self) -> int | None:
        """Positions the decoder computes exactly (None: any): LongRoPE's original context."""
        if self.rope.type == "longrope" and self.rope.long_factor != self.rope.short_factor:
            return self.rope.original_max
        return None

    @property
    def softmax_scale(self) -> float:
        """The attention's scale: ``head_dim^-0.5``; with MLA ``(qk_nope + qk_rope)^-0.5`` times YaRN's mscale^2."""
        if self.query_scale is not None:
            return self.query_scale
        if self.mla is None:
            return self.head_dim ** -0.5
        scale = (self.mla["qk_nope"] + self.mla["qk_rope"]) ** -0.5
        r = self.rope
        if r.type != "default" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden * self.moe.intermediate if self.moe else 0

    def active_params(self, total_params: int) -> int:
        """Parameters a token goes through: all but the routed experts it is not sent to."""
        if not self.moe:
            return total_params
        idle = (self.moe.experts - self.moe.top_k) * self.expert_params() * len(self.moe_layers)
        return max(0, total_params - idle)


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def attention_biases(c, key: str = "attention_bias", default: bool = False, modules=ATTENTION) -> frozenset[str]:
    """The attention projections with a bias when config.json's ``key`` says so."""
    return frozenset(modules) if bool(c.get(key, default)) else frozenset()
