"""ERNIE 4.5 MoE: a float32 softmax router whose ``moe_statics`` correction bias chooses experts but does not weigh
them, weights renormalised with ``moe_norm_min``, ungated shared experts, dense layers before
``moe_layer_start_index``; interleaved rotary pairs; a tied head by default. PaddleFormers builds it with GPU-only
kernels: the decoder computes it on a CPU."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family, MoeSpec


def _moe(c, experts: int, top_k: int, inter: int) -> MoeSpec:
    return MoeSpec(experts, top_k, inter, "softmax", "clamp", norm_min=c.num("moe_norm_min", 1e-12),
                   correction_bias="moe_statics.e_score_correction_bias",
                   shared_intermediate=inter * c.int("moe_num_shared_experts", default=0))


def _moe_layers(c, layers: int) -> frozenset[int]:
    start, end = c.int("moe_layer_start_index", default=1), c.cfg.get("moe_layer_end_index", -1)
    end = layers - 1 if end in (None, -1) else end
    step = c.int("moe_layer_interval", default=1) or 1
    return frozenset(i for i in range(layers) if (i + 1) % step == 0 and start <= i <= end)


def _biases(c) -> frozenset[str]:
    if c.get("use_bias", False):
        c.refuse("use_bias true (transformers 4.55 and 5 disagree on whether its experts carry biases)")
    return frozenset()


FAMILY = Family(
    name="ernie4_5_moe", title="ERNIE 4.5 MoE", architectures=("Ernie4_5_MoeForCausalLM",),
    fused=("qkv_proj", "up_gate_proj"), default_theta=500000.0, default_eps=1e-5, tie_default=True,
    rotary_layout="interleaved", renames=((".mlp.gate.moe_statics.", ".mlp.moe_statics."),),
    moe=_moe, moe_layers=_moe_layers, biases=_biases,
)
