"""Every parameter of each family's configuration class (transformers' ``__init__`` signature, in both environments:
4.55 beside PaddleNLP, 5.x beside PaddleFormers), classified: what the decoder reads (:data:`READ`: sizes, rotary
settings, routers, biases, windows, each in :mod:`paddle_scorer.model.families` or
:mod:`paddle_scorer.model.rope_config`, refused there when set to a value the decoder does not compute) or what does
not change an eval forward on a CPU (:data:`INERT`). ``tests/test_model_family_fields.py`` reads the installed
signatures: a field a new transformers release adds fails the suite until it is classified here, so no field is
ignored silently (the same rule :mod:`paddle_scorer.compute.config_support` applies to the libraries' forwards)."""

from __future__ import annotations

READ = frozenset({
    # sizes
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "hidden_act",
    # rotary (model/rope_config.py)
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rope_interleave",
    "original_max_position_embeddings",
    # biases (families._biases)
    "attention_bias", "mlp_bias", "qkv_bias", "use_bias",
    # sliding windows (families._window)
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    # experts and routers (families._moe, families._moe_layers)
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok", "moe_k",
    "moe_intermediate_size", "shared_expert_intermediate_size", "n_shared_experts", "moe_num_shared_experts",
    "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "moe_norm_min", "decoder_sparse_step",
    "mlp_only_layers", "first_k_dense_replace", "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval",
    # attention variants
    "use_qk_norm", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    # Gemma 3 (families._gemma3, _check_common)
    "hidden_activation", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
    "rope_local_base_freq", "use_bidirectional_attention", "sliding_window_pattern",
    # checked to be what the forward does with it (families._check_common): Llama 2's tensor-parallel slicing is the
    # same product split in pieces
    "pretraining_tp",
})

INERT = frozenset({
    # training only: dropout, init, the router's auxiliary loss and jitter noise (applied in training mode only)
    "attention_dropout", "initializer_range", "router_aux_loss_coef", "router_jitter_noise", "output_router_logits",
    "resid_pdrop", "embd_pdrop",
    # token ids (tokenizer and generation bookkeeping; the embedding's padding row only matters for training) and the
    # cache switch
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
})


def unclassified(names) -> list[str]:
    """The parameters among ``names`` classified neither way."""
    return sorted(n for n in names if n not in READ and n not in INERT and n not in ("self", "kwargs"))
