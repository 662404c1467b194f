"""ERNIE-4.5-21B-A3B's widths on the CPU decoder, in RAM and streamed (issue #27).

    python benchmarks/bench_moe.py [--layers 3] [--prompts 48] [--json OUT] [--keep]

A generated ``Ernie4_5_MoeForCausalLM`` with the real model's widths (hidden 2560, 20 heads / 4 KV heads of 128, 64
experts of 1536 with 6 routed + 2 shared per token, a dense first layer of 12288, vocabulary 103424), stored in
bfloat16 like the released checkpoint, but only ``--layers`` decoder layers deep (the real one has 28). It is scored
by ``paddle-scorer classify`` (the CLI, as a user runs it) on short demo prompts with two labels:

* **in RAM**: records/s, tokens/s, and the *active* FLOPs (what a token goes through: attention, its 6 routed
  experts, the shared ones, and the LM head only at the rows scored) as a fraction of this machine's float32 GEMM
  peak on the model's own expert shapes, measured in the same process (``gemm.measure_all`` on the chosen kernel);
* **streamed** (``--memory-limit`` below the model): the same, the bytes it read, and its time against the disk's
  read bound (the weight files read once, at the speed measured on them right before);
* a projection for the full 28-layer model: per-layer time x 28 plus the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

REAL_LAYERS = 28
CONFIG = dict(
    architectures=["Ernie4_5_MoeForCausalLM"], model_type="ernie4_5_moe", hidden_size=2560, intermediate_size=12288,
    num_attention_heads=20, num_key_value_heads=4, head_dim=128, moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
    moe_intermediate_size=1536, moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
    vocab_size=103424, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=False, use_bias=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def build(folder: Path, layers: int) -> int:
    """Random bfloat16 weights in the HF layout, one safetensors shard per layer (+ embeddings / head). Bytes written."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    c = dict(CONFIG, num_hidden_layers=layers)
    rng = np.random.default_rng(0)
    h, heads, kv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(ml_dtypes.bfloat16)

    def ones(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(ml_dtypes.bfloat16)

    shards, index = [], {}

    def shard(tensors):
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        shards.append(name)
        index.update({k: name for k in tensors})

    shard({"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": ones(h),
           "lm_head.weight": w(c["vocab_size"], h)})
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": ones(h), f"{p}.post_attention_layernorm.weight": ones(h),
             f"{p}.self_attn.q_proj.weight": w(heads * d, h), f"{p}.self_attn.k_proj.weight": w(kv * d, h),
             f"{p}.self_attn.v_proj.weight": w(kv * d, h), f"{p}.self_attn.o_proj.weight": w(h, heads * d)}
        mlps = {"mlp": c["intermediate_size"]} if i == 0 else {
            **{f"mlp.experts.{e}": c["moe_intermediate_size"] for e in range(c["moe_num_experts"])},
            "mlp.shared_experts": c["moe_intermediate_size"] * c["moe_num_shared_experts"]}
        for m, inter in mlps.items():
            t.update({f"{p}.{m}.gate_proj.weight": w(inter, h), f"{p}.{m}.up_proj.weight": w(inter, h),
                      f"{p}.{m}.down_proj.weight": w(h, inter)})
        if i > 0:
            t[f"{p}.mlp.gate.weight"] = (rng.standard_normal((c["moe_num_experts"], h), dtype=np.float32)
                                         * 0.02).astype(np.float32)
            t[f"{p}.mlp.moe_statics.e_score_correction_bias"] = (
                rng.standard_normal((1, c["moe_num_experts"]), dtype=np.float32) * 0.01)
        shard(t)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (folder / "config.json").write_text(json.dumps(dict(c, num_hidden_layers=layers), indent=1))
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (common.DEMO_BASE / name).is_file():
            shutil.copy(common.DEMO_BASE / name, folder / name)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def read_speed(folder: Path) -> float:
    """Bytes/s reading the weight files once, as they lie now (page cache included, as the streamed run sees them)."""
    files = sorted(folder.glob("*.safetensors"))
    t0 = time.perf_counter()
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - t0)


def classify(folder: Path, inputs: Path, out: Path, *extra) -> dict:
    cmd = [str(Path(sys.executable).with_name("paddle-scorer")), "classify", "--model", str(folder), "--labels",
           "goods,life", "--template", common.demo_template(), "--input", str(inputs), "--output", str(out),
           "--overwrite", "--device", "cpu", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"classify failed ({p.returncode}):\n{p.stderr[-3000:]}")
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    recs = [json.loads(x) for x in open(out)]
    tokens = sum(len(r["prompt_token_ids"]) + sum(len(t) - 1 for t in r["label_token_ids"].values()) for r in recs)
    return {"wall_seconds": wall, "seconds": meta["seconds"], "records": len(recs), "tokens": tokens,
            "rows_scored": sum(1 + sum(len(t) - 1 for t in r["label_token_ids"].values()) for r in recs),
            "streaming": meta.get("streaming"), "compute": meta["model"]["compute"]}


def active_flops(tokens: int, rows: int, layers: int, mean_len: float) -> float:
    """Multiply-adds x 2 a batch of ``tokens`` goes through: each token's attention projections and scores, layer 0's
    dense MLP, then per MoE layer the router, 6 routed experts and the 2 shared; the LM head on ``rows`` rows."""
    c = CONFIG
    h, heads, kv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    attn = h * (heads + 2 * kv) * d + heads * d * h + 2 * heads * d * mean_len  # projections, QK^T and PV
    dense = 3 * h * c["intermediate_size"]
    moe = h * c["moe_num_experts"] + 3 * h * c["moe_intermediate_size"] * (c["moe_k"] + c["moe_num_shared_experts"])
    per_token = layers * attn + dense + (layers - 1) * moe
    return 2.0 * (tokens * per_token + rows * h * c["vocab_size"])


def peak_gflops() -> tuple[float, str]:
    """This machine's float32 GEMM speed on an expert's shape, on the kernel the decoder chose (measured now)."""
    from paddle_scorer.compute import gemm

    c = CONFIG
    kernel, choice = gemm.gemm(c["hidden_size"], c["moe_intermediate_size"])
    shape = (512, c["hidden_size"], 2 * c["moe_intermediate_size"])
    return gemm.measure_all({choice.path: kernel}, shape)[choice.path], choice.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated model in benchmarks/.cache")
    args = ap.parse_args()
    folder = common.CACHE / f"ernie45-21b-a3b-shape-{args.layers}l"
    t0 = time.perf_counter()
    disk_bytes = build(folder, args.layers)
    build_s = time.perf_counter() - t0
    work = common.CACHE / "moe-bench"
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in common.read_queries(args.prompts)))
    peak, path = peak_gflops()
    ram = classify(folder, inputs, work / "ram.jsonl", "--execution", "in-ram")
    speed = read_speed(folder)
    streamed = classify(folder, inputs, work / "streamed.jsonl", "--execution", "streamed")
    res = {"machine": common.machine(), "layers": args.layers, "disk_bytes": disk_bytes, "build_seconds": build_s,
           "gemm_peak_gflops": peak, "gemm_path": path, "read_bytes_per_s": speed}
    mean_len = ram["tokens"] / max(1, ram["records"])
    for name, r in (("in_ram", ram), ("streamed", streamed)):
        flops = active_flops(r["tokens"], r["rows_scored"], args.layers, mean_len)
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["records_per_s"] = r["records"] / r["seconds"]
        r["active_gflops"] = flops / r["seconds"] / 1e9
        r["fraction_of_peak"] = r["active_gflops"] / peak
        res[name] = r
    read = streamed["streaming"] or {}
    res["streamed"]["read_bound_seconds"] = read.get("bytes_read", 0) / speed
    res["streamed"]["time_over_read_bound"] = streamed["seconds"] / max(1e-9, res["streamed"]["read_bound_seconds"])
    # the full 28 layers: everything scales with the layers but the embeddings/head and the dense first layer
    per_moe_layer = ram["seconds"] / args.layers  # an upper bound: layer 0 and the head are in it
    res["projection_28_layers"] = {
        "in_ram_seconds": ram["seconds"] + (REAL_LAYERS - args.layers) * per_moe_layer,
        "in_ram_records_per_s": ram["records"] / (ram["seconds"] + (REAL_LAYERS - args.layers) * per_moe_layer),
        "streamed_bytes_per_block": read.get("bytes_read", 0) / max(1, read.get("blocks", 1)) * REAL_LAYERS / args.layers,
        "float32_gib_in_ram": math.ceil(disk_bytes * 2 * REAL_LAYERS / args.layers / 2**30),
    }
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    common.dump(res, args.json)


if __name__ == "__main__":
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    main()
