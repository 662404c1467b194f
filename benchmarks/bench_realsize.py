"""Real-size models on a CPU box (issue 11): load memory and time, streamed vs in-RAM, a streamed run's
peak RSS against its --memory-limit, and a Llama-2-7B-shaped checkpoint scored on a 2-core machine.

    python benchmarks/bench_realsize.py gen NAME              # write the generated checkpoint (not committed)
    python benchmarks/bench_realsize.py load NAME --json OUT  # one child: in-RAM load, peak RSS, time
    python benchmarks/bench_realsize.py readcast NAME --json OUT   # one child: read + cast every tensor
    python benchmarks/bench_realsize.py classify NAME --records N [--execution X] [--memory-limit L] --json OUT
    python benchmarks/bench_realsize.py peak --json OUT       # fp32 matmul GFLOP/s (paddle, this process)

``run.py --realsize`` drives them; each measurement is its own process, so peak RSS (``ru_maxrss`` of the
child) is the process's own. Checkpoints are written by numpy with random float16 weights (std 0.02;
norms 1) in Paddle layout with a PaddleNLP config, under benchmarks/.cache (several GB; never committed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

SPECS = {
    # ~0.32B parameters (issue 30's long-prompt model): hidden 1024, 20 layers
    "llama-0.3b": dict(hidden=1024, layers=20, inter=2816, heads=16, kv=16, vocab=32000, fmt="pdparams"),
    # ~0.94B parameters, 1.9 GB float16, one .pdparams (the "810M" class of model)
    "llama-0.9b": dict(hidden=2048, layers=16, inter=5504, heads=16, kv=16, vocab=32000, fmt="pdparams"),
    # ~1.55B parameters, 3.1 GB float16, sharded safetensors: float32 weights 6.2 GB, >= 3x a 2 GB limit
    "llama-1.5b": dict(hidden=2048, layers=28, inter=5504, heads=16, kv=16, vocab=32000, fmt="safetensors"),
    # Llama-2-7B's shape: hidden 4096, 32 layers, MLP 11008; 6.74B parameters, 13.5 GB float16
    "llama-7b": dict(hidden=4096, layers=32, inter=11008, heads=32, kv=32, vocab=32000, fmt="safetensors"),
}
SHARD_BYTES = 2 * 1024**3


def folder(name: str) -> Path:
    return common.CACHE / name


def tensor_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v, kvw = s["hidden"], s["inter"], s["vocab"], s["hidden"] * s["kv"] // s["heads"]
    out = [("llama.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"llama.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, kvw)),
                (p + "self_attn.v_proj.weight", (h, kvw)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (h, i)), (p + "mlp.up_proj.weight", (h, i)),
                (p + "mlp.down_proj.weight", (i, h)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("llama.norm.weight", (h,)), ("lm_head.weight", (h, v))]
    return out


def num_params(s: dict) -> int:
    return sum(math.prod(shape) for _, shape in tensor_shapes(s))


def generate(name: str, force: bool = False) -> Path:
    import numpy as np

    from paddle_scorer.checkpoint.weights import write_pdparams, write_safetensors

    s = SPECS[name]
    out = folder(name)
    if (out / "config.json").is_file() and not force:
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def tensor(shape):
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float16)
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= 0.02
        return a.astype(np.float16)

    shapes = tensor_shapes(s)
    if s["fmt"] == "pdparams":
        write_pdparams({n: tensor(shape) for n, shape in shapes}, tmp / "model_state.pdparams")
    else:
        shard, size, k, weight_map, files = {}, 0, 0, {}, []
        for n, shape in shapes:
            shard[n] = tensor(shape)
            size += shard[n].nbytes
            if size >= SHARD_BYTES:
                k += 1
                files.append((k, shard))
                write_safetensors(shard, tmp / f"part-{k}.safetensors", metadata={"format": "np"})
                shard, size = {}, 0
        if shard:
            k += 1
            write_safetensors(shard, tmp / f"part-{k}.safetensors", metadata={"format": "np"})
        total = 0
        for j in range(1, k + 1):
            final = f"model-{j:05d}-of-{k:05d}.safetensors"
            os.rename(tmp / f"part-{j}.safetensors", tmp / final)
        from paddle_scorer.checkpoint.weights import index_file

        for j in range(1, k + 1):
            final = f"model-{j:05d}-of-{k:05d}.safetensors"
            for t, ref in index_file(tmp / final).items():
                weight_map[t] = final
                total += ref.nbytes
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "paddlenlp_version": "3.0.0b4",
        "dtype": "float16", "hidden_size": s["hidden"], "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
        "vocab_size": s["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (common.DEMO_BASE / f).is_file():
            shutil.copy(common.DEMO_BASE / f, tmp / f)
    os.rename(tmp, out)
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------


def child_load(name: str) -> dict:
    from paddle_scorer.process.environment import paddle

    paddle()
    import paddlenlp.transformers  # noqa: F401 - the interpreter's baseline includes the library

    base = rss_now()
    from paddle_scorer.model.loader import load

    t0 = time.perf_counter()
    loaded = load(folder(name), device="cpu")
    seconds = time.perf_counter() - t0
    n = loaded.facts.num_params
    return {"name": name, "params": n, "fp32_bytes": 4 * n, "baseline_rss": base, "peak_rss": peak_rss(),
            "seconds": seconds, "ratio_above_baseline": (peak_rss() - base) / (4 * n)}


def child_readcast(name: str) -> dict:
    """The reference: read every tensor and cast it to float32 with the same cast the loader uses (on every
    core), keeping the results (the weights have to end up in memory) and nothing else: the floor any
    loader of these files pays."""
    from paddle_scorer.checkpoint import describe
    from paddle_scorer.model.arrays import to_dtype
    from paddle_scorer.checkpoint.weights import read_tensor

    info = describe(folder(name))
    refs = sorted(info.tensors.values(), key=lambda r: (str(r.file), r.offset))
    kept = []
    t_read = t_cast = 0.0
    for ref in refs:
        t0 = time.perf_counter()
        a = read_tensor(ref)
        t1 = time.perf_counter()
        kept.append(to_dtype(a, "float32"))
        del a
        t_cast += time.perf_counter() - t1
        t_read += t1 - t0
    return {"name": name, "read_seconds": t_read, "cast_seconds": t_cast, "seconds": t_read + t_cast,
            "kept_bytes": sum(k.nbytes for k in kept)}


def child_peak() -> dict:
    """The best float32 GEMM this process can run: paddle-scorer's chosen kernel and Paddle's F.linear on a
    Llama-7B MLP product over 1024 tokens ([1024, 4096] x [4096, 11008])."""
    from paddle_scorer.compute import gemm

    shape = (1024, 4096, 11008)
    _, choice = gemm.choose(shape)
    linear = gemm.measure(gemm.make("paddle"), shape, reps=4)
    return {"gflops": max(choice.gflops, linear), "chosen": choice.to_dict(), "shape": list(shape)}


def run_classify(name: str, records: int, execution: str, memory_limit: str | None, out_dir: Path,
                 block: int | None = None) -> dict:
    """The real CLI as a child process; its peak RSS from wait4, its counts from the output's .meta.json."""
    data = out_dir / f"queries-{records}.jsonl"
    queries = common.read_queries()
    with open(data, "w") as fh:
        for k in range(records):
            q = queries[k % len(queries)]
            fh.write(json.dumps({**q, "id": f"{q['id']}-{k}"}) + "\n")
    out = out_dir / f"{name}-{execution}-{records}.jsonl"
    for p in (out, out.with_name(out.name + ".meta.json")):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "paddle_scorer", "classify", "--model", str(folder(name)), "--labels", "goods,life",
           "--template", common.demo_template(), "--input", str(data), "--output", str(out), "--execution", execution,
           "--overwrite"]  # a killed earlier run leaves an in-progress file; start over
    if memory_limit:
        cmd += ["--memory-limit", memory_limit]
    if block:
        cmd += ["--stream-block-records", str(block)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"classify failed ({status}):\n{log[-3000:]}")
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    recs = [json.loads(line) for line in open(out)]
    return {"name": name, "params": num_params(SPECS[name]), "records": records, "execution": meta.get("execution"),
            "wall_seconds": wall,
            "scoring_seconds": meta.get("seconds"), "peak_rss": usage.ru_maxrss * 1024, "memory_limit": memory_limit,
            "streaming": meta.get("streaming"), "block_records": meta.get("block_records"),
            "tokens": sum(len(r["prompt_token_ids"]) for r in recs), "log_tail": log[-600:],
            "flops": scoring_flops(SPECS[name], recs)}


def scoring_flops(s: dict, recs: list[dict]) -> float:
    """Useful FLOPs of scoring (as section 5 counts them): the decoder on the real prompt tokens, causal
    attention, one LM-head row per prompt. Padding is not counted (the CPU decoder computes none)."""
    h, i, v, layers = s["hidden"], s["inter"], s["vocab"], s["layers"]
    kvw = h * s["kv"] // s["heads"]
    per_token = layers * 2 * (2 * h * h + 2 * h * kvw + 3 * h * i)
    total = 0.0
    for r in recs:
        n = len(r["prompt_token_ids"])
        total += n * per_token + layers * 4 * h * n * (n + 1) / 2 + 2 * h * v
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["gen", "load", "readcast", "classify", "peak"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--execution", default="auto")
    ap.add_argument("--memory-limit")
    ap.add_argument("--block", type=int)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.what == "gen":
        t0 = time.perf_counter()
        path = generate(a.name, a.force)
        result = {"name": a.name, "path": str(path), "seconds": time.perf_counter() - t0,
                  "bytes": sum(p.stat().st_size for p in path.iterdir()), "params": num_params(SPECS[a.name])}
    elif a.what == "load":
        result = child_load(a.name)
    elif a.what == "readcast":
        result = child_readcast(a.name)
    elif a.what == "peak":
        result = child_peak()
    else:
        out_dir = common.CACHE / "realsize-runs"
        out_dir.mkdir(parents=True, exist_ok=True)
        result = run_classify(a.name, a.records, a.execution, a.memory_limit, out_dir, a.block)
    common.dump(result, a.json)


if __name__ == "__main__":
    main()
