"""CPU scoring against the hardware's own peak and against a tuned PyTorch scorer, in one run (issue 18).

1. **GEMM peak table**: float32 ``[1024, 4096] x [4096, 11008]`` (a Llama-7B MLP matmul over 1024 tokens), best of
   4, three interleaved rounds, max relative error vs float64, for: Paddle's ``F.linear`` (what the library forward
   runs), paddle-scorer's chosen kernel (``gemm.choose``), numpy's BLAS as this machine's environment has it, and
   numpy's BLAS with ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` unset (a child process; the machines here set
   both for old OpenBLAS builds, a user's machine does not; the product never changes them), plus PyTorch float32
   and bfloat16 for reference (child processes).
2. **classify rows** per model (the generated ~58M and 0.94B Llamas): the same prompts (demo queries, labels
   goods/life), the same length-sorted batches of ~1024 tokens, scored by ``classify``'s ``Classifier`` with the
   library's forward (what ``classify`` ran before this round), with the CPU decoder (now), and by a tuned exact
   PyTorch scorer on the same weights (one forward per batch, LM head only at each prompt's last position);
   interleaved repetitions, median. Useful FLOPs counted as in section 5 (decoder on real tokens, attention, one
   LM-head row per prompt); GFLOP/s as a fraction of the best GEMM peak of table 1.

    python benchmarks/bench_cpu.py [--models 58m,0.9b] [--n 256] [--reps 3] --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

SHAPE = (1024, 4096, 11008)

_GEMM_CHILD = r"""
import json, sys, time, numpy as np
m, k, n = %d, %d, %d
rng = np.random.default_rng(0)
a = rng.standard_normal((m, k), dtype=np.float32); b = rng.standard_normal((k, n), dtype=np.float32)
want = a[:64].astype(np.float64) @ b.astype(np.float64)
which = sys.argv[1]
if which == "numpy":
    f = lambda: a @ b
    got = a[:64] @ b
else:
    import torch
    torch.set_num_threads(int(sys.argv[2]))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if which == "torch-bf16":
        ta, tb = ta.bfloat16(), tb.bfloat16()
    f = lambda: ta @ tb
    got = (ta[:64] @ tb).float().numpy()
f()
best = 1e9
for _ in range(4):
    t = time.perf_counter(); f(); best = min(best, time.perf_counter() - t)
err = float(np.abs(got - want).max() / np.abs(want).max())
print(json.dumps({"gflops": 2 * m * k * n / best / 1e9, "rel_err": err}))
"""


def _child_gemm(which: str, env: dict) -> dict:
    code = _GEMM_CHILD % SHAPE
    p = subprocess.run([sys.executable, "-c", code, which, env.get("OMP_NUM_THREADS", "2")], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def gemm_table(rounds: int = 3) -> dict:
    import numpy as np

    from paddle_scorer.compute import gemm
    from paddle_scorer.process.environment import paddle

    pd = paddle()
    m, k, n = SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    want = a[:64].astype(np.float64) @ b.astype(np.float64)
    ta, tb = pd.to_tensor(a), pd.to_tensor(b)
    kernel, choice = gemm.choose((m, k, n))
    wb = gemm.Mat(b.copy())

    def best(f):
        f()
        t_best = 1e9
        for _ in range(4):
            t = time.perf_counter()
            f()
            t_best = min(t_best, time.perf_counter() - t)
        return 2 * m * k * n / t_best / 1e9

    def err(got):
        return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())

    base_env = dict(os.environ)
    unset_env = {kk: v for kk, v in os.environ.items() if kk not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    rows: dict[str, list] = {}
    errs: dict[str, float] = {}
    for _ in range(rounds):
        rows.setdefault("paddle F.linear (library forward)", []).append(
            best(lambda: pd.nn.functional.linear(ta, tb)))
        errs["paddle F.linear (library forward)"] = err(pd.nn.functional.linear(ta[:64], tb).numpy())
        rows.setdefault(f"chosen: {choice.path}", []).append(best(lambda: kernel.mm(a, wb)))
        errs[f"chosen: {choice.path}"] = err(kernel.mm(a[:64].copy(), wb))
        for label, env in (("numpy BLAS, this machine's OPENBLAS_* environment", base_env),
                           ("numpy BLAS, OPENBLAS_CORETYPE/L2_SIZE unset (child process)", unset_env)):
            r = _child_gemm("numpy", env)
            if "gflops" in r:
                rows.setdefault(label, []).append(r["gflops"])
                errs[label] = r["rel_err"]
        for label, which in (("PyTorch float32 (reference)", "torch"), ("PyTorch bfloat16 (reference, not exact)", "torch-bf16")):
            r = _child_gemm(which, unset_env)
            if "gflops" in r:
                rows.setdefault(label, []).append(r["gflops"])
                errs[label] = r["rel_err"]
    table = {name: {"gflops_rounds": v, "gflops": max(v), "rel_err": errs.get(name)} for name, v in rows.items()}
    exact = [x["gflops"] for name, x in table.items() if "bfloat16" not in name]
    return {"shape": list(SHAPE), "rows": table, "best_fp32_peak": max(exact), "choice": choice.to_dict(),
            "env": {kk: os.environ.get(kk) for kk in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                    "MKL_DEBUG_CPU_TYPE")}}


def scoring_flops(cfg, preps) -> float:
    h, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    total = 0.0
    for p in preps:
        n = len(p.context)
        total += 2 * linear * n + layers * 4 * h * n * (n + 1) / 2 + 2 * h * v  # one head row per prompt
    return total


class TorchScorer:
    """A tuned exact PyTorch scorer: the same batches as classify, one forward each (padded, attention mask,
    position ids), LM head only at each prompt's last real position, float32 log-softmax."""

    def __init__(self, loaded):
        """``loaded``: the model with any adapter merged (the PyTorch side runs plain Llama weights)."""
        import torch

        self.torch = torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        self.hm = common.to_torch(loaded.model, loaded.config)

    def score(self, preps, labels_ids: list[int]):
        torch = self.torch
        n = max(len(p.context) for p in preps)
        ids = torch.zeros((len(preps), n), dtype=torch.long)
        mask = torch.zeros((len(preps), n), dtype=torch.long)
        for i, p in enumerate(preps):
            ids[i, : len(p.context)] = torch.tensor(p.context)
            mask[i, : len(p.context)] = 1
        with torch.inference_mode():
            h = self.hm.model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = torch.tensor([len(p.context) - 1 for p in preps])
            rows = h[torch.arange(len(preps)), last]
            lp = torch.log_softmax(self.hm.lm_head(rows).float(), dim=-1)
        return lp[:, labels_ids].numpy()


def classify_rows(name: str, model_dir: Path, lora: Path | None, n: int, reps: int, peak: float) -> dict:
    import numpy as np

    from paddle_scorer.compute import packing
    from paddle_scorer.model.loader import load
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    loaded = load(model_dir, lora, device="cpu")
    opts = ClassifyOptions(labels=["goods", "life"], template=common.demo_template(), chat_template=False)
    os.environ["PADDLE_SCORER_CPU_FORWARD"] = "library"
    lib = Classifier(loaded, opts)
    lib_compute = loaded.facts.compute
    del os.environ["PADDLE_SCORER_CPU_FORWARD"]
    dec = Classifier(loaded, opts)
    dec_compute = loaded.facts.compute
    rows = common.read_queries(n)
    preps = [dec.prepare(r, i, f"#{i}") for i, r in enumerate(rows)]
    order = sorted(range(len(preps)), key=lambda i: len(preps[i].context), reverse=True)
    groups = [[order[k] for k in g] for g in packing.regroup([(preps[i].context, preps[i].label_ids) for i in order])]
    label_ids = [p[0] for p in preps[0].label_ids]
    if any(len(x) != 1 for p in preps for x in p.label_ids):
        raise SystemExit("this benchmark assumes single-token labels")
    torch_scorer = TorchScorer(load(model_dir, lora, device="cpu", mode="merge") if lora else loaded)

    def run_torch():
        out = np.zeros((len(preps), len(label_ids)))
        for g in groups:
            out[g] = torch_scorer.score([preps[i] for i in g], label_ids)
        return out

    def run_clf(clf):
        return np.array([list(r["logprobs"].values()) for r in clf.score(preps)])

    times = {"library": [], "decoder": [], "torch": []}
    results = {}
    for _ in range(reps + 1):  # the first round is the warm-up
        for key, fn in (("library", lambda: run_clf(lib)), ("decoder", lambda: run_clf(dec)), ("torch", run_torch)):
            t = time.perf_counter()
            results[key] = fn()
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    flops = scoring_flops(loaded.config, preps)
    tokens = sum(len(p.context) for p in preps)
    return {
        "model": name, "params": int(loaded.facts.num_params), "prompts": len(preps), "tokens": tokens,
        "gflop": flops / 1e9, "seconds": med, "pps": {k: len(preps) / v for k, v in med.items()},
        "gflops": {k: flops / v / 1e9 for k, v in med.items()},
        "fraction_of_peak": {k: flops / v / 1e9 / peak for k, v in med.items()},
        "decoder_vs_library": med["library"] / med["decoder"], "decoder_vs_torch": med["torch"] / med["decoder"],
        "max_abs_diff": {"decoder_vs_library": float(np.abs(results["decoder"] - results["library"]).max()),
                         "decoder_vs_torch": float(np.abs(results["decoder"] - results["torch"]).max())},
        "compute": {"library": lib_compute, "decoder": dec_compute},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="58m,0.9b")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--n-big", type=int, default=64, help="prompts for the 0.94B model")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    res = {"machine": common.machine(), "gemm": gemm_table()}
    peak = res["gemm"]["best_fp32_peak"]
    res["classify"] = []
    for m in args.models.split(","):
        if m == "58m":
            base, lora = common.build_big()
            res["classify"].append(classify_rows("~58M (LoRA r=8 attached)", base, lora, args.n, args.reps, peak))
        elif m == "0.9b":
            import bench_realsize

            res["classify"].append(classify_rows("0.94B", bench_realsize.generate("llama-0.9b"), None, args.n_big,
                                                 args.reps, peak))
        elif m == "demo":
            res["classify"].append(classify_rows("demo", common.DEMO_BASE, common.DEMO_LORA, args.n, args.reps, peak))
    common.dump(res, args.json)


if __name__ == "__main__":
    main()
