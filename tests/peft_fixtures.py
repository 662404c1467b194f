"""LoRA adapters saved by Hugging Face ``peft`` (the test-only extra, beside transformers) on the tiny family bases of
family_fixtures.py, with non-zero A, B, DoRA magnitudes and modules_to_save tensors; peft's own forward on them is the
reference. Shared by both suites (peft 0.22 with transformers 4.55 here, 5.x in the PaddleFormers environment)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import family_fixtures as ff

# name -> (family, base overrides (rewritten to transformers 4.x's spelling when given), peft LoraConfig kwargs)
ADAPTERS: dict[str, tuple[str, dict, dict]] = {
    # DoRA, rsLoRA with rank_pattern/alpha_pattern, a trained lm_head (modules_to_save), one layer of two: on the Llama
    # 3.1 fixture (v5 rope spelling, biases: the decoder computes it)
    "llama_dora": ("llama", {}, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, use_dora=True, modules_to_save=["lm_head"],
        layers_to_transform=[1])),
    # a Llama PaddleNLP's own LlamaForCausalLM runs (4.x spelling, no biases): its LoRAModel attaches the pairs
    "llama_library": ("llama", {"rope_scaling": None, "attention_bias": False, "mlp_bias": False}, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 2, "k_proj": 6}, alpha_pattern={"gate_proj": 5})),
    # a regex target_modules string, rsLoRA and a rank pattern, on the fused q/k/v and gate/up the decoder runs
    "qwen3_regex": ("qwen3", {}, dict(
        r=8, lora_alpha=16, target_modules=r".*\.(q_proj|k_proj|o_proj|up_proj)", use_rslora=True,
        rank_pattern={"o_proj": 4})),
    # DoRA on every expert's projections and attention, layers 0 and 1 of three
    "qwen3_moe_dora": ("qwen3_moe", {}, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_dora=True, layers_to_transform=[0, 1])),
    # MLA's low-rank projections (q_a/q_b, kv_a with MQA, kv_b), a rank pattern, the experts' down_proj
    "deepseek_v3_mla": ("deepseek_v3", {}, dict(
        r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                           "down_proj"], rank_pattern={"kv_b_proj": 6})),
}


def build_base(family: str, folder: Path, overrides: dict):
    """The family's tiny transformers model; with ``overrides`` its config.json stays in transformers 4.x's spelling
    (the model PaddleNLP builds)."""
    rewrite = ff.REWRITE.pop(family, None) if overrides else None
    try:
        return ff.build_hf(family, folder, **overrides)
    finally:
        if rewrite is not None:
            ff.REWRITE[family] = rewrite


def build_adapter(base, folder: Path, config: dict, seed: int = 3, scale: float = 0.1):
    """``peft.get_peft_model(base, LoraConfig(**config))`` with every trainable tensor moved off its init (A, B, DoRA's
    magnitudes, modules_to_save copies), saved to ``folder``; returns the peft model in eval mode (the reference)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def edit_config(folder: Path, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


def tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def rewrite_tensors(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
