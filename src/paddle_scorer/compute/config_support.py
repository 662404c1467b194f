"""Which config fields the CPU decoder implements, for every field the libraries' forwards read.

A field the library's forward reads but the decoder ignored would make the decoder compute another model and
say nothing (a Qwen2 with ``hidden_act: gelu`` computed with SiLU). So every field a library's modeling code
reads is classified here, once:

* :data:`IMPLEMENTED`: the decoder reads it (sizes, eps, ties) or takes what it means from the model itself (the
  rotary tables from the library's own rotary module, biases and fused projections from the weights present);
* :data:`INERT`: it does not change an eval-mode forward in one process on a CPU in float32 (parallelism,
  recomputation, dropout, output switches, kernel fusions with the same math);
* :data:`CHECKED`: the decoder computes some of its values: a function of the value returns why not, or None.

A field read by the library and in none of these is not implemented: :func:`unsupported` names it and the
library's forward runs instead, with the reason in provenance. ``tests/test_config_support.py`` reads the installed
library's modeling sources and fails when it reads a field this module does not classify.
"""

from __future__ import annotations

SILU = ("silu", "swish")


def _silu(value) -> str | None:
    return None if value in SILU else f"hidden_act {value!r} (the decoder computes SiLU)"


def _false(name: str):
    return lambda value: f"{name} {value!r}" if value else None


def _rope_on(value) -> str | None:
    return None if value in (None, True) else "rope false (no rotary embedding)"


IMPLEMENTED = frozenset({
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers", "intermediate_size",
    "vocab_size", "rms_norm_eps", "tie_word_embeddings", "pad_token_id", "max_position_embeddings",
    # rotary: the tables come from the model's own rotary module (dynamic ones per call, see decoder.Rope)
    "rope_theta", "rope_scaling", "rope_scaling_type", "rope_scaling_factor", "rope_parameters",
    # present as tensors when set: the weights decide (biases, fused projections)
    "attention_bias", "use_bias", "mlp_bias", "lm_head_bias", "fuse_attention_qkv", "fuse_attention_ffn",
    "fuse_swiglu",
})

INERT = frozenset({
    # parallelism and its bookkeeping (one process here)
    "tensor_parallel_degree", "tensor_parallel_rank", "tensor_parallel_output", "tensor_model_parallel_size",
    "sep_parallel_degree", "context_parallel_degree", "sequence_parallel", "pipeline_parallel_degree",
    "virtual_pp_degree", "moe_group", "enable_mtp_magic_send",
    # training only
    "recompute", "recompute_granularity", "recompute_use_reentrant", "recompute_method", "recompute_num_layers",
    "no_recompute_layers", "pp_recompute_interval", "initializer_range", "hidden_dropout", "hidden_dropout_prob",
    "attention_dropout", "attention_dropout_prob", "classifier_dropout", "ignore_index", "use_fused_linear_cross_entropy",
    "embedding_negatives_cross_device", "dpo_config", "num_labels", "problem_type", "seq_length", "max_sequence_length",
    # output switches and generation bookkeeping
    "output_hidden_states", "output_attentions", "use_return_dict", "use_cache", "architectures",
    "use_last_token_for_generation", "immediate_clear_past_key_value", "use_flash_attention_for_generation",
    # kernels with the same math (and not used on a CPU): attention implementations, fused rope / norm
    "use_flash_attention", "_attn_implementation", "apply_rope_fusion", "use_fused_rope", "fuse_rms_norm",
    "use_fused_rms_norm", "use_single_model_implementation",
    # read only when the checked switch above them is on
    "long_sequence_strategy_type", "long_sequence_strategy_name", "long_sequence_init_args", "num_nextn_predict_layers",
    "norm_eps",
})

CHECKED = {
    "hidden_act": _silu,
    "alibi": _false("alibi position bias"),
    "use_long_sequence_strategies": _false("use_long_sequence_strategies (another rotary class)"),
    "use_fused_head_and_loss_fn": _false("use_fused_head_and_loss_fn"),
    "use_fast_layer_norm": _false("use_fast_layer_norm (a layer norm instead of RMSNorm)"),
    "rope": _rope_on,
}

KNOWN = IMPLEMENTED | INERT | frozenset(CHECKED)
_MISSING = object()


def unsupported(config) -> str | None:
    """Why the decoder cannot compute a model with this config (the first checked field it does not implement), or
    None. Every checked field is looked at whatever the architecture: one the library does not read for this
    architecture (PaddleNLP's Llama has no ``hidden_act``) only sends the model to the library's forward, which is
    right too, never the other way round."""
    for name in sorted(CHECKED):
        value = getattr(config, name, _MISSING)
        if value is _MISSING:
            continue
        why = CHECKED[name](value)
        if why:
            return why
    return None
