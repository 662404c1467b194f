"""The model families paddle-scorer's decoder computes without the library's model class (Qwen3, Qwen3-MoE, Qwen2-MoE,
Mixtral, DeepSeek-V3, GLM-4.5, ERNIE 4.5 MoE): which architecture names mean which family, and their config.json read
into one normalized :class:`FamilyConfig`, whichever library or transformers version wrote it. Pure: no paddle.

On a CPU neither library runs these models (PaddleFormers builds Qwen*/GLM through ``paddlefleet``, which is not on
the package index, and ERNIE 4.5 MoE only with GPU kernels; PaddleNLP 3.0.0b4's MoE forwards break under paddle 3.3),
so the decoder is the way to run them; what it computes is HF transformers' eval-mode forward (the reference the tests
hold it to) and PaddleFormers' where that runs.

Config keys exist in several styles in the wild, read in this order: transformers 5's ``rope_parameters``, then
``rope_scaling`` + ``rope_theta``, then the family's default base; the expert count as ``num_experts``,
``num_local_experts``, ``n_routed_experts`` or ``moe_num_experts``; top-k as ``num_experts_per_tok`` or ``moe_k``.
A value the decoder does not implement (a sliding window, another RoPE type, another router) is refused with the
field's name (:func:`read`), never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from paddle_scorer.errors import UnsupportedModelError
from paddle_scorer.model import rope_config

# architecture name (config.json "architectures"[0], PaddleFormers' class names included) -> family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3", "Gemma3ForCausalLM": "gemma3", "GptOssForCausalLM": "gpt_oss",
    "Qwen3ForCausalLM": "qwen3", "Qwen3ForCausalLMDeprecated": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe", "Qwen3MoeForCausalLMDeprecated": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen2MoeForCausalLMDeprecated": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV3ForCausalLMDeprecated": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe", "Glm4MoeForCausalLMDeprecated": "glm4_moe",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
}
MODEL_TYPES = {**{f: f for f in set(ARCHITECTURES.values())}, "gemma3_text": "gemma3"}
TITLES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi-3", "gemma3": "Gemma 3", "gpt_oss": "GPT-OSS", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE", "mixtral": "Mixtral",
          "deepseek_v3": "DeepSeek-V3", "glm4_moe": "GLM-4.5", "ernie4_5_moe": "ERNIE 4.5 MoE"}
DEFAULT_THETA = {"mixtral": 1e6, "ernie4_5_moe": 500000.0, "gemma3": 1e6, "gpt_oss": 150000.0}
DEFAULT_EPS = {"mixtral": 1e-5, "glm4_moe": 1e-5, "ernie4_5_moe": 1e-5, "phi3": 1e-5, "gpt_oss": 1e-5}
# Runtime modules fused as PaddleFormers holds them in memory (its LoRA adapters target these names): q/k/v as
# ``qkv_proj`` (columns grouped per KV head) and gate/up as ``up_gate_proj`` ([gate | up]); DeepSeek and Mixtral keep
# their projections apart.
FUSED = {"llama": (), "mistral": (), "qwen2": (), "phi3": ("qkv_proj", "up_gate_proj"), "gemma3": (), "gpt_oss": (), "qwen3": ("qkv_proj", "up_gate_proj"), "qwen3_moe": ("qkv_proj", "up_gate_proj"),
         "qwen2_moe": ("qkv_proj", "up_gate_proj"), "glm4_moe": ("qkv_proj", "up_gate_proj"),
         "ernie4_5_moe": ("qkv_proj", "up_gate_proj"), "deepseek_v3": (), "mixtral": ()}
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")
# Families whose checkpoints store q/k/v as one [q | k | v] tensor (and gate/up as one [gate | up]): Phi-3
STORED_FUSED = frozenset({"phi3"})
# Families whose forward rotates only the first partial_rotary_factor of each head
PARTIAL_ROTARY = frozenset({"glm4_moe", "phi3"})
# Families a model library also builds (PaddleNLP: Llama, Qwen2): the library runs them where it computes what
# config.json declares; the decoder takes them where it would not (model/rope_config.py) or where no library that
# builds them is installed (Qwen2 in the PaddleFormers environment).
LIBRARY_FIRST = frozenset({"llama", "qwen2"})
DENSE = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"})
# The decoder-body prefix PaddleNLP 3.0.0b4 gives the families it builds (its checkpoints and LoRA adapters use it).
PADDLENLP_PREFIX = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "deepseek_v3": "deepseek_v3"}


def family_of(architecture: str | None, model_type: str | None) -> str | None:
    """The family of an architecture name (or, without one, of a ``model_type``), None when it is not one of ours."""
    if architecture:
        return ARCHITECTURES.get(architecture)
    return MODEL_TYPES.get(model_type or "")


@dataclass(frozen=True)
class RopeSpec:
    """What rotates: the base, the scaling type and its parameters, how many dims of a head, in which layout."""

    theta: float
    dim: int  # rotary dims per head (GLM: head_dim * partial_rotary_factor; DeepSeek: qk_rope_head_dim)
    layout: str  # "half" (NeoX: dims j and j + dim/2) | "interleaved" (pairs 2j, 2j+1: ERNIE, DeepSeek's rope_interleave)
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
    router: str  # "softmax" | "sigmoid"
    renormalize: str  # "none" | "sum" | "sum+eps" (1e-20) | "clamp" (max(sum, norm_min))
    norm_min: float = 0.0
    scaling: float = 1.0  # routed_scaling_factor
    groups: int = 1  # DeepSeek's group-limited selection: n_group, topk_group
    topk_groups: int = 1
    correction_bias: str | None = None  # tensor name under the MLP (selection only)
    shared_intermediate: int = 0
    shared_gated: bool = False  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared(x)
    shared_name: str = "shared_experts"
    router_bias: bool = False  # GPT-OSS: the router's linear map has a bias
    expert_bias: bool = False  # GPT-OSS: every expert's projections have biases
    activation: str = "silu"  # "silu" | "clamped_swiglu" (GPT-OSS: (clip(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit))
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702


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
    qk_norm: bool = False
    mla: dict | None = None  # DeepSeek: q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head_dim
    moe: MoeSpec | None = None
    moe_layers: frozenset[int] = frozenset()
    mlp_name: str = "mlp"  # Mixtral: block_sparse_moe
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    extra_layers: int = 0  # next-n / MTP layers in the checkpoint, never run when scoring
    biases: frozenset[str] = frozenset()  # modules whose bias config.json declares (q_proj, o_proj, gate_proj...)
    window: int | None = None  # the sliding window of the layers in local_layers
    # Gemma 3: GeLU (tanh) gate, RMSNorm weights as offsets from 1, the embedding scaled by sqrt(hidden), a norm
    # after attention and after the MLP, local layers (sliding window) with their own rotary base, a query scale,
    # soft-capped logits
    activation: str = "silu"  # "silu" | "gelu_tanh"
    norm_offset: float = 0.0
    embed_scale: float | None = None
    post_norms: bool = False
    local_layers: frozenset[int] = frozenset()  # sliding-window layers (Gemma 3: also their own rotary table)
    local_rope: RopeSpec | None = None
    query_scale: float | None = None  # the attention's scale when the config sets it (query_pre_attn_scalar^-0.5)
    final_softcap: float | None = None
    sinks: bool = False  # GPT-OSS: a learned logit per head that joins every softmax and takes its share of nothing
    notes: tuple[str, ...] = field(default=())

    @property
    def title(self) -> str:
        return TITLES[self.family]

    @property
    def exact_positions(self) -> int | None:
        """Positions the decoder computes exactly (None: any): LongRoPE's original context."""
        limits = []
        if self.rope.type == "longrope" and self.rope.long_factor != self.rope.short_factor:
            limits.append(self.rope.original_max)
        return min(limits) if limits else None

    @property
    def softmax_scale(self) -> float:
        """The attention's scale: ``head_dim^-0.5``; DeepSeek-V3 ``(qk_nope + qk_rope)^-0.5`` times YaRN's mscale^2."""
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


class _Config:
    """config.json with typed reads: a wrong type is refused naming the field."""

    def __init__(self, cfg: dict, where: str, family: str):
        self.cfg, self.where, self.family = cfg, where, family

    def get(self, key, default=None):
        v = self.cfg.get(key, default)
        return default if v is None else v

    def int(self, *keys, default=None) -> int:
        for k in keys:
            v = self.cfg.get(k)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    self.refuse(f"{k} is {v!r}, not a non-negative integer")
                return v
        if default is None:
            self.refuse(f"it has none of {', '.join(keys)}")
        return default

    def num(self, key, default) -> float:
        v = self.cfg.get(key, default)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.refuse(f"{key} is {v!r}, not a number")
        return float(v)

    def refuse(self, what: str):
        raise UnsupportedModelError(
            f"{self.where}/config.json of this {TITLES[self.family]} model cannot be computed: {what}; fix config.json "
            "(or tell us: paddle-scorer computes what HF transformers does for this family)."
        )


def rope_params(cfg: dict, family: str, where: str = "this model") -> dict:
    """One dict ``{rope_type, rope_theta, factor, ...}`` of what config.json declares in any dialect
    (:func:`paddle_scorer.model.rope_config.declared`), with the family's default base."""
    return rope_config.declared(cfg, where, DEFAULT_THETA.get(family, 10000.0))


def _rope(c: _Config, dim: int, layout: str, max_positions: int | None) -> tuple[RopeSpec, list[str]]:
    rp = rope_params(c.cfg, c.family, c.where)
    kind = rp["rope_type"]
    if kind not in ROPE_TYPES:
        c.refuse(f"rope type {kind!r} (the decoder computes {', '.join(ROPE_TYPES)})")
    notes = []
    factor = float(rp.get("factor") or 1.0)
    orig = rp.get("original_max_position_embeddings")
    if kind == "yarn" and orig and max_positions and abs(factor - max_positions / orig) > 1e-9:
        notes.append(f"YaRN factor {factor:g} as config.json gives it (transformers 5; transformers 4.x used "
                     f"max_position_embeddings / original_max_position_embeddings = {max_positions / orig:g})")
    spec = RopeSpec(theta=float(rp["rope_theta"]), dim=dim, layout=layout, type=kind, factor=factor,
                    original_max=int(orig) if orig else max_positions,
                    beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                    mscale=rp.get("mscale"), mscale_all_dim=rp.get("mscale_all_dim"),
                    attention_factor=rp.get("attention_factor"), truncate=bool(rp.get("truncate", True)),
                    low_freq_factor=float(rp.get("low_freq_factor") or 1.0),
                    high_freq_factor=float(rp.get("high_freq_factor") or 4.0))
    if kind == "longrope":
        spec = _longrope(c, rp, spec, max_positions)
    if kind == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if rp.get(k) is None:
                c.refuse(f"llama3 rotary scaling without {k}")
        if spec.low_freq_factor >= spec.high_freq_factor:
            c.refuse(f"llama3 rotary scaling with low_freq_factor {spec.low_freq_factor:g} >= high_freq_factor "
                     f"{spec.high_freq_factor:g}")
    return spec, notes


def _longrope(c: _Config, rp: dict, spec: RopeSpec, max_positions: int | None) -> RopeSpec:
    """LongRoPE (Phi-3's 128k models) as transformers computes it: ``inv_freq = 1 / (short_factor * base^(2i/d))``
    up to ``original_max_position_embeddings`` (config.json's top level, or the rope settings'), its attention factor
    ``sqrt(1 + ln(max / original) / ln(original))`` unless given. Past ``original`` transformers switches every position
    to the long factors: not computed here, refused at run time."""
    import dataclasses

    orig = c.cfg.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
    short, long_ = rp.get("short_factor"), rp.get("long_factor")
    half = spec.dim // 2
    for name, v in (("short_factor", short), ("long_factor", long_)):
        if not isinstance(v, list) or len(v) != half or not all(isinstance(x, (int, float)) and x > 0 for x in v):
            c.refuse(f"longrope {name} {str(v)[:60]} (one positive number per rotated frequency: {half})")
    if not isinstance(orig, int) or orig < 1:
        c.refuse("longrope without original_max_position_embeddings")
    factor = (max_positions / orig) if max_positions else float(rp.get("factor") or 1.0)
    att = rp.get("attention_factor")
    if att is None:
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return dataclasses.replace(spec, original_max=int(orig), factor=float(factor), attention_factor=float(att),
                               short_factor=tuple(float(x) for x in short), long_factor=tuple(float(x) for x in long_))


def _check_common(c: _Config) -> None:
    if c.family == "gemma3":
        act = c.get("hidden_activation", c.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            c.refuse(f"hidden_activation {act!r} (Gemma 3 uses gelu_pytorch_tanh)")
        for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if c.get(key):
                c.refuse(f"{key} {c.get(key)!r} (not computed by the decoder yet)")
        return
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        c.refuse(f"hidden_act {act!r} (these families use SiLU)")
    if c.family == "llama" and c.int("pretraining_tp", default=1) < 1:
        c.refuse("pretraining_tp below 1")


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _biases(c: _Config) -> frozenset[str]:
    """The modules whose bias the config declares, as transformers builds them: each must be in the checkpoint, and
    a bias on any other module is refused (transformers would not use it)."""
    f, on = c.family, lambda key, default=False: bool(c.get(key, default))
    if f == "gpt_oss":
        return frozenset(_ATTN) if on("attention_bias", True) else frozenset()
    if f in ("llama", "qwen3", "qwen3_moe", "gemma3"):
        out = set(_ATTN) if on("attention_bias") else set()
        if f == "llama" and on("mlp_bias"):
            out |= {"gate_proj", "up_proj", "down_proj"}
        return frozenset(out)
    if f == "qwen2":
        return frozenset(_ATTN[:3])
    if f == "qwen2_moe":
        return frozenset(_ATTN[:3]) if on("qkv_bias", True) else frozenset()
    if f == "glm4_moe":
        return frozenset(_ATTN[:3]) if on("attention_bias") else frozenset()
    if f == "deepseek_v3":
        return frozenset({"q_a_proj", "kv_a_proj_with_mqa", "o_proj"}) if on("attention_bias") else frozenset()
    if f == "ernie4_5_moe" and on("use_bias"):
        c.refuse("use_bias true (transformers 4.55 and 5 disagree on whether its experts carry biases)")
    return frozenset()


def _window(c: _Config, layers: int) -> tuple[int | None, frozenset[int]]:
    """The sliding window and the layers that attend through it (None, nothing: every layer sees the whole
    sequence), as transformers builds them. Mistral, Mixtral, Phi-3: ``sliding_window`` on every layer when set;
    Qwen2/Qwen3(-MoE): ``use_sliding_window`` for the layers from ``max_window_layers`` on, or ``layer_types``; Gemma 3:
    ``layer_types`` or every layer but each ``sliding_window_pattern``-th."""
    w = c.cfg.get("sliding_window")
    types = c.cfg.get("layer_types")
    if c.family in ("mistral", "mixtral", "phi3"):
        sliding = frozenset(range(layers)) if w is not None else frozenset()
    elif c.family == "gpt_oss" and not (isinstance(types, list) and types):  # transformers' default: alternate
        sliding = frozenset(i for i in range(layers) if (i + 1) % 2) if w is not None else frozenset()
    elif c.family == "gemma3" and not (isinstance(types, list) and types):
        pattern = c.int("sliding_window_pattern", default=6)  # transformers 4.5x's default: 5 local, 1 global
        sliding = frozenset(i for i in range(layers) if (i + 1) % max(pattern, 1))
    elif isinstance(types, list) and types:
        if len(types) != layers or any(t not in ("full_attention", "sliding_attention") for t in types):
            c.refuse(f"layer_types {types!r} (one of full_attention / sliding_attention per layer)")
        sliding = frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
    elif c.get("use_sliding_window", False):
        sliding = frozenset(range(c.int("max_window_layers", default=layers), layers))
    else:
        sliding = frozenset()
    if not sliding:
        return None, frozenset()
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        c.refuse(f"sliding_window {w!r} with sliding layers (a positive number of tokens)")
    return w, sliding


def _global_rope_view(cfg: dict) -> dict:
    """config.json with transformers 5's per-layer-type rotary settings narrowed to the full-attention layers'."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()) and "full_attention" in rp:
        return {**cfg, "rope_parameters": rp["full_attention"]}
    return cfg


def _gemma3(c: _Config, layers: int, rot_dim: int, max_pos: int | None) -> dict:
    """What Gemma 3 adds (transformers' Gemma3ForCausalLM): local (sliding-window) layers from ``layer_types`` or
    ``sliding_window_pattern``, each kind with its own rotary settings (transformers 5: ``rope_parameters`` per layer
    type; 4.x: ``rope_theta`` + ``rope_scaling`` for the global layers, ``rope_local_base_freq`` for the local ones),
    RMSNorm weights as offsets from 1, the embedding times sqrt(hidden), ``query_pre_attn_scalar``, soft-capped
    logits."""
    rp = c.cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        unknown = set(rp) - {"full_attention", "sliding_attention"}
        if unknown:
            c.refuse(f"rope_parameters for layer types {sorted(unknown)}")
        global_cfg = {**c.cfg, "rope_parameters": rp.get("full_attention", {})}
        local_cfg = {"rope_parameters": rp.get("sliding_attention", {"rope_type": "default"}),
                     "rope_theta": None}
    else:
        global_cfg = c.cfg
        local_cfg = {"rope_theta": c.num("rope_local_base_freq", 10000.0)}
    out = {}
    for key, view in (("rope", global_cfg), ("local_rope", local_cfg)):
        sub = _Config(view, c.where, c.family)
        out[key], notes = _rope(sub, rot_dim, "half", max_pos)
        out.setdefault("notes", []).extend(notes)
    scalar = c.num("query_pre_attn_scalar", 256.0)
    if scalar <= 0:
        c.refuse(f"query_pre_attn_scalar {scalar:g} (a positive number)")
    cap = c.cfg.get("final_logit_softcapping")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        c.refuse(f"final_logit_softcapping {cap!r} (a positive number, or null)")
    return dict(query_scale=scalar ** -0.5, final_softcap=float(cap) if cap else None, activation="gelu_tanh",
                norm_offset=1.0, post_norms=True, qk_norm=True, **out)


def _moe_layers(c: _Config, layers: int) -> frozenset[int]:
    f = c.family
    if f in ("qwen3_moe", "qwen2_moe"):
        only, step = set(c.get("mlp_only_layers", []) or []), c.int("decoder_sparse_step", default=1) or 1
        return frozenset(i for i in range(layers) if i not in only and (i + 1) % step == 0)
    if f in ("deepseek_v3", "glm4_moe"):
        freq = c.int("moe_layer_freq", default=1)
        if freq != 1:
            c.refuse(f"moe_layer_freq {freq} (transformers computes every layer from first_k_dense_replace on)")
        return frozenset(range(c.int("first_k_dense_replace", default=0), layers))
    if f == "ernie4_5_moe":
        start, end = c.int("moe_layer_start_index", default=1), c.cfg.get("moe_layer_end_index", -1)
        end = layers - 1 if end in (None, -1) else end
        step = c.int("moe_layer_interval", default=1) or 1
        return frozenset(i for i in range(layers) if (i + 1) % step == 0 and start <= i <= end)
    if f in ("mixtral", "gpt_oss"):
        return frozenset(range(layers))
    return frozenset()


def _moe(c: _Config) -> MoeSpec | None:
    f = c.family
    if f in DENSE:
        return None
    experts = c.int("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    top_k = c.int("num_experts_per_tok", "moe_k")
    if not 1 <= top_k <= experts:
        c.refuse(f"num_experts_per_tok {top_k} with {experts} experts (each token goes to between 1 and all of them)")
    inter = c.int("moe_intermediate_size", "intermediate_size")
    if f == "mixtral":
        return MoeSpec(experts, top_k, c.int("intermediate_size"), "softmax", "sum")
    if f == "gpt_oss":  # top-k of the router's logits (with its bias), then a softmax over those k
        limit = c.num("swiglu_limit", 7.0)
        if limit <= 0:
            c.refuse(f"swiglu_limit {limit:g} (a positive number)")
        return MoeSpec(experts, top_k, c.int("intermediate_size"), "topk_softmax", "none", router_bias=True,
                       expert_bias=True, activation="clamped_swiglu", swiglu_limit=limit)
    if f in ("qwen3_moe", "qwen2_moe"):
        shared = c.int("shared_expert_intermediate_size", default=0) if f == "qwen2_moe" else 0
        return MoeSpec(experts, top_k, inter, "softmax", "sum" if c.get("norm_topk_prob", False) else "none",
                       shared_intermediate=shared, shared_gated=shared > 0, shared_name="shared_expert")
    if f in ("deepseek_v3", "glm4_moe"):
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if c.get(key, want) != want:
                c.refuse(f"{key} {c.get(key)!r} (transformers computes {want})")
        groups = c.int("n_group", default=1) or 1
        if experts % groups or experts // groups < 2:
            c.refuse(f"n_group {groups} does not split {experts} experts into groups of at least 2")
        kept = c.int("topk_group", default=1) or 1
        if kept > groups or kept * (experts // groups) < top_k:
            c.refuse(f"topk_group {kept} of n_group {groups} groups leaves fewer than num_experts_per_tok {top_k} "
                     "experts to choose from")
        return MoeSpec(experts, top_k, inter, "sigmoid", "sum+eps" if c.get("norm_topk_prob", True) else "none",
                       scaling=c.num("routed_scaling_factor", 1.0), groups=groups,
                       topk_groups=c.int("topk_group", default=1) or 1, correction_bias="gate.e_score_correction_bias",
                       shared_intermediate=inter * c.int("n_shared_experts", default=0))
    # ernie4_5_moe
    return MoeSpec(experts, top_k, inter, "softmax", "clamp", norm_min=c.num("moe_norm_min", 1e-12),
                   correction_bias="moe_statics.e_score_correction_bias",
                   shared_intermediate=inter * c.int("moe_num_shared_experts", default=0))


def read(cfg: dict, where: str) -> FamilyConfig:
    """The normalized config of a family's config.json (:func:`family_of` must know it)."""
    arch = (cfg.get("architectures") or [None])[0]
    family = family_of(arch, cfg.get("model_type"))
    c = _Config(cfg, where, family)
    _check_common(c)
    hidden, heads = c.int("hidden_size"), c.int("num_attention_heads")
    layers = c.int("num_hidden_layers")
    kv = c.int("num_key_value_heads", default=heads)
    if not heads or heads % max(kv, 1):
        c.refuse(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if family == "deepseek_v3":
        mla = {"q_lora_rank": c.cfg.get("q_lora_rank"), "kv_lora_rank": c.int("kv_lora_rank"),
               "qk_nope": c.int("qk_nope_head_dim"), "qk_rope": c.int("qk_rope_head_dim"), "v_head_dim": c.int("v_head_dim")}
        head_dim = mla["qk_nope"] + mla["qk_rope"]
        rot_dim, layout = mla["qk_rope"], "interleaved" if c.get("rope_interleave", True) else "half"
    else:
        mla = None
        default_dim = 128 if family == "qwen3" else hidden // heads
        head_dim = c.int("head_dim", default=default_dim)
        # GLM-4.5 rotates the first partial_rotary_factor of each head; the other families' forwards rotate whole
        # heads (transformers sizes their tables by the factor, then fails on the shapes): refused, not ignored
        partial = float(rope_params(_global_rope_view(cfg), family, where).get("partial_rotary_factor", 1.0))
        if family not in PARTIAL_ROTARY and partial != 1.0:
            c.refuse(f"partial_rotary_factor {partial:g} (this family's forward rotates whole heads)")
        if not 0 < partial <= 1 or (head_dim * partial) % 2:
            c.refuse(f"partial_rotary_factor {partial:g} (an even number of a head's {head_dim} dims, up to all)")
        rot_dim = int(head_dim * partial)
        layout = "interleaved" if family == "ernie4_5_moe" else "half"
    max_pos = cfg.get("max_position_embeddings") if isinstance(cfg.get("max_position_embeddings"), int) else None
    extras: dict = {}
    if family == "gemma3":
        extras = _gemma3(c, layers, rot_dim, max_pos)
        rope, notes = extras.pop("rope"), extras.pop("notes")
        extras["embed_scale"] = float(hidden) ** 0.5
    else:
        rope, notes = _rope(c, rot_dim, layout, max_pos)
    moe = _moe(c)
    extra = c.int("num_nextn_predict_layers", default=0)
    window, sliding = _window(c, layers)
    if window is not None:
        where_ = "every layer" if len(sliding) == layers else f"{len(sliding)} of {layers} layers"
        notes.append(f"sliding window of {window} tokens on {where_}")
    if extra:
        notes.append(f"the checkpoint's {extra} next-n (MTP) layer(s) are not run: they predict further tokens, "
                     "not the next one")
    return FamilyConfig(
        family=family, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim,
        vocab=c.int("vocab_size"), eps=c.num("rms_norm_eps", DEFAULT_EPS.get(family, 1e-6)),
        intermediate=c.int("intermediate_size", default=4 * hidden),
        tie=bool(cfg.get("tie_word_embeddings", family in ("ernie4_5_moe", "gemma3"))), rope=rope, max_positions=max_pos,
        qk_norm=extras.pop("qk_norm", family in ("qwen3", "qwen3_moe") or (family == "glm4_moe"
                                                                              and bool(c.get("use_qk_norm", False)))),
        mla=mla, moe=moe, moe_layers=_moe_layers(c, layers) if moe else frozenset(),
        mlp_name="block_sparse_moe" if family == "mixtral" else "mlp",
        expert_names=("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj"),
        extra_layers=extra, biases=_biases(c), window=window, local_layers=sliding, notes=tuple(notes),
        sinks=family == "gpt_oss", **extras,
    )
