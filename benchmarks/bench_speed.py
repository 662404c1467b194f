"""Speed comparisons measured side by side in this one process (same weights, same prompts).

    python benchmarks/bench_speed.py --part old|torch|labels|knobs [--quick] [--json OUT]

* ``old``: ``classify`` (paddle-scorer's Classifier) vs the old method -- greedy generation of up to
  50 new tokens one prompt at a time (Paddle, PaddleNLP forward + KV cache), top-20 of each step's
  softmax renormalised, label probability from the first step where a label appears.
* ``torch``: ``classify`` vs the same exact scoring written plainly in PyTorch + HF transformers
  (prompt+label concatenated per label, batched, full forward, log_softmax everywhere, sum the label
  tokens), and the same plain scorer in Paddle (separates framework from algorithm).
* ``labels``: cost of K = 1, 2, 10, 50 multi-token labels.
* ``knobs``: LM head only where needed vs full head; one forward for single-token labels vs
  per-label forwards; KV-cache prefix sharing vs concatenated sequences; batch size and sorting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402
from strategies import kv_cache_strategy  # noqa: E402
from paddle_scorer.compute.library_runner import ModelRunner, log_softmax  # noqa: E402
from paddle_scorer.compute.choose_backend import backend_for, pad_id_of  # noqa: E402
from paddle_scorer.model.loader import load  # noqa: E402
from paddle_scorer.process.environment import paddle  # noqa: E402
from paddle_scorer.tasks.classify import Classifier, ClassifyOptions  # noqa: E402

pd = paddle()


# --------------------------------------------------------------------------------------- set-up helpers


def classifier(loaded, labels, bs=8, template=None):
    return Classifier(loaded, ClassifyOptions(labels=list(labels), template=template or common.demo_template(),
                                              batch_size=bs))


def prepared(clf, n):
    return [clf.prepare(rec, rec.get("id", i), f"#{i}") for i, rec in enumerate(common.read_queries(n))]


def logprob_matrix(recs, labels):
    return np.array([[r["logprobs"][lab] for lab in labels] for r in recs])


def plain_batches(preps, bs, sort=True):
    order = sorted(range(len(preps)), key=lambda i: len(preps[i].context), reverse=True) if sort else list(range(len(preps)))
    return [order[s:s + bs] for s in range(0, len(order), bs)]


# --------------------------------------------------------------------------------------- the old method


def old_method(net, prompt_ids, label_first, eos, max_new=50, topk=20):
    """Greedy generation (KV cache), top-k of every step kept, then read the first step with a label."""
    n = len(prompt_ids)
    steps = []
    with pd.no_grad():
        out = net(input_ids=pd.to_tensor([prompt_ids]), attention_mask=pd.ones([1, n], dtype="int64"),
                  position_ids=pd.arange(n, dtype="int64").unsqueeze(0), use_cache=True, return_dict=True)
        for t in range(max_new):
            probs = pd.nn.functional.softmax(out.logits[:, -1, :].astype("float32"), axis=-1)
            v, i = pd.topk(probs, topk)
            v, i = v.numpy()[0], i.numpy()[0]
            steps.append((v, i))
            nxt = int(i[0])
            if nxt == eos:
                break
            out = net(input_ids=pd.to_tensor([[nxt]]), attention_mask=pd.ones([1, n + t + 1], dtype="int64"),
                      position_ids=pd.to_tensor([[n + t]]), past_key_values=out.past_key_values,
                      use_cache=True, return_dict=True)
    for v, i in steps:
        p = v / v.sum()
        found = {lab: float(p[list(i).index(tok)]) for lab, tok in label_first.items() if tok in i}
        if found:
            return found, len(steps)
    return None, len(steps)


def part_old(args):
    res = {}
    models = [("demo (base+adapter, attach)", common.DEMO_BASE, common.DEMO_LORA, args.n_old_demo),
              ("~58M generated (base+adapter, attach)", common.BIG_BASE, common.BIG_LORA, args.n_old_big)]
    for name, base, lora, n_old in models:
        loaded = load(base, lora)
        labels = ["goods", "life"]
        clf = classifier(loaded, labels)
        preps = prepared(clf, args.n)
        eos = loaded.tokenizer.eos_token_id
        label_first = {lab: preps[0].label_ids[j][0] for j, lab in enumerate(labels)}
        t_new, _ = common.median_time(lambda: clf.score(preps), reps=args.reps)
        exact = clf.score(preps)
        olds = []

        def run_old():
            olds.clear()
            for p in preps[:n_old]:
                olds.append(old_method(loaded.model, p.context, label_first, eos))

        old_method(loaded.model, preps[0].context, label_first, eos)  # warm-up
        t_old, _ = common.median_time(run_old, reps=args.reps_old, warmup=0)
        steps = [s for _, s in olds]
        found = [(f, r) for (f, _), r in zip(olds, exact) if f]
        diffs = [abs(f.get("goods", 0.0) / max(sum(f.values()), 1e-30) - r["probs"]["goods"]) for f, r in found]
        res[name] = {
            "params": common.count_params(loaded.model), "n_prompts_new": len(preps), "n_prompts_old": n_old,
            "new_pps": len(preps) / t_new, "old_pps": n_old / t_old, "speedup": (len(preps) / t_new) / (n_old / t_old),
            "old_mean_steps": float(np.mean(steps)), "old_label_found": len(found),
            "old_max_abs_err_p_goods": float(max(diffs)) if diffs else None,
            "mean_prompt_tokens": float(np.mean([len(p.context) for p in preps])),
        }
        print(name, res[name], flush=True)
    return res


# --------------------------------------------------------------------------------------- plain scorers


def plain_paddle(net, preps, bs, pad):
    """Prompt+label concatenated per label, batched, full forward (head everywhere), log_softmax, sum."""
    out = [None] * len(preps)
    with pd.no_grad():
        for idx in plain_batches(preps, bs):
            seqs = [(i, j, preps[i].context, lab) for i in idx for j, lab in enumerate(preps[i].label_ids)]
            width = max(len(c) + len(lab) for _, _, c, lab in seqs)
            ids = np.full((len(seqs), width), pad, dtype=np.int64)
            mask = np.zeros((len(seqs), width), dtype=np.int64)
            for r, (_, _, c, lab) in enumerate(seqs):
                ids[r, :len(c) + len(lab)] = c + lab
                mask[r, :len(c) + len(lab)] = 1
            logits = net(input_ids=pd.to_tensor(ids), attention_mask=pd.to_tensor(mask), return_dict=True).logits
            # x - logsumexp(x): Paddle's own log_softmax kernel takes ~0.1 s per 32000-wide row on CPU
            lp = log_softmax(pd, logits).numpy()
            for r, (i, j, c, lab) in enumerate(seqs):
                if out[i] is None:
                    out[i] = [0.0] * len(preps[i].label_ids)
                n = len(c)
                out[i][j] = float(sum(lp[r, n - 1 + t, tok] for t, tok in enumerate(lab)))
    return np.array(out)


def plain_torch(model, preps, bs, pad):
    import torch

    out = [None] * len(preps)
    with torch.inference_mode():
        for idx in plain_batches(preps, bs):
            seqs = [(i, j, preps[i].context, lab) for i in idx for j, lab in enumerate(preps[i].label_ids)]
            width = max(len(c) + len(lab) for _, _, c, lab in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, (_, _, c, lab) in enumerate(seqs):
                ids[r, :len(c) + len(lab)] = torch.tensor(c + lab)
                mask[r, :len(c) + len(lab)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = torch.log_softmax(logits.float(), dim=-1)
            for r, (i, j, c, lab) in enumerate(seqs):
                if out[i] is None:
                    out[i] = [0.0] * len(preps[i].label_ids)
                n = len(c)
                pos = torch.arange(n - 1, n - 1 + len(lab))
                out[i][j] = float(lp[r, pos, torch.tensor(lab)].sum())
    return np.array(out)


def part_torch(args):
    import torch

    res = {"torch_threads": torch.get_num_threads()}
    cases = [("~58M generated, 2 single-token labels", common.BIG_BASE, ["goods", "life"]),
             ("~58M generated, 10 multi-token labels", common.BIG_BASE, common.LABEL_WORDS[:10]),
             ("demo (adapter merged), 2 single-token labels", (common.DEMO_BASE, common.DEMO_LORA), ["goods", "life"])]
    for name, paths, labels in cases:
        if isinstance(paths, tuple):
            loaded = load(paths[0], paths[1], mode="merge")
        else:
            loaded = load(paths)
        bs = args.bs
        clf = classifier(loaded, labels, bs=bs)
        preps = prepared(clf, args.n)
        pad = pad_id_of(loaded.tokenizer)
        net = ModelRunner(loaded.model).net
        tmodel = common.to_torch(net, loaded.config)
        ours = logprob_matrix(clf.score(preps), labels)
        pp = plain_paddle(net, preps, bs, pad)
        tt = plain_torch(tmodel, preps, bs, pad)
        time.sleep(0.5)
        t_torch, _ = common.median_time(lambda: plain_torch(tmodel, preps, bs, pad), reps=args.reps)
        time.sleep(0.5)  # let the other OpenMP runtime's spinning threads go to sleep
        t_ours, _ = common.median_time(lambda: clf.score(preps), reps=args.reps)
        time.sleep(0.5)
        t_pp, _ = common.median_time(lambda: plain_paddle(net, preps, bs, pad), reps=args.reps)
        n = len(preps)
        res[name] = {
            "ours_pps": n / t_ours, "torch_plain_pps": n / t_torch, "paddle_plain_pps": n / t_pp,
            "ours_vs_torch": t_torch / t_ours, "paddle_plain_vs_torch": t_torch / t_pp,
            "max_abs_diff_torch_vs_paddle_plain": float(np.abs(tt - pp).max()),
            "max_abs_diff_ours_vs_torch": float(np.abs(ours - tt).max()),
            "max_abs_diff_ours_vs_paddle_plain": float(np.abs(ours - pp).max()),
            "mean_abs_logprob": float(np.abs(tt).mean()),
            "n_prompts": n, "batch_size": bs, "label_tokens": [len(x) for x in preps[0].label_ids],
        }
        print(name, res[name], flush=True)
    return res


# --------------------------------------------------------------------------------------- labels and knobs


# Variants, through the backend's documented hooks only (see src/paddle_scorer/backend.py and strategies.py):
# a runner wrapper (``backend.runner`` may be wrapped) or a scoring strategy (``backend_for(loaded, strategy=...)``).


class RunnerWrapper:
    """Delegates to the production :class:`~paddle_scorer.compute.library_runner.ModelRunner`; subclasses change one step."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FullHead(RunnerWrapper):
    """The 'before' of 'LM head only at needed positions': the head also runs on every position."""

    def hidden(self, *a, **k):
        hidden, past = self.inner.hidden(*a, **k)
        self.inner.head(hidden)
        return hidden, past


class KernelLogSoftmax(RunnerWrapper):
    """The 'before' of the log-softmax change: Paddle's ``log_softmax`` kernel on the selected rows."""

    def logprobs(self, rows):
        logits = self.inner.head(rows.unsqueeze(0)).squeeze(0).astype("float32")
        return pd.nn.functional.log_softmax(logits, axis=-1).numpy()


def concat_strategy(backend, prompts, continuations, per_label=False):
    """The 'before' of prefix sharing: prompt+label[:-1] concatenated per (prompt, label), one batch; head only at
    the label positions. ``per_label``: one forward per label instead of one batch."""
    from paddle_scorer.compute.packing import ContinuationScore, padded

    runner = backend.runner
    groups = [[j] for j in range(len(continuations[0]))] if per_label else [list(range(len(continuations[0])))]
    out = [[None] * len(c) for c in continuations]
    for g in groups:
        seqs = [(b, j, prompts[b] + continuations[b][j][:-1]) for b in range(len(prompts)) for j in g]
        ids, mask, pos = padded([s for _, _, s in seqs], backend.pad_id)
        hidden, _ = runner.hidden(ids, mask, pos)
        sel = [(r, len(prompts[b]) - 1 + t) for r, (b, j, _) in enumerate(seqs) for t in range(len(continuations[b][j]))]
        lp = runner.logprobs(runner.gather(hidden, sel))
        k = 0
        for b, j, _ in seqs:
            cont = continuations[b][j]
            out[b][j] = lp[k:k + len(cont)][np.arange(len(cont)), cont].sum()
            k += len(cont)
    return [[ContinuationScore([float(v)], False) for v in row] for row in out]


def per_label_strategy(backend, prompts, continuations):
    return concat_strategy(backend, prompts, continuations, per_label=True)


CONCAT, PER_LABEL = ("strategy", concat_strategy), ("strategy", per_label_strategy)
KV_CACHE = ("strategy", kv_cache_strategy)
FULL_HEAD, KERNEL_LOG_SOFTMAX = ("runner", FullHead), ("runner", KernelLogSoftmax)


def variant_backend(loaded, variant):
    """The production backend, or one with a variant plugged into a documented hook."""
    if variant is None:
        return backend_for(loaded)
    hook, what = variant
    if hook == "strategy":
        return backend_for(loaded, strategy=what)
    backend = backend_for(loaded)
    backend.runner = what(backend.runner)
    return backend


def time_variant(clf, loaded, preps, variant, reps):
    base = clf.backend
    clf.backend = variant_backend(loaded, variant)
    try:
        lp = logprob_matrix(clf.score(preps), clf.opts.labels)
        t, _ = common.median_time(lambda: clf.score(preps), reps=reps)
    finally:
        clf.backend = base
    return t, lp


def part_labels(args):
    loaded = load(common.BIG_BASE, common.BIG_LORA)
    res = {}
    for k in (1, 2, 10, 50):
        labels = common.LABEL_WORDS[:k]
        clf = classifier(loaded, labels, bs=args.bs)
        preps = prepared(clf, args.n)
        t, _ = common.median_time(lambda: clf.score(preps), reps=args.reps)
        lens = [len(x) for x in preps[0].label_ids]
        res[k] = {"pps": len(preps) / t, "seconds": t, "label_tokens_mean": float(np.mean(lens)),
                  "label_tokens_max": max(lens)}
        if k == 10:
            # the previous default: a 2nd forward on per-label KV-cache copies
            tk, lk = time_variant(clf, loaded, preps, KV_CACHE, args.reps)
            res["10-kv-cache"] = {"pps": len(preps) / tk, "seconds": tk,
                                  "max_abs_diff": float(np.abs(logprob_matrix(clf.score(preps), labels) - lk).max())}
            tc, lc = time_variant(clf, loaded, preps, CONCAT, args.reps)
            ours = logprob_matrix(clf.score(preps), labels)
            res["10-concat"] = {"pps": len(preps) / tc, "seconds": tc, "max_abs_diff": float(np.abs(ours - lc).max())}
        print(k, res[k], flush=True)
    for k in list(res):
        res[k]["vs_1_label"] = res[k]["seconds"] / res[1]["seconds"]
    short = {}
    for k in (1, 10):  # labels of 1-2 tokens (the demo tokenizer's whole words)
        clf = classifier(loaded, common.SHORT_LABEL_WORDS[:k], bs=args.bs)
        preps = prepared(clf, args.n)
        t, _ = common.median_time(lambda: clf.score(preps), reps=args.reps)
        lens = [len(x) for x in preps[0].label_ids]
        short[k] = {"pps": len(preps) / t, "seconds": t, "label_tokens_mean": float(np.mean(lens)),
                    "label_tokens_max": max(lens)}
        if k == 10:
            tk, _ = time_variant(clf, loaded, preps, KV_CACHE, args.reps)
            short["10-kv-cache"] = {"pps": len(preps) / tk, "seconds": tk}
    for k in short:
        short[k]["vs_1_label"] = short[k]["seconds"] / short[1]["seconds"]
        res[f"short-{k}"] = short[k]
    print(short, flush=True)
    return res


def score_batches(clf, preps, sort=True):
    """The backend on batches of ``clf.opts.batch_size`` prepared records, sorted by length (as classify does) or in
    file order, through the backend's public ``score_many``."""
    bs = clf.opts.batch_size
    return clf.backend.score_many([([preps[i].context for i in idx], [preps[i].label_ids for i in idx])
                                   for idx in plain_batches(preps, bs, sort)])


def part_knobs(args):
    loaded = load(common.BIG_BASE, common.BIG_LORA)
    res = {}
    single = ["goods", "life"]
    multi = common.LABEL_WORDS[:10]
    for name, labels, variants in [
        ("2 single-token labels", single, [("ours", None), ("full LM head", FULL_HEAD), ("per-label forwards", PER_LABEL),
                                           ("concatenated sequences", CONCAT),
                                           ("Paddle log_softmax kernel", KERNEL_LOG_SOFTMAX)]),
        ("10 multi-token labels", multi, [("ours", None), ("full LM head", FULL_HEAD),
                                          ("concatenated sequences", CONCAT)]),
    ]:
        clf = classifier(loaded, labels, bs=args.bs)
        preps = prepared(clf, args.n)
        ref = None
        for vname, variant in variants:
            t, lp = time_variant(clf, loaded, preps, variant, args.reps)
            ref = lp if ref is None else ref
            res[f"{name} / {vname}"] = {"pps": len(preps) / t, "max_abs_diff": float(np.abs(lp - ref).max())}
            print(name, vname, res[f"{name} / {vname}"], flush=True)
    # batch size and length sorting: demo queries in file order have mixed lengths
    for labels_name, labels in (("2 single-token labels", single), ("10 multi-token labels", multi)):
        for bs in args.batch_sizes:
            for sort in (True, False):
                clf = Classifier(loaded, ClassifyOptions(labels=labels, template=common.demo_template(), batch_size=bs))
                preps = prepared(clf, args.n)
                t, _ = common.median_time(lambda: score_batches(clf, preps, sort), reps=args.reps)
                key = f"{labels_name} / batch {bs} / {'sorted' if sort else 'unsorted'}"
                res[key] = {"pps": len(preps) / t}
                print(key, res[key], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", required=True, choices=["old", "torch", "labels", "knobs"])
    ap.add_argument("--n", type=int, default=64, help="prompts per timed run")
    ap.add_argument("--n-old-demo", type=int, default=16)
    ap.add_argument("--n-old-big", type=int, default=6)
    ap.add_argument("--reps-old", type=int, default=1)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16, 32])
    ap.add_argument("--json")
    args = ap.parse_args()
    common.build_big()
    t0 = time.perf_counter()
    res = {"part_old": part_old, "part_torch": part_torch, "part_labels": part_labels, "part_knobs": part_knobs}[
        f"part_{args.part}"](args)
    res["_seconds"] = time.perf_counter() - t0
    res["_args"] = vars(args)
    common.dump(res, args.json)


if __name__ == "__main__":
    main()
