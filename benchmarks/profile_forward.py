"""Where a CPU forward spends its time (issue 18's first step): per-operation time of the scoring forward.

Two forwards on the same loaded model and the same inputs:

* *library*: the model library's own eager forward (``PADDLE_SCORER_CPU_FORWARD=library``: what ``classify`` ran
  before this round); time per paddle operation (``_C_ops``), grouped;
* *decoder*: paddle-scorer's CPU decoder (decoder.py); time per step of the layer (GEMMs timed at the kernel,
  the rest by the functions that do it, wall time on the main thread, element-wise work split over threads).

Cases: a packed batch of short demo prompts (~800 real tokens, labels goods/life: what ``classify`` runs) and
one long sequence (LM head on the last row). Models: the generated ~58M Llama and the 0.94B Llama.

    python benchmarks/profile_forward.py [--models 58m,0.9b] [--reps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

LIB_GROUPS = [  # (group, substrings of the profiled paddle op's name)
    ("GEMM (matmul/linear)", ("matmul", "linear", "fc")),
    ("softmax", ("softmax", "logsumexp")),
    ("RMSNorm (pow/mean/rsqrt)", ("pow", "mean", "rsqrt", "rms_norm")),
    ("SwiGLU", ("swiglu", "silu")),
    ("layout copies (reshape/transpose/concat/slice)", ("reshape", "transpose", "unsqueeze", "squeeze", "concat",
                                                        "split", "slice", "getitem", "gather", "index", "stack",
                                                        "tile", "expand", "flatten")),
    ("element-wise (add/mul/cast/mask)", ("add", "multiply", "subtract", "divide", "scale", "where", "cast",
                                          "full", "logical", "sin", "cos", "exp", "triu", "tril", "ones", "zeros",
                                          "arange")),
]
DEC_FUNCS = {  # decoder step -> the function doing it (its cumulative wall time minus the GEMMs inside)
    "RMSNorm": ("rms_norm",), "rotary embedding": ("_rotate",), "SwiGLU": ("silu_mul",),
    "attention (mask, softmax, copies)": ("attention",), "LoRA adds, biases": ("linear",),
    "LM head log-softmax": ("logprobs",), "embedding lookup": ("embed",),
}
DEC_HELPERS = {"attention (mask, softmax, copies)": ("_attend",)}  # called inside a step, GEMMs and all


def lib_group(name: str) -> str:
    low = name.lower()
    for g, keys in LIB_GROUPS:
        if any(k in low for k in keys):
            return g
    return "other"


def shapes_for(tok, n_short: int):
    from paddle_scorer.tasks.prompts import encode_pair

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


def profile_library(fn, reps: int) -> tuple[float, dict]:
    fn()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    wall = (time.perf_counter() - t0) / reps
    groups = defaultdict(float)
    for (file, _, func), (_, _, tt, _, _) in pstats.Stats(prof).stats.items():
        if file == "~" and ("ops." in func or "Tensor" in func):
            groups[lib_group(func)] += tt / reps
    groups["Python and framework overhead (rest)"] = max(0.0, wall - sum(groups.values()))
    return wall, dict(groups)


def profile_decoder(fn, kernel, reps: int) -> tuple[float, dict]:
    gemm = [0.0]
    mm, bmm = kernel.mm, kernel.bmm

    def timed(f):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                gemm[0] += time.perf_counter() - t
        return run

    kernel.mm, kernel.bmm = timed(mm), timed(bmm)
    try:
        fn()
        gemm[0] = 0.0
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(reps):
            fn()
        prof.disable()
        wall = (time.perf_counter() - t0) / reps
    finally:
        kernel.mm, kernel.bmm = mm, bmm
    stats = pstats.Stats(prof).stats
    cum = defaultdict(float)
    for (file, _, func), (_, _, _, ct, _) in stats.items():
        if "compute/decoder/" in file:  # the decoder package (forward.py, ops.py, ...)
            cum[func] += ct / reps
    # GEMMs inside each step: the kernel wrapper's own cumulative time per caller
    gemm_in = defaultdict(float)
    for (file, _, func), (_, _, _, _, callers) in stats.items():
        if func == "run" and file.endswith("profile_forward.py"):
            for (cfile, _, cfunc), (_, _, _, cct) in callers.items():
                gemm_in[cfunc] += cct / reps
    groups = {"GEMM (matmul)": gemm[0] / reps}
    for step, funcs in DEC_FUNCS.items():  # a step's GEMMs may be called by its helpers (attention: _attend)
        inside = sum(gemm_in.get(f, 0.0) for f in funcs + DEC_HELPERS.get(step, ()))
        groups[step] = max(0.0, sum(cum[f] for f in funcs) - inside)
    groups["Python overhead (rest)"] = max(0.0, wall - sum(groups.values()))
    return wall, groups


def run_model(model_dir: Path, lora: Path | None, reps: int, long_tokens: int) -> dict:
    from paddle_scorer.compute.choose_backend import backend_for
    from paddle_scorer.model.loader import load
    from paddle_scorer.compute.packing import CALL_TOKENS, regroup

    loaded = load(model_dir, lora, device="cpu")
    os.environ["PADDLE_SCORER_CPU_FORWARD"] = "library"
    lib = backend_for(loaded)
    del os.environ["PADDLE_SCORER_CPU_FORWARD"]
    dec = backend_for(loaded)
    prompts, conts = shapes_for(loaded.tokenizer, 64)
    g = regroup(list(zip(prompts, conts)), CALL_TOKENS)[0]
    batch = ([prompts[i] for i in g], [conts[i] for i in g])
    seq = [t for p in prompts for t in p][:long_tokens]
    out = {}
    cases = {
        f"packed batch: {len(g)} prompts, {sum(len(prompts[i]) for i in g)} tokens":
            (lambda b: b.score(*batch)),
        f"one sequence of {len(seq)} tokens": (lambda b: b.next_token_logprobs([seq])),
    }
    for name, fn in cases.items():
        lw, lg = profile_library(lambda: fn(lib), reps)
        dw, dg = profile_decoder(lambda: fn(dec), dec.runner.f.k, reps)
        out[name] = {"library": {"wall_s": lw, "groups": lg}, "decoder": {"wall_s": dw, "groups": dg}}
    return out


def render(results: dict) -> str:
    lines = []
    for model, cases in results.items():
        if model == "machine":
            continue
        for case, r in cases.items():
            lw, dw = r["library"]["wall_s"], r["decoder"]["wall_s"]
            lines.append(f"**{model}, {case}**: library forward {lw * 1000:.0f} ms, CPU decoder {dw * 1000:.0f} ms "
                         f"(**{lw / dw:.2f}x**)\n")
            lines.append("| library forward: operation | ms | share | | CPU decoder: step | ms | share |")
            lines.append("|---|---:|---:|---|---|---:|---:|")
            lg = sorted(r["library"]["groups"].items(), key=lambda kv: -kv[1])
            dg = sorted(r["decoder"]["groups"].items(), key=lambda kv: -kv[1])
            for i in range(max(len(lg), len(dg))):
                a = lg[i] if i < len(lg) else None
                b = dg[i] if i < len(dg) else None
                left = f"| {a[0]} | {a[1] * 1000:.0f} | {a[1] / lw:.0%} |" if a else "| | | |"
                right = f" | {b[0]} | {b[1] * 1000:.0f} | {b[1] / dw:.0%} |" if b else " | | | |"
                lines.append(left + right)
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="58m,0.9b")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    results = {"machine": common.machine()}
    for m in args.models.split(","):
        if m == "58m":
            base, lora = common.build_big()
            results["~58M (LoRA attached)"] = run_model(base, lora, args.reps, 500)  # its context is 512
        elif m == "0.9b":
            import bench_realsize

            results["0.94B"] = run_model(bench_realsize.generate("llama-0.9b"), None, args.reps, 1000)
        elif m == "demo":
            results["demo"] = run_model(common.DEMO_BASE, common.DEMO_LORA, args.reps, 250)
    text = render(results)
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        common.dump(results, args.json)


if __name__ == "__main__":
    main()
