"""Mixtral: a softmax router, top-k always renormalised, experts ``w1``/``w3``/``w2`` under ``block_sparse_moe``
(transformers 5 names them ``mlp.``: renamed on load), ``sliding_window`` on every layer when set."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family, MoeSpec

FAMILY = Family(
    name="mixtral", title="Mixtral", architectures=("MixtralForCausalLM",), default_theta=1e6, default_eps=1e-5,
    mlp_name="block_sparse_moe", expert_names=("w1", "w3", "w2"), paddlenlp_prefix="mixtral",
    renames=((".mlp.gate.", ".block_sparse_moe.gate."), (".mlp.experts.", ".block_sparse_moe.experts.")),
    window_on_every_layer=True,
    moe=lambda c, experts, top_k, inter: MoeSpec(experts, top_k, c.int("intermediate_size"), "softmax", "sum"),
)
