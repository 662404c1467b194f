"""Shared pieces of the benchmarks: machine facts, timing, the generated ~58M Llama, prompts, labels.

Nothing here is part of paddle-scorer: torch/transformers are imported only by the functions that
need them (``pip install -e '.[bench]'``), never by ``src/``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
DEMO_BASE = REPO / "checkpoints" / "demo-base"
DEMO_LORA = REPO / "checkpoints" / "demo-lora"
DEMO_QUERIES = REPO / "checkpoints" / "demo-queries.jsonl"
BIG_BASE = CACHE / "llama58m"
BIG_LORA = CACHE / "llama58m-lora"

# The "~60M" model: Llama-7B's vocabulary size and shape family, scaled down. Random weights (speed
# only); token ids come from the demo tokenizer (ids < 512), which is valid in a 32000-token vocab.
BIG_CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Multi-token label words (the demo tokenizer is a 512-token byte-level BPE: most are 2-5 tokens).
LABEL_WORDS = [
    "groceries", "electronics", "furniture", "clothing", "housing", "healthcare", "education", "transport",
    "insurance", "banking", "travel", "weather", "sports", "music", "cooking", "gardening", "pets", "taxes",
    "employment", "legal", "entertainment", "fitness", "beauty", "automotive", "parenting", "religion",
    "politics", "science", "history", "art", "books", "movies", "games", "software", "hardware", "energy",
    "utilities", "telecom", "real estate", "retirement", "charity", "shipping", "repairs", "cleaning",
    "security", "childcare", "dentistry", "pharmacy", "stationery", "jewellery",
]

# Labels of 1-2 tokens with the demo tokenizer (the first is 2 tokens).
SHORT_LABEL_WORDS = ["work", "tax", "rent", "shop", "time", "play", "bus", "books", "home", "car"]


def median_time(fn, reps: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return []


def machine() -> dict:
    import psutil

    from paddle_scorer.process.environment import versions

    vers = versions(("paddlepaddle", "paddlenlp", "numpy", "torch", "transformers"))
    return {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
        "kernel": platform.release(), "versions": vers,
    }


def read_queries(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in DEMO_QUERIES.read_text().splitlines() if line.strip()]
    return rows if n is None else [rows[i % len(rows)] for i in range(n)]


def demo_template() -> str:
    return json.loads((DEMO_LORA / "scorer.json").read_text())["template"]


def dump(obj, path: str | None) -> None:
    text = json.dumps(obj, indent=1, default=float)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


# ----------------------------------------------------------------------------------------------- models


def build_big(force: bool = False) -> tuple[Path, Path]:
    """Write the generated ~58M Llama (float32) and a random r=8 LoRA adapter on all 7 projections."""
    if not force and (BIG_BASE / "config.json").is_file() and (BIG_LORA / "lora_config.json").is_file():
        return BIG_BASE, BIG_LORA
    import shutil

    import numpy as np

    from paddle_scorer.process.environment import paddle

    pd = paddle()
    from paddlenlp.peft import LoRAConfig, LoRAModel
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    pd.seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**BIG_CONFIG))
    model.eval()
    for d in (BIG_BASE, BIG_LORA):
        shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(str(BIG_BASE))
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (DEMO_BASE / name).is_file():
            shutil.copy(DEMO_BASE / name, BIG_BASE / name)
    cfg = LoRAConfig(r=8, lora_alpha=16, target_modules=[".*q_proj.*", ".*k_proj.*", ".*v_proj.*", ".*o_proj.*",
                                                         ".*gate_proj.*", ".*up_proj.*", ".*down_proj.*"],
                     base_model_name_or_path=str(BIG_BASE), dtype="float32")
    lora = LoRAModel(model, cfg)
    rng = np.random.default_rng(7)
    for name, p in lora.model.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            p.set_value(rng.normal(0.0, 0.02, p.shape).astype("float32"))
    lora.save_pretrained(str(BIG_LORA))
    return BIG_BASE, BIG_LORA


def count_params(net) -> int:
    return int(sum(int(p.numel()) for p in net.parameters()))


def to_torch(paddle_net, paddle_cfg):
    """The same weights in HF transformers' LlamaForCausalLM (Paddle Linear [in, out] -> torch [out, in])."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = paddle_cfg
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                     rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", 10000.0),
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                     pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    hm = LlamaForCausalLM._from_config(hc, attn_implementation="sdpa", torch_dtype=torch.float32)
    sd = {}
    for k, v in paddle_net.state_dict().items():
        arr = v.numpy()
        name = "model." + k[len("llama."):] if k.startswith("llama.") else k
        if arr.ndim == 2 and "embed_tokens" not in name:
            arr = arr.T  # Linear (and lm_head) weights: Paddle [in, out], torch [out, in]
        sd[name] = torch.from_numpy(arr.copy())
    missing, unexpected = hm.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    hm.eval()
    return hm


if __name__ == "__main__":  # python benchmarks/common.py: print the machine description
    sys.path.insert(0, str(HERE))
    dump(machine(), None)
