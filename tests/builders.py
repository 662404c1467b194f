"""Tiny real PaddleNLP models and adapters, built in code for the tests (no downloads).

Tokenizers are real files: the bundled demo tokenizer (checkpoints/demo-base) is copied next to
each tiny model, so vocab sizes match it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from paddle_scorer.process.environment import paddle

REPO = Path(__file__).resolve().parents[1]
DEMO_BASE = REPO / "checkpoints" / "demo-base"
DEMO_LORA = REPO / "checkpoints" / "demo-lora"
DEMO_QUERIES = REPO / "checkpoints" / "demo-queries.jsonl"
DEMO_SCORER = json.loads((DEMO_LORA / "scorer.json").read_text())  # the demo adapter's template and labels


def demo_queries(n: int | None = None) -> list[dict]:
    """The demo's held-out query records, the first ``n`` (all by default)."""
    return [json.loads(line) for line in DEMO_QUERIES.read_text().splitlines()][:n]

_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                    "added_tokens.json", "tokenizer.json")


def copy_tokenizer(dst: Path, src: Path = DEMO_BASE) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def tiny_config(arch: str = "llama", **overrides):
    from paddlenlp.transformers import LlamaConfig, Qwen2Config

    demo = json.loads((DEMO_BASE / "config.json").read_text())
    kw = dict(vocab_size=demo["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=demo.get("bos_token_id"), eos_token_id=demo.get("eos_token_id"),
              pad_token_id=demo.get("pad_token_id"))
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(**kw)


def build_model(arch: str = "llama", seed: int = 0, **overrides):
    from paddlenlp.transformers import LlamaForCausalLM, Qwen2ForCausalLM

    pd = paddle()
    pd.seed(seed)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    model = cls(tiny_config(arch, **overrides))
    # Random init is tiny (std 0.02): scale up so logits and LoRA effects are far from zero.
    for p in model.parameters():
        if len(p.shape) == 2:
            p.set_value(p.numpy() * 5)
    model.eval()
    return model


def save_model(model, folder: Path, dtype: str = "float32", tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if dtype != "float32":
        model.to(dtype=dtype)
        model.config.dtype = dtype
    model.save_pretrained(str(folder))
    if dtype != "float32":
        model.to(dtype="float32")
        model.config.dtype = "float32"
    if tokenizer:
        copy_tokenizer(folder)
    return folder


def save_lora(base_model, folder: Path, base_ref: str | None, r: int = 4, alpha: float = 8, rslora: bool = False,
              targets=(".*q_proj.*", ".*v_proj.*", ".*down_proj.*"), seed: int = 1, std: float = 0.2) -> Path:
    """A real adapter saved by PaddleNLP's LoRAModel, with non-zero random A and B."""
    import copy

    from paddlenlp.peft import LoRAConfig, LoRAModel

    model = copy.deepcopy(base_model)
    config = LoRAConfig(r=r, lora_alpha=alpha, rslora=rslora, target_modules=list(targets),
                        base_model_name_or_path=base_ref, dtype="float32")
    lora = LoRAModel(model, config)
    rng = np.random.default_rng(seed)
    for name, p in lora.model.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            p.set_value(rng.normal(0.0, std, p.shape).astype("float32"))
    lora.save_pretrained(str(folder))
    return folder


def make_pickle_bomb(path: Path, marker: Path) -> Path:
    """A .pdparams whose unpickling would create ``marker`` via os.system."""
    import pickle

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as fh:
        pickle.dump({"llama.embed_tokens.weight": Payload()}, fh, protocol=4)
    return path


def plain_logprobs(loaded, ids) -> np.ndarray:
    """The reference path of the tests: the library's own full forward over one whole sequence and a
    float64 log-softmax, ``[len(ids), vocab]`` (row i: the distribution after ``ids[:i + 1]``)."""
    pd = paddle()
    with pd.no_grad():
        logits = loaded.model(pd.to_tensor([list(ids)]), return_dict=True).logits.numpy()[0].astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
