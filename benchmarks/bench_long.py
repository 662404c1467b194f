"""Long prompts (issue 30): the CPU decoder against a tuned PyTorch scorer (HF transformers' Llama, SDPA attention,
float32, LM head on the last row only) on the same weights, interleaved, in one process.

Cases, on the generated ~0.32B Llama (hidden 1024, 20 layers; ``--model`` for another of bench_realsize's):

* ``512`` / ``1024`` / ``2048``: one prompt of that many tokens, two single-token labels scored at its end (what
  ``classify`` does with a long document);
* ``prefix 1020``: a 1,020-token prefix computed alone with its KV kept (what a few-shot run or a server cache entry
  computes once);
* ``prefix 1020 + 32 queries``: the prefix once, then 32 demo queries (~30 tokens) on top of it (ours: ``classify``'s
  prefix reuse; PyTorch: ``past_key_values``, cropped back after each query);
* ``64 short``: 64 demo queries in ``classify``'s batches (the short-prompt case, which must not get slower).

Per case: the median of ``--reps`` interleaved timings of each, PyTorch's time over ours (``> 1``: we are faster),
and the largest log-prob difference. ``--profile`` adds, for 512/1024/2048, where each spends its time: ours per
decoder step (GEMMs timed at the kernel, the rest by the function doing it), PyTorch per aten operation (its
profiler), grouped the same way.

    python benchmarks/bench_long.py [--model llama-0.3b] [--cases 512,1024,2048,prefix,prefix+32,short]
        [--reps 3] [--profile] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # numpy's BLAS at its defaults, as on a user's machine
    os.environ.pop(_var, None)

TORCH_GROUPS = [("GEMM (matmul)", ("mm", "matmul", "linear", "addmm", "bmm")),
                ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
                ("RMSNorm", ("pow", "mean", "rsqrt")),
                ("SwiGLU", ("silu",)),
                ("rotary embedding", ("cat", "neg", "slice", "cos", "sin")),
                ("element-wise and copies", ("mul", "add", "copy", "to", "contiguous", "view", "reshape", "transpose",
                                             "expand", "index", "select", "empty", "clone"))]


def ids_of(n: int, seed: int) -> list[int]:
    import numpy as np

    return [int(x) for x in np.random.default_rng(seed).integers(3, 500, size=n)]


class Torch:
    def __init__(self, loaded):
        import torch

        self.torch = torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
        self.hm = common.to_torch(loaded.model, loaded.config)

    def label_logprobs(self, ids: list[int], labels: list[int]):
        torch = self.torch
        with torch.inference_mode():
            h = self.hm.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
            lp = torch.log_softmax(self.hm.lm_head(h).float(), dim=-1)[0]
        return lp[labels].numpy()

    def prefix(self, ids: list[int]):
        torch = self.torch
        with torch.inference_mode():
            return self.hm.model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values


def profile_torch(fn, reps: int) -> tuple[float, dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    wall = (time.perf_counter() - t0) / reps
    groups = defaultdict(float)
    for ev in prof.key_averages():
        name = ev.key.lower()  # self time: an op's children are counted once, under their own names
        if not name.startswith("aten::"):
            continue
        for g, keys in TORCH_GROUPS:
            if any(k in name.split("::", 1)[1] for k in keys):
                groups[g] += ev.self_cpu_time_total / 1e6 / reps
                break
    groups["Python and framework overhead (rest)"] = max(0.0, wall - sum(groups.values()))
    del torch
    return wall, dict(groups)


def timed(fns: dict, reps: int) -> tuple[dict, dict]:
    times, results = {k: [] for k in fns}, {}
    for k, f in fns.items():
        results[k] = f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            results[k] = f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, results


def main() -> None:
    import numpy as np

    import bench_prefix
    import bench_realsize
    import profile_forward
    from paddle_scorer.compute.choose_backend import backend_for
    from paddle_scorer.model.loader import load
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-0.3b")
    ap.add_argument("--cases", default="512,1024,2048,prefix,prefix+32,short")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    folder = bench_realsize.generate(args.model)
    loaded = load(folder, None, device="cpu")
    backend = backend_for(loaded)
    ours_runner = backend.runner
    torch_side = Torch(loaded)
    labels = [11, 12]
    out = {"machine": common.machine(), "model": args.model, "params": int(loaded.facts.num_params),
           "compute": loaded.facts.compute, "rows": []}
    for case in args.cases.split(","):
        row = {"case": case}
        if case.isdigit():
            n = int(case)
            ids = ids_of(n, n)

            def ours(ids=ids):
                res = backend.score([ids], [[[lab] for lab in labels]])[0]
                return np.array([c.logprob for c in res])

            def theirs(ids=ids):
                return torch_side.label_logprobs(ids, labels)

            med, res = timed({"ours": ours, "torch": theirs}, args.reps)
            row.update(tokens=n, max_abs_diff=float(np.abs(res["ours"] - res["torch"]).max()))
            if args.profile:
                _, og = profile_forward.profile_decoder(ours, ours_runner.f.k, 1)
                _, tg = profile_torch(theirs, 1)
                row["profile"] = {"ours": og, "torch": tg}
        elif case == "prefix":
            ids = ids_of(1020, 1020)
            med, _ = timed({"ours": lambda: ours_runner.extend(None, ids), "torch": lambda: torch_side.prefix(ids)},
                           args.reps)
            row.update(tokens=1020)
        elif case == "prefix+32":
            template, prefix_tokens = bench_prefix.few_shot_template(loaded.tokenizer)
            clf = Classifier(loaded, ClassifyOptions(labels=["goods", "life"], template=template, chat_template=False))
            preps = [clf.prepare(r, i, f"#{i}") for i, r in enumerate(common.read_queries(32))]
            ts = bench_prefix.TorchPrefixScorer(loaded)
            from paddle_scorer.compute.prefix_tree import common_length

            depth = min(common_length(preps[0].context, p.context) for p in preps[1:])
            label_ids = [x[0] for x in preps[0].label_ids]

            def ours_p():
                clf.backend.reuse.cache.clear()
                return np.array([list(r["logprobs"].values()) for r in clf.score(preps)])

            def torch_p():
                return ts.run(preps[0].context[:depth], [p.context[depth:] for p in preps], label_ids)

            med, res = timed({"ours": ours_p, "torch": torch_p}, args.reps)
            row.update(prefix_tokens=prefix_tokens, queries=len(preps),
                       max_abs_diff=float(np.abs(res["ours"] - res["torch"]).max()))
        elif case == "short":
            import bench_cpu

            clf = Classifier(loaded, ClassifyOptions(labels=["goods", "life"], template=common.demo_template(),
                                                     chat_template=False))
            preps = [clf.prepare(r, i, f"#{i}") for i, r in enumerate(common.read_queries(64))]
            ts = bench_cpu.TorchScorer(loaded)
            label_ids = [x[0] for x in preps[0].label_ids]
            from paddle_scorer.compute import packing

            order = sorted(range(len(preps)), key=lambda i: -len(preps[i].context))
            groups = [[order[k] for k in g] for g in packing.regroup(
                [(preps[i].context, preps[i].label_ids) for i in order])]

            def torch_s():
                res = np.zeros((len(preps), 2))
                for g in groups:
                    res[g] = ts.score([preps[i] for i in g], label_ids)
                return res

            med, res = timed({"ours": lambda: np.array([list(r["logprobs"].values()) for r in clf.score(preps)]),
                              "torch": torch_s}, args.reps)
            row.update(prompts=len(preps), max_abs_diff=float(np.abs(res["ours"] - res["torch"]).max()))
        else:
            raise SystemExit(f"unknown case {case!r}")
        row.update(seconds=med, torch_over_ours=med["torch"] / med["ours"])
        print(row, flush=True)
        out["rows"].append(row)
    common.dump(out, args.json)


if __name__ == "__main__":
    main()
