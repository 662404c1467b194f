"""Qwen3-MoE: Qwen3's attention; a softmax router, top-k, renormalised when ``norm_topk_prob``; no shared expert;
dense layers in ``mlp_only_layers`` and off ``decoder_sparse_step``; with ``use_sliding_window`` the window applies
to every layer (transformers passes ``sliding_window`` to each, ``max_window_layers`` unread)."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family, MoeSpec, attention_biases


def sparse_layers(c, layers: int) -> frozenset[int]:
    """Qwen's MoE layers: every ``decoder_sparse_step``-th, except those in ``mlp_only_layers``."""
    only, step = set(c.get("mlp_only_layers", []) or []), c.int("decoder_sparse_step", default=1) or 1
    return frozenset(i for i in range(layers) if i not in only and (i + 1) % step == 0)


def _moe(c, experts: int, top_k: int, inter: int) -> MoeSpec:
    return MoeSpec(experts, top_k, inter, "softmax", "sum" if c.get("norm_topk_prob", False) else "none")


FAMILY = Family(
    name="qwen3_moe", title="Qwen3-MoE", architectures=("Qwen3MoeForCausalLM", "Qwen3MoeForCausalLMDeprecated"),
    fused=("qkv_proj", "up_gate_proj"), default_head_dim=128, qk_norm=lambda c: True, biases=attention_biases,
    moe=_moe, moe_layers=sparse_layers, window_on_every_layer=True, window_needs_flag=True,
)
