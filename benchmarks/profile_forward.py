"""Where a CPU forward spends its time: per-op profile of the scoring forward (issue 18's first step).

For each model (the demo, the generated ~58M Llama, the generated 0.94B Llama) and two shapes (a packed
batch of short demo prompts of ~1024 tokens with two single-token labels, one ~1000-token sequence), run
the production scoring path (`Backend.score` / `Backend.position_logprobs`) under cProfile and print the
time per operation (paddle's `_C_ops.*` calls, grouped) and per module class (exclusive).

    python benchmarks/profile_forward.py [--models demo,58m,0.9b] [--reps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

GROUPS = [  # (group, substrings of the profiled function's name)
    ("GEMM (matmul/linear)", ("matmul", "linear", "fc")),
    ("softmax", ("softmax", "logsumexp")),
    ("RMSNorm pieces (pow/mean/rsqrt/cast)", ("pow", "mean", "rsqrt", "rms_norm", "cast")),
    ("elementwise (add/mul/silu/...)", ("add", "multiply", "subtract", "divide", "silu", "scale", "where",
                                         "full", "concat", "split", "slice", "tile", "expand", "logical",
                                         "sin", "cos", "exp", "triu", "tril", "ones", "zeros", "arange")),
    ("layout (transpose/reshape/index)", ("transpose", "reshape", "unsqueeze", "squeeze", "gather", "index",
                                          "flatten", "stack", "repeat", "getitem", "_getitem", "set_value")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for g, keys in GROUPS:
        if any(k in low for k in keys):
            return g
    return "other"


def profile(fn, reps: int):
    fn()  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    wall = (time.perf_counter() - t0) / reps
    st = pstats.Stats(prof)
    ops = defaultdict(float)
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        if file == "~" or "_C_ops" in func or "built-in" in func or func.startswith("<method"):
            ops[func] += tt / reps
    py = sum(tt for (file, _, _), (_, _, tt, _, _) in st.stats.items() if file != "~") / reps
    return wall, dict(ops), py


def shapes_for(tok, n_short: int):
    from paddle_scorer.prompts import encode_pair

    rows = common.read_queries(n_short)
    template = common.demo_template()
    prompts, conts = [], []
    for r in rows:
        text = template.format(**r)
        c = []
        for lab in ("goods", "life"):
            pair = encode_pair(tok, text, " " + lab, False)
            c.append(pair.continuation)
        prompts.append(pair.context)
        conts.append(c)
    return prompts, conts


def run(model_dir: Path, lora: Path | None, reps: int) -> dict:
    from paddle_scorer.execution import backend_for
    from paddle_scorer.packing import CALL_TOKENS
    from paddle_scorer.loader import load

    loaded = load(model_dir, lora, device="cpu")
    be = backend_for(loaded)
    tok = loaded.tokenizer
    prompts, conts = shapes_for(tok, 64)
    from paddle_scorer.packing import regroup

    groups = regroup(list(zip(prompts, conts)), CALL_TOKENS)
    g = groups[0]
    batch = ([prompts[i] for i in g], [conts[i] for i in g])
    long_seq = [p for p in prompts for _ in (0,)]
    seq = [t for p in long_seq for t in p][:1000]
    out = {}
    cases = {
        f"packed batch ({len(g)} prompts, {sum(len(prompts[i]) for i in g)} tokens)": lambda: be.score(*batch),
        f"one sequence of {len(seq)} tokens (LM head on the last row)": lambda: be.next_token_logprobs([seq]),
    }
    for name, fn in cases.items():
        wall, ops, py = profile(fn, reps)
        grouped = defaultdict(float)
        for op, t in ops.items():
            grouped[group_of(op)] += t
        out[name] = {"wall_s": wall, "groups": dict(grouped),
                     "top_ops": sorted(ops.items(), key=lambda kv: -kv[1])[:12]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,58m,0.9b")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {"machine": common.machine()}
    for m in args.models.split(","):
        if m == "demo":
            res = run(common.DEMO_BASE, common.DEMO_LORA, args.reps)
        elif m == "58m":
            base, lora = common.build_big()
            res = run(base, lora, args.reps)
        else:
            import bench_realsize

            res = run(bench_realsize.generate("llama-0.9b"), None, args.reps)
        results[m] = res
        for case, r in res.items():
            print(f"\n## {m}: {case}: {r['wall_s'] * 1000:.0f} ms per forward")
            for gname, t in sorted(r["groups"].items(), key=lambda kv: -kv[1]):
                print(f"  {gname:40s} {t * 1000:8.1f} ms  {100 * t / r['wall_s']:5.1f} %")
            print("  top ops:", ", ".join(f"{k} {v * 1000:.1f}" for k, v in r["top_ops"]))
    common.dump(results, args.json)


if __name__ == "__main__":
    main()
