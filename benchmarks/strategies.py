"""Alternative label-scoring strategies, plugged into the backend through its documented hook
(``Backend(runner, pad_id, strategy=...)``) so the benchmarks can compare them with the default.

``kv_cache_strategy`` is the earlier production algorithm: a prompt forward that keeps its KV cache,
then a second forward over the label tokens on per-label copies of the prompt's cache. The default
(:func:`paddle_scorer.compute.in_ram.packed_strategy`) packs the labels behind the prompt in one forward.
tests/test_compute_in_ram.py checks both against plain full forwards.
"""

from __future__ import annotations

import numpy as np

from paddle_scorer.compute.packing import ContinuationScore, padded


def kv_cache_strategy(backend, prompts, continuations):
    runner = backend.runner
    need_cache = any(len(c) > 1 for conts in continuations for c in conts)
    ids, pmask, pos = padded(prompts, backend.pad_id)
    lens = [len(p) for p in prompts]
    hidden, past = runner.hidden(ids, pmask, pos, use_cache=need_cache)
    first = runner.logprobs(runner.gather(hidden, [(b, n - 1) for b, n in enumerate(lens)]))
    results = [[ContinuationScore([float(first[b, c[0]])], int(first[b].argmax()) == c[0]) for c in conts]
               for b, conts in enumerate(continuations)]
    if not need_cache:
        return results
    jobs = [(b, j, c) for b, conts in enumerate(continuations) for j, c in enumerate(conts) if len(c) > 1]
    width = max(len(c) - 1 for _, _, c in jobs)
    t_ids = np.full((len(jobs), width), backend.pad_id, dtype=np.int64)
    cmask = np.zeros((len(jobs), width), dtype=np.int64)
    t_pos = np.zeros((len(jobs), width), dtype=np.int64)
    for r, (b, _, c) in enumerate(jobs):
        t = len(c) - 1
        t_ids[r, :t] = c[:-1]
        cmask[r, :t] = 1
        t_pos[r] = lens[b] + np.arange(width)
    rows = [b for b, _, _ in jobs]
    cache = runner.select_cache(past, rows)
    mask = np.concatenate([pmask[rows], cmask], axis=1)
    hidden, _ = runner.hidden(t_ids, mask, t_pos, cache=cache)
    sel = [(r, t) for r, (_, _, c) in enumerate(jobs) for t in range(len(c) - 1)]
    lp = runner.logprobs(runner.gather(hidden, sel))
    for k, (r, t) in enumerate(sel):
        b, j, c = jobs[r]
        target = c[t + 1]
        res = results[b][j]
        res.token_logprobs.append(float(lp[k, target]))
        res.greedy = res.greedy and int(lp[k].argmax()) == target
    return results
