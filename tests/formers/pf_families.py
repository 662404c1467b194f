"""Tiny checkpoints and LoRA adapters of the families PaddleFormers 1.2.0 builds only through ``paddlefleet`` (not on
the package index): Qwen3, Qwen3-MoE, Qwen2-MoE, GLM-4.5, plus DeepSeek-V3 and ERNIE 4.5 MoE, saved by PaddleFormers'
own ``save_pretrained`` and ``LoRAModel``, and PaddleFormers' own forward on them (the reference where it runs).

The plain-Paddle model classes survive as ``*Deprecated`` and build once two imports are stubbed (installed by
:func:`install_stubs`, nothing of PaddleFormers is patched): ``paddleformers.transformers.gpt_provider`` (it raises
ImportError without paddlefleet; the modeling files import it only to subclass it for the fleet provider classes,
never built here) and ``paddlefleet_ops`` (``is_deep_ep_available() -> False``, what the real package says without
DeepEP). ERNIE 4.5 MoE's own forward needs GPU kernels: its reference is HF transformers' forward on the same files.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import paddle

from formers import builders as fb

COMMON = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              fuse_rms_norm=False, dtype="float32", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)

# family -> (module, config class, model class, config kwargs, LoRA targets)
FAMILIES = {
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLMDeprecated",
              dict(intermediate_size=128, num_hidden_layers=2, head_dim=16, rope_theta=10000.0),
              [r".*\.self_attn\.(qkv_proj|o_proj)", r".*\.mlp\.(up_gate_proj|down_proj)"]),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLMDeprecated",
                  dict(intermediate_size=128, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
                  [r".*\.self_attn\.(qkv_proj|o_proj)", r".*\.mlp\.experts\.[0-9]+\.(up_gate_proj|down_proj)"]),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLMDeprecated",
                  dict(intermediate_size=128, num_hidden_layers=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
                  [r".*\.self_attn\.qkv_proj", r".*\.mlp\.experts\.[0-9]+\.up_gate_proj",
                   r".*\.mlp\.shared_expert\.down_proj"]),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=32,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                         q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                         n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                         routed_scaling_factor=2.5,
                         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
                    [r".*\.self_attn\.(q_b_proj|kv_b_proj|o_proj)", r".*\.mlp\.experts\.[0-9]+\.(gate_proj|down_proj)"]),
    "glm4_moe": ("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLMDeprecated",
                 dict(intermediate_size=128, num_hidden_layers=3, head_dim=16, moe_intermediate_size=32,
                      n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                      attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, routed_scaling_factor=2.5),
                 [r".*\.self_attn\.(qkv_proj|o_proj)", r".*\.mlp\.shared_experts\.(up_gate_proj|down_proj)"]),
    "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(intermediate_size=128, num_hidden_layers=3, head_dim=16, moe_intermediate_size=32,
                          moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                          num_nextn_predict_layers=0),
                     [r".*\.self_attn\.(qkv_proj|o_proj)", r".*\.mlp\.experts\.[0-9]+\.(up_gate_proj|down_proj)"]),
    # Phi-3: PaddleFormers builds and runs it on a CPU, but no library here exposes it to paddle-scorer (PaddleFormers'
    # Llama-style API has no Phi-3 entry point): the decoder computes it; q/k/v fused [q | k | v], gate_up fused
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM",
             dict(intermediate_size=128, num_hidden_layers=2, partial_rotary_factor=0.75),
             [r".*\.self_attn\.(qkv_proj|o_proj)", r".*\.mlp\.(gate_up_proj|down_proj)"]),
}
RUNS_ON_CPU = ("qwen3", "qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe", "phi3")  # PaddleFormers' own forward does


def install_stubs() -> None:
    if "paddleformers.transformers.gpt_provider" not in sys.modules:
        m = types.ModuleType("paddleformers.transformers.gpt_provider")
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)

        class GPTModelProvider:  # the fleet provider classes subclass it; never built here
            transform_rules: dict = {}

        m.GPTModelProvider = GPTModelProvider
        sys.modules[m.__name__] = m
    try:
        import paddlefleet_ops  # noqa: F401
    except ImportError:
        m = types.ModuleType("paddlefleet_ops")
        m.__spec__ = importlib.machinery.ModuleSpec("paddlefleet_ops", None)
        m.is_deep_ep_available = lambda: False
        sys.modules["paddlefleet_ops"] = m


def build(family: str, seed: int = 1234):
    """The family's tiny PaddleFormers model (eval): every 1-D (and [1, E]) parameter moved off its init value, the
    routers rounded to bfloat16 values (PaddleFormers saves them in bfloat16, so the saved model is this one)."""
    install_stubs()
    module, cfg_name, cls_name, kwargs, _ = FAMILIES[family]
    mod = importlib.import_module(f"paddleformers.transformers.{module}.modeling")
    cfg = getattr(importlib.import_module(f"paddleformers.transformers.{module}.configuration"), cfg_name)(
        **{**COMMON, **kwargs})
    paddle.seed(seed)
    model = getattr(mod, cls_name)(cfg)
    model.eval()
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        for name, p in model.named_parameters():
            a = p.numpy()
            if a.ndim == 1 or (a.ndim == 2 and a.shape[0] == 1):
                p.set_value((a + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype))
            if name.endswith("mlp.gate.weight") or name.endswith("mlp.shared_expert_gate.weight"):
                p.set_value((np.ascontiguousarray(p.numpy()).view(np.uint32) & 0xFFFF0000).view(np.float32))
    return model


def save(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fb.copy_tokenizer(folder)
    return folder


def save_lora(family: str, model, folder: Path, seed: int = 5):
    """A real adapter (PaddleFormers' LoRAModel on the fused in-memory modules, experts included), non-zero A and B.
    Returns the LoRAModel (eval), whose forward is the reference with the adapter attached."""
    from paddleformers.peft import LoRAConfig, LoRAModel

    lora = LoRAModel(copy.deepcopy(model), LoRAConfig(target_modules=FAMILIES[family][4], r=4, lora_alpha=8,
                                                      dtype="float32", base_model_name_or_path=None))
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        for n, p in lora.model.named_parameters():
            if n.endswith("lora_A") or n.endswith("lora_B"):
                p.set_value((0.1 * rng.standard_normal(p.shape)).astype("float32"))
    lora.eval()
    lora.save_pretrained(str(folder))
    return lora


def logprobs(model, seqs: list[list[int]]) -> list[np.ndarray]:
    """PaddleFormers' own forward on each sequence: float64 log-softmax ``[len(ids), vocab]`` per sequence."""
    out = []
    with paddle.no_grad():
        for ids in seqs:
            logits = model(paddle.to_tensor([list(ids)], dtype="int64"), return_dict=True).logits.numpy()[0]
            logits = logits.astype(np.float64)
            out.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    return out


_HF = """
import json, sys
sys.modules["torchcodec"] = None  # paddlecodec installs a torchcodec module without its metadata: transformers trips
import numpy as np, torch, transformers
req = json.load(sys.stdin)
model = transformers.AutoModelForCausalLM.from_pretrained(req["folder"], torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
if req.get("adapter"):  # peft's own forward with the saved adapter
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, req["adapter"]).eval()
out = {}
with torch.no_grad():
    for i, ids in enumerate(req["seqs"]):
        out[str(i)] = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
np.savez(req["out"], **out)
"""


def hf_logprobs(folder: Path, seqs: list[list[int]], tmp: Path, adapter: Path | None = None) -> list[np.ndarray]:
    """HF transformers' forward (torch, CPU) on a saved folder (with ``adapter``: peft's, the adapter loaded by
    ``PeftModel.from_pretrained``): the reference of ERNIE 4.5 MoE, whose PaddleFormers forward needs GPU kernels. In a
    fresh interpreter: importing paddleformers turns transformers' torch off."""
    import json
    import subprocess

    out = tmp / "hf_logits.npz"
    req = json.dumps({"folder": str(folder), "seqs": [list(map(int, s)) for s in seqs], "out": str(out),
                      "adapter": str(adapter) if adapter else None})
    r = subprocess.run([sys.executable, "-c", _HF], input=req, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = np.load(out)
    result = []
    for i in range(len(seqs)):
        x = data[str(i)]
        result.append(x - np.logaddexp.reduce(x, axis=-1, keepdims=True))
    return result
