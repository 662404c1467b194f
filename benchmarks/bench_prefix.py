"""Few-shot classify: a ~1000-token shared prefix in front of every query (issue 19), in one process.

For each model: the same queries (demo queries, labels goods/life, ~30 tokens each) scored
  A. with the plain demo template (no shared prefix): the reference time;
  B. behind a ~1000-token few-shot prefix (worked examples), prefix reuse on (the default);
  C. the same few-shot prompts with ``--no-prefix-reuse`` (every record recomputes the prefix), on a subset;
  D. a PyTorch scorer on the same weights reusing ``past_key_values``: the prefix once, then each query on a copy
     of its cache (``DynamicCache.crop`` back to the prefix after each), LM head at the last position only.
Ratios: B / A (target <= 1.5x), C / A per query (what reuse saves), B vs D (prompts/s). Log-probs of B equal C
and D within float32 noise (reported).

    python benchmarks/bench_prefix.py [--models 58m,0.9b] [--n 256] --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

TARGET_PREFIX_TOKENS = 1000


def model_58m_2k() -> Path:
    """The generated ~58M Llama with a 2048-token context (same weights; its own config allows 512)."""
    base, _ = common.build_big()
    out = common.CACHE / "llama58m-2k"
    if not (out / "config.json").is_file():
        shutil.copytree(base, out, dirs_exist_ok=True)
        cfg = json.loads((out / "config.json").read_text())
        cfg["max_position_embeddings"] = 2048
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def few_shot_template(tok) -> tuple[str, int]:
    """Worked examples (queries not scored below) until the prefix has ~TARGET_PREFIX_TOKENS tokens."""
    rows = common.read_queries()
    shots, text = [], ""
    for r in reversed(rows):  # the scored queries come from the front
        label = r.get("label") or "goods"
        candidate = text + f"Query: {r['query']}\nAnswer: {label}\n"
        if len(tok(candidate)["input_ids"]) > TARGET_PREFIX_TOKENS:
            break
        text = candidate
        shots.append(r["id"])
    return text + "Query: {query}\nAnswer:", len(tok(text)["input_ids"])


def scored(clf, preps):
    import numpy as np

    t = time.perf_counter()
    recs = clf.score(preps)
    return time.perf_counter() - t, np.array([list(r["logprobs"].values()) for r in recs])


class TorchPrefixScorer:
    def __init__(self, loaded):
        import torch

        self.torch = torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        self.hm = common.to_torch(loaded.model, loaded.config)

    def run(self, prefix_ids: list[int], queries: list[list[int]], label_ids: list[int]):
        import numpy as np

        torch = self.torch
        out = np.zeros((len(queries), len(label_ids)))
        with torch.inference_mode():
            cache = self.hm.model(input_ids=torch.tensor([prefix_ids]), use_cache=True).past_key_values
            p = len(prefix_ids)
            for i, q in enumerate(queries):
                pos = torch.arange(p, p + len(q))[None]
                h = self.hm.model(input_ids=torch.tensor([q]), past_key_values=cache, position_ids=pos,
                                  use_cache=True).last_hidden_state
                lp = torch.log_softmax(self.hm.lm_head(h[:, -1]).float(), dim=-1)[0]
                out[i] = lp[label_ids].numpy()
                cache.crop(p)
        return out


def bench_model(name: str, folder: Path, n: int, n_noreuse: int, n_torch: int) -> dict:
    import numpy as np

    from paddle_scorer.model.loader import load
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    loaded = load(folder, None, device="cpu")
    tok = loaded.tokenizer
    template, prefix_tokens = few_shot_template(tok)
    rows = common.read_queries(n)

    def clf(tpl, reuse=True):
        return Classifier(loaded, ClassifyOptions(labels=["goods", "life"], template=tpl, chat_template=False,
                                                  prefix_reuse=reuse))

    plain_c, shot_c, noreuse_c = clf(common.demo_template()), clf(template), clf(template, reuse=False)
    plain = [plain_c.prepare(r, i, f"#{i}") for i, r in enumerate(rows)]
    shot = [shot_c.prepare(r, i, f"#{i}") for i, r in enumerate(rows)]
    scored(plain_c, plain[:8])  # warm-up
    scored(shot_c, shot[:8])
    times = {"plain": [], "reuse": []}
    for _ in range(2):
        t, _ = scored(plain_c, plain)
        times["plain"].append(t)
        shot_c.backend.reuse.cache.clear()  # every repetition computes its prefix again
        t, lp_reuse = scored(shot_c, shot)
        times["reuse"].append(t)
    t_plain, t_reuse = min(times["plain"]), min(times["reuse"])
    t_no, lp_no = scored(noreuse_c, shot[:n_noreuse])
    res = {
        "model": name, "params": int(loaded.facts.num_params), "queries": n, "prefix_tokens": prefix_tokens,
        "mean_query_tokens": statistics.mean(len(p.context) for p in plain),
        "few_shot_prompt_tokens": statistics.mean(len(p.context) for p in shot),
        "seconds": {"plain": t_plain, "reuse": t_reuse, "no_reuse_per_query": t_no / n_noreuse},
        "pps": {"plain": n / t_plain, "reuse": n / t_reuse, "no_reuse": n_noreuse / t_no},
        "reuse_vs_plain": t_reuse / t_plain, "no_reuse_vs_plain": (t_no / n_noreuse) / (t_plain / n),
        "reuse_stats": shot_c.backend.reuse_stats(),
        "max_abs_diff_reuse_vs_no_reuse": float(np.abs(lp_reuse[:n_noreuse] - lp_no).max()),
    }
    if n_torch:
        import torch  # noqa: F401

        ts = TorchPrefixScorer(loaded)
        from paddle_scorer.compute.prefix_tree import common_length

        depth = min(common_length(shot[0].context, p.context) for p in shot[1:n_torch])
        prefix_ids = shot[0].context[:depth]
        queries = [p.context[len(prefix_ids):] for p in shot[:n_torch]]
        label_ids = [x[0] for x in shot[0].label_ids]
        ts.run(prefix_ids, queries[:2], label_ids)
        t = time.perf_counter()
        lp_t = ts.run(prefix_ids, queries, label_ids)
        t_t = time.perf_counter() - t
        res["pps"]["torch_past_key_values"] = n_torch / t_t
        res["reuse_vs_torch"] = res["pps"]["reuse"] / res["pps"]["torch_past_key_values"]
        res["max_abs_diff_reuse_vs_torch"] = float(np.abs(lp_reuse[:n_torch] - lp_t).max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="58m,0.9b")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"machine": common.machine(), "rows": []}
    for m in args.models.split(","):
        if m == "58m":
            out["rows"].append(bench_model("~58M (2048-token context)", model_58m_2k(), args.n, 32, 64))
        elif m == "0.9b":
            import bench_realsize

            out["rows"].append(bench_model("0.94B", bench_realsize.generate("llama-0.9b"), args.n, 4, 32))
        elif m == "demo":
            out["rows"].append(bench_model("demo", common.DEMO_BASE, args.n, 8, 8))
    common.dump(out, args.json)


if __name__ == "__main__":
    main()
