"""Qwen3 (dense): RMSNorm per head on q and k before RoPE, an explicit head_dim (128 by default), q/k/v/o biases when
``attention_bias``. PaddleFormers 1.2.0 builds it only through paddlefleet (not on the package index)."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family, attention_biases

FAMILY = Family(
    name="qwen3", title="Qwen3", architectures=("Qwen3ForCausalLM", "Qwen3ForCausalLMDeprecated"),
    fused=("qkv_proj", "up_gate_proj"), default_head_dim=128, qk_norm=lambda c: True, biases=attention_biases,
)
