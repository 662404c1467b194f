"""Achieved GFLOP/s of the scoring forward vs this machine's fp32 matmul peak, under one environment.

Run by ``run.py`` once per setting (MKL_DEBUG_CPU_TYPE and OMP_NUM_THREADS must be set before paddle
is imported, so each setting is its own process):

    MKL_DEBUG_CPU_TYPE=5 OMP_NUM_THREADS=2 python benchmarks/bench_flops.py --json OUT

Useful FLOPs are counted analytically for what the scoring path computes on real (unpadded) tokens:
2 x (decoder linear weights) per token, 4 x hidden x (keys attended) per token and layer for
attention, and 2 x hidden x vocab per LM-head row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def matmul_peak(pd, n=2048, iters=10) -> float:
    a = pd.randn([n, n], dtype="float32")
    b = pd.randn([n, n], dtype="float32")
    pd.matmul(a, b).numpy()

    def run():
        for _ in range(iters):
            c = pd.matmul(a, b)
        c.numpy()

    t, _ = common.median_time(run, reps=3)
    return 2 * n**3 * iters / t / 1e9


def torch_matmul_peak(n=2048, iters=10) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run():
        for _ in range(iters):
            torch.mm(a, b)

    t, _ = common.median_time(run, reps=3)
    return 2 * n**3 * iters / t / 1e9


def scoring_flops(cfg, preps) -> float:
    h, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    total = 0.0
    for p in preps:
        n = len(p.context)
        total += 2 * linear * n + layers * 4 * h * n * (n + 1) / 2 + 2 * h * v  # one head row per prompt
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-peak", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    from paddle_scorer.model.loader import load
    from paddle_scorer.process.environment import paddle, settings
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    pd = paddle()
    res = {"env": {k: os.environ.get(k) for k in ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS")}, "runtime": settings()}
    res["matmul_gflops"] = matmul_peak(pd)
    loaded = load(common.BIG_BASE)  # base only: the FLOP count is exact (no attached LoRA matmuls)
    clf = Classifier(loaded, ClassifyOptions(labels=["goods", "life"], template=common.demo_template(),
                                             batch_size=args.bs))
    preps = [clf.prepare(r, i, f"#{i}") for i, r in enumerate(common.read_queries(args.n))]
    t, _ = common.median_time(lambda: clf.score(preps), reps=args.reps)
    flops = scoring_flops(loaded.config, preps)
    res.update({"classify_pps": len(preps) / t, "scoring_gflops": flops / t / 1e9,
                "gflop_per_prompt": flops / len(preps) / 1e9})
    res["fraction_of_peak"] = res["scoring_gflops"] / res["matmul_gflops"]
    if args.torch_peak:
        time.sleep(0.5)
        res["torch_matmul_gflops"] = torch_matmul_peak()
    print(res, flush=True)
    common.dump(res, args.json)


if __name__ == "__main__":
    main()
