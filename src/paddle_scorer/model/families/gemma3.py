"""Gemma 3 (text): GeLU (tanh) gate, RMSNorm as ``(1 + weight)``, a norm after the attention and one before and after
the MLP, q/k norms, the embedding times sqrt(hidden), local layers (sliding window, their own rotary base) and global
ones (``rope_theta`` with its scaling), ``query_pre_attn_scalar``, final logit soft-capping, a tied head."""

from __future__ import annotations

from paddle_scorer.model.families import reading
from paddle_scorer.model.families.spec import Family, attention_biases


def _activation(c) -> str:
    act = c.get("hidden_activation", c.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        c.refuse(f"hidden_activation {act!r} (Gemma 3 uses gelu_pytorch_tanh)")
    return "gelu_tanh"


def _check(c) -> None:
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if c.get(key):
            c.refuse(f"{key} {c.get(key)!r} (not computed by the decoder yet)")


def _layer_types(c, layers: int) -> frozenset[int]:
    """transformers 4.5x's default: every ``sliding_window_pattern``-th layer global, the others local."""
    pattern = c.int("sliding_window_pattern", default=6)
    return frozenset(i for i in range(layers) if (i + 1) % max(pattern, 1))


def _extras(c, layers: int, rot_dim: int, max_pos: int | None) -> dict:
    """Each kind of layer with its own rotary settings (transformers 5: ``rope_parameters`` per layer type; 4.x:
    ``rope_theta`` + ``rope_scaling`` for the global layers, ``rope_local_base_freq`` for the local ones), the
    norms' offset, the embedding scale, ``query_pre_attn_scalar``, soft-capped logits."""
    rp = c.cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        unknown = set(rp) - {"full_attention", "sliding_attention"}
        if unknown:
            c.refuse(f"rope_parameters for layer types {sorted(unknown)}")
        global_cfg = {**c.cfg, "rope_parameters": rp.get("full_attention", {})}
        local = dict(rp.get("sliding_attention", {"rope_type": "default"}))
        local.setdefault("rope_theta", c.num("rope_local_base_freq", 10000.0))  # transformers 5's default for them
        local_cfg = {"rope_parameters": local, "rope_theta": None}
    else:
        global_cfg = c.cfg
        local_cfg = {"rope_theta": c.num("rope_local_base_freq", 10000.0)}
    out: dict = {"notes": []}
    for key, view in (("rope", global_cfg), ("local_rope", local_cfg)):
        out[key], notes = reading.rope(c.view(view), rot_dim, "half", max_pos)
        out["notes"] += notes
    scalar = c.num("query_pre_attn_scalar", 256.0)
    if scalar <= 0:
        c.refuse(f"query_pre_attn_scalar {scalar:g} (a positive number)")
    cap = c.cfg.get("final_logit_softcapping")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        c.refuse(f"final_logit_softcapping {cap!r} (a positive number, or null)")
    return dict(query_scale=scalar ** -0.5, final_softcap=float(cap) if cap else None, norm_offset=1.0,
                post_norms=True, embed_scale=float(c.int("hidden_size")) ** 0.5, **out)


FAMILY = Family(
    name="gemma3", title="Gemma 3", architectures=("Gemma3ForCausalLM",), model_types=("gemma3_text",),
    default_theta=1e6, tie_default=True, qk_norm=lambda c: True, activation=_activation, check=_check,
    default_layer_types=_layer_types, biases=attention_biases, extras=_extras,
)
