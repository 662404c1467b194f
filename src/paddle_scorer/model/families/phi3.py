"""Phi-3 / Phi-4-mini: q/k/v stored as one ``qkv_proj`` (``[q | k | v]``, run grouped per KV head) and gate/up as one
``gate_up_proj`` (``[gate | up]``), partial rotary, LongRoPE (short factors up to ``original_max_position_embeddings``),
``sliding_window`` on every layer when set."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family

FAMILY = Family(
    name="phi3", title="Phi-3", architectures=("Phi3ForCausalLM",), fused=("qkv_proj", "up_gate_proj"),
    stored_fused=True, default_eps=1e-5, partial_rotary=True, window_on_every_layer=True,
    renames=((".mlp.gate_up_proj.", ".mlp.up_gate_proj."),),
)
