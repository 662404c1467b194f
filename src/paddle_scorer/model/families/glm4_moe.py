"""GLM-4.5: partial rotary (``partial_rotary_factor``), q/k/v biases when ``attention_bias``, an optional q/k norm,
DeepSeek's router with a shared expert, dense layers before ``first_k_dense_replace``."""

from __future__ import annotations

from paddle_scorer.model.families.deepseek_v3 import dense_first, sigmoid_router
from paddle_scorer.model.families.spec import ATTENTION, Family, attention_biases

FAMILY = Family(
    name="glm4_moe", title="GLM-4.5", architectures=("Glm4MoeForCausalLM", "Glm4MoeForCausalLMDeprecated"),
    fused=("qkv_proj", "up_gate_proj"), default_eps=1e-5, partial_rotary=True,
    qk_norm=lambda c: bool(c.get("use_qk_norm", False)),
    biases=lambda c: attention_biases(c, modules=ATTENTION[:3]), moe=sigmoid_router, moe_layers=dense_first,
)
