"""DeepSeek-V3: multi-head latent attention (low-rank q, compressed kv with one shared rotary key, their norms; RoPE on
``qk_rope_head_dim``, interleaved by default; YaRN with its mscale^2 in the softmax scale); a sigmoid router whose
correction bias chooses experts but does not weigh them, group-limited choice, renormalised, times
``routed_scaling_factor``; an ungated shared expert; the first ``first_k_dense_replace`` layers dense."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family, MoeSpec


def _attention(c, hidden: int, heads: int):
    mla = {"q_lora_rank": c.cfg.get("q_lora_rank"), "kv_lora_rank": c.int("kv_lora_rank"),
           "qk_nope": c.int("qk_nope_head_dim"), "qk_rope": c.int("qk_rope_head_dim"), "v_head_dim": c.int("v_head_dim")}
    layout = "interleaved" if c.get("rope_interleave", True) else "half"
    return mla["qk_nope"] + mla["qk_rope"], mla["qk_rope"], layout, mla


def sigmoid_router(c, experts: int, top_k: int, inter: int) -> MoeSpec:
    """DeepSeek's router (GLM-4.5 shares it): sigmoid scores, a correction bias for the choice, ``n_group`` groups of
    which ``topk_group`` are kept, renormalised when ``norm_topk_prob``, scaled."""
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if c.get(key, want) != want:
            c.refuse(f"{key} {c.get(key)!r} (transformers computes {want})")
    groups = c.int("n_group", default=1) or 1
    if experts % groups or experts // groups < 2:
        c.refuse(f"n_group {groups} does not split {experts} experts into groups of at least 2")
    kept = c.int("topk_group", default=1) or 1
    if kept > groups or kept * (experts // groups) < top_k:
        c.refuse(f"topk_group {kept} of n_group {groups} groups leaves fewer than num_experts_per_tok {top_k} experts "
                 "to choose from")
    return MoeSpec(experts, top_k, inter, "sigmoid", "sum+eps" if c.get("norm_topk_prob", True) else "none",
                   scaling=c.num("routed_scaling_factor", 1.0), groups=groups, topk_groups=kept,
                   correction_bias="gate.e_score_correction_bias",
                   shared_intermediate=inter * c.int("n_shared_experts", default=0))


def dense_first(c, layers: int) -> frozenset[int]:
    """MoE from ``first_k_dense_replace`` on (``moe_layer_freq`` other than 1 refused)."""
    freq = c.int("moe_layer_freq", default=1)
    if freq != 1:
        c.refuse(f"moe_layer_freq {freq} (transformers computes every layer from first_k_dense_replace on)")
    return frozenset(range(c.int("first_k_dense_replace", default=0), layers))


FAMILY = Family(
    name="deepseek_v3", title="DeepSeek-V3",
    architectures=("DeepseekV3ForCausalLM", "DeepseekV3ForCausalLMDeprecated"), paddlenlp_prefix="deepseek_v3",
    attention=_attention, moe=sigmoid_router, moe_layers=dense_first,
    biases=lambda c: frozenset({"q_a_proj", "kv_a_proj_with_mqa", "o_proj"}) if c.get("attention_bias", False)
    else frozenset(),
)
