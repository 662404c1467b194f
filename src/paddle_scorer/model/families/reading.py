"""config.json read into a :class:`~paddle_scorer.model.families.spec.FamilyConfig`: the parts every family shares
(sizes, rotary settings in every dialect, sliding windows, experts' counts), each family's own parts through the
hooks of its :class:`~paddle_scorer.model.families.spec.Family`. A value the decoder does not compute is refused
naming the field, never ignored. Pure: no paddle."""

from __future__ import annotations

import dataclasses
import math

from paddle_scorer.errors import UnsupportedModelError
from paddle_scorer.model import rope_config
from paddle_scorer.model.families.spec import ROPE_TYPES, Family, FamilyConfig, RopeSpec


class ConfigReader:
    """config.json with typed reads: a wrong type is refused naming the field."""

    def __init__(self, cfg: dict, where: str, kind: Family):
        self.cfg, self.where, self.kind = cfg, where, kind

    @property
    def family(self) -> str:
        return self.kind.name

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

    def view(self, cfg: dict) -> "ConfigReader":
        return ConfigReader(cfg, self.where, self.kind)

    def refuse(self, what: str):
        raise UnsupportedModelError(
            f"{self.where}/config.json of this {self.kind.title} model cannot be computed: {what}; fix config.json "
            "(or tell us: paddle-scorer computes what HF transformers does for this family)."
        )


def global_rope_view(cfg: dict) -> dict:
    """config.json with transformers 5's per-layer-type rotary settings narrowed to the full-attention layers'."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()) and "full_attention" in rp:
        return {**cfg, "rope_parameters": rp["full_attention"]}
    return cfg


def rope(c: ConfigReader, dim: int, layout: str, max_positions: int | None) -> tuple[RopeSpec, list[str]]:
    """The declared rotary settings (:func:`paddle_scorer.model.rope_config.declared`, every dialect) as a spec."""
    rp = rope_config.declared(c.cfg, c.where, c.kind.default_theta)
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


def _longrope(c: ConfigReader, rp: dict, spec: RopeSpec, max_positions: int | None) -> RopeSpec:
    """LongRoPE as transformers computes it: ``inv_freq = 1 / (short_factor * base^(2i/d))`` up to
    ``original_max_position_embeddings`` (config.json's top level, or the rope settings'), its attention factor
    ``sqrt(1 + ln(max / original) / ln(original))`` unless given. Past ``original`` transformers switches every position
    to the long factors: not computed here, refused at run time."""
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


def window(c: ConfigReader, layers: int) -> tuple[int | None, frozenset[int]]:
    """The sliding window and the layers that attend through it (None, nothing: every layer sees the whole
    sequence), as transformers builds them: ``sliding_window`` on every layer for the families that say so,
    ``layer_types`` where config.json lists them, else the family's default layer types, else ``use_sliding_window``
    for the layers from ``max_window_layers`` on."""
    w = c.cfg.get("sliding_window")
    types = c.cfg.get("layer_types")
    if c.kind.window_on_every_layer:
        on = w is not None and (not c.kind.window_needs_flag or bool(c.get("use_sliding_window", False)))
        sliding = frozenset(range(layers)) if on else frozenset()
    elif isinstance(types, list) and types:
        if len(types) != layers or any(t not in ("full_attention", "sliding_attention") for t in types):
            c.refuse(f"layer_types {types!r} (one of full_attention / sliding_attention per layer)")
        sliding = frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
    elif c.kind.default_layer_types is not None:
        sliding = c.kind.default_layer_types(c, layers) if w is not None else frozenset()
    elif c.get("use_sliding_window", False):
        sliding = frozenset(range(c.int("max_window_layers", default=layers), layers))
    else:
        sliding = frozenset()
    if not sliding:
        return None, frozenset()
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        c.refuse(f"sliding_window {w!r} with sliding layers (a positive number of tokens)")
    return w, sliding


def experts(c: ConfigReader):
    """``(experts, top_k, intermediate)`` in any family's spelling, top-k checked against the expert count."""
    n = c.int("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    top_k = c.int("num_experts_per_tok", "moe_k")
    if not 1 <= top_k <= n:
        c.refuse(f"num_experts_per_tok {top_k} with {n} experts (each token goes to between 1 and all of them)")
    return n, top_k, c.int("moe_intermediate_size", "intermediate_size")


def _attention_dims(c: ConfigReader, hidden: int, heads: int) -> tuple[int, int, str, dict | None]:
    kind = c.kind
    if kind.attention is not None:
        return kind.attention(c, hidden, heads)
    head_dim = c.int("head_dim", default=kind.default_head_dim or hidden // heads)
    partial = rope_config.declared(global_rope_view(c.cfg), c.where, kind.default_theta).get("partial_rotary_factor")
    if partial is None:
        partial = 1.0
    if isinstance(partial, bool) or not isinstance(partial, (int, float)):
        c.refuse(f"partial_rotary_factor {partial!r} (a number between 0 and 1)")
    partial = float(partial)
    if not kind.partial_rotary and partial != 1.0:
        c.refuse(f"partial_rotary_factor {partial:g} (this family's forward rotates whole heads)")
    if not 0 < partial <= 1 or (head_dim * partial) % 2:
        c.refuse(f"partial_rotary_factor {partial:g} (an even number of a head's {head_dim} dims, up to all)")
    return head_dim, int(head_dim * partial), kind.rotary_layout, None


def read(cfg: dict, where: str, kind: Family) -> FamilyConfig:
    """The normalized config of a config.json of family ``kind``."""
    c = ConfigReader(cfg, where, kind)
    act = kind.activation(c)
    if kind.check is not None:
        kind.check(c)
    hidden, heads = c.int("hidden_size"), c.int("num_attention_heads")
    layers = c.int("num_hidden_layers")
    kv = c.int("num_key_value_heads", default=heads)
    if not heads or heads % max(kv, 1):
        c.refuse(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim, rot_dim, layout, mla = _attention_dims(c, hidden, heads)
    max_pos = cfg.get("max_position_embeddings") if isinstance(cfg.get("max_position_embeddings"), int) else None
    fields = kind.extras(c, layers, rot_dim, max_pos) if kind.extras is not None else {}
    if "rope" in fields:
        spec, notes = fields.pop("rope"), fields.pop("notes", [])
    else:
        spec, notes = rope(c, rot_dim, layout, max_pos)
    moe = kind.moe(c, *experts(c)) if kind.moe is not None else None
    extra = c.int("num_nextn_predict_layers", default=0)
    w, sliding = window(c, layers)
    if w is not None:
        on = "every layer" if len(sliding) == layers else f"{len(sliding)} of {layers} layers"
        notes.append(f"sliding window of {w} tokens on {on}")
    if extra:
        notes.append(f"the checkpoint's {extra} next-n (MTP) layer(s) are not run: they predict further tokens, "
                     "not the next one")
    fields.setdefault("qk_norm", bool(kind.qk_norm(c)))
    return FamilyConfig(
        family=kind.name, kind=kind, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim,
        vocab=c.int("vocab_size"), eps=c.num("rms_norm_eps", kind.default_eps),
        intermediate=c.int("intermediate_size", default=4 * hidden),
        tie=bool(cfg.get("tie_word_embeddings", kind.tie_default)), rope=spec, max_positions=max_pos,
        mla=mla, moe=moe, moe_layers=kind.moe_layers(c, layers) if moe else frozenset(),
        mlp_name=kind.mlp_name, expert_names=kind.expert_names, extra_layers=extra, biases=kind.biases(c),
        window=w, local_layers=sliding, activation=act, notes=tuple(notes), **fields,
    )
