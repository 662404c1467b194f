"""Tiny random checkpoints of the families paddle-scorer's decoder computes without a model library, saved by their
reference implementation, HF transformers (CPU torch, the test-only extra), and that reference's own forward on them:
what the tests hold the decoder to. Shared by both suites (transformers 4.55 in the PaddleNLP environment, 5.x in the
PaddleFormers one).

Every 1-D parameter the random init leaves at 0 or 1 (norm weights, biases, the routers' correction biases) is moved
to random values: a norm or bias the decoder misread would otherwise go unseen. The demo tokenizer (512 tokens) is
copied next to each model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import builders

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, initializer_range=0.1, max_position_embeddings=256, rms_norm_eps=1e-6,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, causal-LM class, config kwargs): each exercises what sets the family apart
FAMILIES: dict[str, tuple[str, str, dict]] = {
    # Llama 3.1's rotary scaling (llama3) in transformers 5's spelling (see REWRITE), attention and MLP biases:
    # PaddleNLP 3.0.0b4 would compute plain RoPE without biases, so the decoder computes it
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=500000.0, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # Qwen2.5's long-context recipe: YaRN, which PaddleNLP's Qwen2 does not compute; q/k/v biases
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    # Phi-3 (the 128k recipe): q/k/v stored as one qkv_proj, gate/up as one gate_up_proj, LongRoPE with short and
    # long factors over a partial rotary (12 of 16 dims), a sliding window longer than the test prompts
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=10000.0, partial_rotary_factor=0.75, original_max_position_embeddings=64, sliding_window=120,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                      "long_factor": [1.0, 2.0, 3.0, 5.0, 8.0, 12.0]})),
    # Gemma 3 (text): GeLU-tanh, (1 + w) norms, four per layer, q/k norms, embedding scale, local layers with their own
    # rotary base and global ones with linear scaling, query_pre_attn_scalar, soft-capped logits, a tied head
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        COMMON, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        query_pre_attn_scalar=24, sliding_window=100, layer_types=["sliding_attention", "full_attention",
                                                                   "sliding_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        final_logit_softcapping=30.0, attn_logit_softcapping=None, tie_word_embeddings=True)),
    # GPT-OSS: attention sinks and biases, alternating sliding/full layers, YaRN (truncate false), a router with a
    # bias (top-k, then a softmax over those), experts stacked [E, in, out] with gate/up interleaved and biases
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        COMMON, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=100, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=150000.0, layer_types=["sliding_attention", "full_attention"],
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 64})),
    # Mistral dense: a sliding window longer than the test prompts (exact there), explicit head_dim
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        rope_theta=1000000.0, sliding_window=96, tie_word_embeddings=False)),
    # Qwen3 dense: explicit head_dim (32) != hidden/heads (16), GQA 4/2, q/k norms, a tied head, YaRN
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_theta=10000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    # Qwen3-MoE: 8 experts top-2, renormalised, layer 1 dense
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=1000000.0, tie_word_embeddings=False)),
    # Qwen2-MoE: qkv bias, top-2 of 8 NOT renormalised, a gated shared expert, MoE every 2nd layer
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=2, qkv_bias=True, rope_theta=1000000.0, tie_word_embeddings=False)),
    # Mixtral: top-2 of 4, w1/w3/w2
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        COMMON, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False)),
    # DeepSeek-V3: MLA with q LoRA, interleaved RoPE on 8 dims, YaRN with mscale, sigmoid group-limited router
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, rope_interleave=True,
        rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # GLM-4.5: partial rotary 0.5, qkv bias, q/k norm, sigmoid router, a shared expert, the first layer dense
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, rope_theta=1000000.0,
        tie_word_embeddings=False)),
    # ERNIE 4.5 MoE: float32 softmax router with moe_statics correction bias, 2 shared experts, layer 0 dense
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_num_experts=8, moe_k=2, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1, moe_norm_min=1e-12,
        use_bias=False, rope_theta=500000.0, tie_word_embeddings=False)),
}
BIAS_SCALE = {"deepseek_v3": 0.3, "glm4_moe": 0.3, "ernie4_5_moe": 0.1}
NORM_OFFSET = {"gemma3"}


def v5_rope(cfg: dict) -> dict:
    """config.json as transformers 5 writes it: ``rope_parameters`` (type, base and scaling), no ``rope_theta`` or
    ``rope_scaling`` at the top."""
    if "rope_theta" not in cfg and cfg.get("rope_parameters"):  # saved by transformers 5 already
        return cfg
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = {**(cfg.get("rope_scaling") or {"rope_type": "default"}), "rope_theta": cfg["rope_theta"]}
    return out


# families whose fixture's config.json is rewritten in another dialect after saving
REWRITE = {"llama": v5_rope}


def rewrite_config(folder: Path, change) -> None:
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2))


def _perturb(model, family: str, gen) -> None:
    import torch

    with torch.no_grad():
        named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                   if "e_score_correction_bias" in n]
        for name, t in named:
            if "e_score_correction_bias" in name:
                t.copy_(torch.randn(t.shape, generator=gen) * BIAS_SCALE[family])
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                center = 0.0 if family in NORM_OFFSET else 1.0  # Gemma's norms multiply by (1 + weight)
                t.copy_(center + 0.3 * torch.randn(t.shape, generator=gen))
            elif name.endswith(".bias") or name.endswith("_bias") or name.endswith(".sinks"):  # GPT-OSS: expert biases
                t.copy_(0.2 * torch.randn(t.shape, generator=gen))


def build_hf(family: str, folder: Path, seed: int = 1234, **overrides):
    """The family's tiny model built by transformers (eval mode, float32, perturbed), saved with the demo tokenizer.
    Returns the torch model (the reference)."""
    import torch
    import transformers

    cfg_name, lm_name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**json.loads(json.dumps({**kwargs, **overrides})))
    config._attn_implementation = "eager"
    model = getattr(transformers, lm_name)(config).to(torch.float32).eval()
    _perturb(model, family, torch.Generator().manual_seed(seed + 1))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    if family in REWRITE:
        rewrite_config(folder, REWRITE[family])
    builders.copy_tokenizer(folder)
    return model


def merge_adapter_into(model, adapter: dict[str, np.ndarray], scaling: float, prefix: str) -> None:
    """The torch reference with a LoRA adapter merged into its weights: ``W += (A @ B * scaling)^T`` for every pair
    (Paddle's ``[in, r]`` / ``[r, out]``, keys with the adapter's ``prefix`` for the model's ``model.``)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [k for k in adapter if k.endswith(".lora_A")]:
            module = key[: -len(".lora_A")]
            name = "model." + module[len(prefix) + 1:] + ".weight"
            delta = (adapter[key].astype(np.float64) @ adapter[module + ".lora_B"].astype(np.float64)) * scaling
            params[name].add_(torch.from_numpy(delta.T.astype(np.float32)))


def logprobs(model, ids: list[int]) -> np.ndarray:
    """The reference's float64 log-softmax at every position of one sequence ``[len(ids), vocab]``."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0].double().numpy()
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def label_logprobs(model, record: dict) -> dict[str, float]:
    """log P(label | prompt) per label of a classify output record, from the reference's full forward."""
    out = {}
    prompt = record["prompt_token_ids"]
    for label, ids in record["label_token_ids"].items():
        lp = logprobs(model, prompt + ids[:-1])
        out[label] = float(sum(lp[len(prompt) - 1 + t, tok] for t, tok in enumerate(ids)))
    return out


def worst_per_token(records, model) -> float:
    """The largest |log P(label)| difference per label token between classify's records and ``model``'s forward."""
    worst = 0.0
    for rec in records:
        ref = label_logprobs(model, rec)
        for label, lp in rec["logprobs"].items():
            worst = max(worst, abs(lp - ref[label]) / len(rec["label_token_ids"][label]))
    return worst


def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """The reference's greedy continuation of ``prompt`` (a full forward per step) and each chosen token's log-prob."""
    ids, lps = list(prompt), []
    for _ in range(steps):
        lp = logprobs(model, ids)[-1]
        tok = int(np.argmax(lp))
        ids.append(tok)
        lps.append(float(lp[tok]))
    return ids[len(prompt):], lps


def paddle_format_adapter(folder, targets: dict[str, tuple[int, int]], r: int = 4, alpha: float = 8.0, seed: int = 5):
    """A LoRA adapter in PaddleNLP's format (lora_config.json + lora_model_state.pdparams, ``[in, r]`` / ``[r, out]``)
    on ``targets`` (module -> (in, out)), random non-zero A and B: for a family no installed library builds, so no
    library's LoRAModel can save one here. Returns its arrays and scaling."""
    from paddle_scorer.checkpoint.weights import write_pdparams  # noqa: PLC0415 - the code under test

    rng = np.random.default_rng(seed)
    arrays = {}
    for module, (n_in, n_out) in targets.items():
        arrays[f"{module}.lora_A"] = rng.normal(0, 0.2, (n_in, r)).astype(np.float32)
        arrays[f"{module}.lora_B"] = rng.normal(0, 0.2, (r, n_out)).astype(np.float32)
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_pdparams(arrays, Path(folder) / "lora_model_state.pdparams")
    (Path(folder) / "lora_config.json").write_text(json.dumps({
        "r": r, "lora_alpha": alpha, "target_modules": [".*(" + "|".join(sorted({m.rsplit(".", 1)[-1] for m in targets}))
                                                        + ")"], "dtype": "float32"}))
    return arrays, alpha / r
