"""Qwen2-MoE: q/k/v biases (``qkv_bias``), a softmax router whose top-k are renormalised only when ``norm_topk_prob``
(PaddleNLP's own gate ignores it; transformers honours it), a shared expert scaled by ``sigmoid(shared_expert_gate(x))``,
Qwen's sparse layers."""

from __future__ import annotations

from paddle_scorer.model.families.qwen3_moe import sparse_layers
from paddle_scorer.model.families.spec import ATTENTION, Family, MoeSpec, attention_biases


def _moe(c, experts: int, top_k: int, inter: int) -> MoeSpec:
    shared = c.int("shared_expert_intermediate_size", default=0)
    return MoeSpec(experts, top_k, inter, "softmax", "sum" if c.get("norm_topk_prob", False) else "none",
                   shared_intermediate=shared, shared_gated=shared > 0, shared_name="shared_expert")


def _check(c) -> None:
    if c.get("use_sliding_window", False):  # 4.55 slides the layers from max_window_layers on, 5.3 some below it
        c.refuse("use_sliding_window true (transformers 4.55 and 5 disagree on which layers slide)")


FAMILY = Family(
    name="qwen2_moe", title="Qwen2-MoE", architectures=("Qwen2MoeForCausalLM", "Qwen2MoeForCausalLMDeprecated"),
    fused=("qkv_proj", "up_gate_proj"), paddlenlp_prefix="qwen2_moe",
    biases=lambda c: attention_biases(c, "qkv_bias", True, ATTENTION[:3]), moe=_moe, moe_layers=sparse_layers,
    check=_check,
)
