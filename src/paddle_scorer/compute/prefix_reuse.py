"""Prefix reuse for a runner that can continue a computed prefix (the CPU decoder, :mod:`paddle_scorer.compute.numpy_runner`):
a shared prompt prefix is computed once and every record's remaining tokens run on top of it.

* Within a batch, :func:`paddle_scorer.compute.prefix_tree.plan` finds what the records share (a radix over token ids); each
  kept prefix is computed once, from its parent's keys/values, then its records' own tokens (and tree-packed
  labels) in batches of ~``CALL_TOKENS`` tokens, every row attending to the one prefix.
* Across batches and requests, computed prefixes stay in a bounded LRU cache
  (:class:`~paddle_scorer.compute.prefix_tree.PrefixCache`, per adapter): the next batch of a dataset, lm-eval's next choice
  for the same context, a chat header every request starts with, reuse the longest head of an entry they share.
* Echo (log-probs at every prompt position, serve) reads a prefix's positions from results computed once for
  that prefix; the position where requests diverge is recomputed from the prefix's last hidden state, so a
  token's value and its top entries always come from one float32 row.

Results equal the computation without reuse up to float32 summation order (tests: 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from paddle_scorer.compute import prefix_tree
from paddle_scorer.compute.packing import CALL_TOKENS, SequenceLogprobs, pack, padded, regroup, top_k, unpack
from paddle_scorer.compute.prefix_tree import Prefix, PrefixCache

DEFAULT_CACHE_BYTES = 256 << 20  # in-process default (classify, generate); serve sizes it from --prefix-cache
CACHE_TOKENS = 2048  # ... raised so that it holds this many tokens of the model's prefixes (a few-shot prefix)
MAX_DEFAULT_CACHE = 2 << 30


def default_cache_bytes(runner) -> int:
    """classify's and generate's prefix cache: :data:`DEFAULT_CACHE_BYTES`, or what :data:`CACHE_TOKENS` tokens of this
    model's prefixes take (keys, values and hidden state of every layer) when that is more (a 7B model's 1,000-token
    few-shot prefix is ~1 GB), at most :data:`MAX_DEFAULT_CACHE` (and at most half of what the memory budget leaves
    after the model: ``backend_for``). A run's windows are ordered so that records sharing
    a prefix are neighbours: the cache carries prefixes between blocks, not the whole input's."""
    f = getattr(runner, "f", None)
    spec, layers = getattr(f, "spec", None), getattr(runner, "layers", None)
    if spec is None or not layers:
        return DEFAULT_CACHE_BYTES
    per_token = 4 * (len(layers) * spec.kv_heads * (spec.head_dim + spec.value_dim) + spec.hidden)
    return int(min(MAX_DEFAULT_CACHE, max(DEFAULT_CACHE_BYTES, CACHE_TOKENS * per_token)))


@dataclass
class Reused:
    """What prefix reuse did, for provenance and ``usage``."""

    savings: prefix_tree.Savings = field(default_factory=prefix_tree.Savings)
    cached_tokens: int = 0  # prompt tokens read from the cache instead of computed

    costs: dict | None = None  # what keeping a prefix costs on this runner (measure_costs)

    def to_dict(self, cache: PrefixCache) -> dict:
        return {"enabled": True, **self.savings.to_dict(), "tokens_from_cache": self.cached_tokens,
                "cache": cache.stats(), "costs": self.costs}


def measure_costs(runner, pad_id: int) -> dict:
    """What keeping a prefix costs on this runner, measured on it (a few ms for a small model, about a second for a
    1B one), against what a token costs in a batch: ``token_seconds`` (the slope between a 4-token and a
    128-token forward), ``node_seconds`` (two calls of two rows on top of a 16-token prefix: the kept prefix's own
    members call and its share of the extend calls), and ``min_saved_tokens``, the token computations a kept
    prefix must save to pay for itself (at least :data:`prefix_tree.MIN_SAVED`, at most two full calls' tokens).
    Which prefixes are kept then depends on this machine's timing; results agree either way to float32 rounding
    (tests: 1e-5), as with reuse off."""
    import math
    import time

    def fastest(fn, reps: int) -> float:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    tok = 1 if pad_id != 1 else 2

    def call(rows: int, width: int, prefix=None):
        ids, mask, pos = padded([[tok] * width] * rows, pad_id, prefix.length if prefix is not None else 0)
        return lambda: runner.hidden(ids, mask, pos, prefix=prefix)

    call(2, 64)()  # warm: threads started, the GEMM kernel chosen
    small = fastest(call(1, 4), 3)
    big = fastest(call(2, 64), 3)
    token = max((big - small) / 124, 1e-9)
    prefix = runner.extend(None, [tok] * prefix_tree.MIN_TOKENS)
    node = 2 * fastest(call(2, 2, prefix), 3)
    # Saving two full calls' worth of tokens always pays for two small calls: the bound keeps a noisy measurement
    # from turning reuse off where it plainly helps.
    need = min(max(prefix_tree.MIN_SAVED, math.ceil(node / token)), 2 * CALL_TOKENS)
    return {"token_seconds": token, "node_seconds": node, "min_saved_tokens": need}


class Reuse:
    def __init__(self, runner, pad_id: int, cache_bytes: int | None = None, owner=None):
        self.runner = runner
        self.pad_id = pad_id
        self.cache = PrefixCache(default_cache_bytes(runner) if cache_bytes is None else cache_bytes)
        self.owner = owner  # the adapter the keys belong to (serve: several adapters, one cache)
        self.stats = Reused()
        self.costs: dict | None = None  # measure_costs(), once, when a plan first keeps a prefix

    def min_saved(self) -> int:
        """The token computations a kept prefix must save on this runner (:func:`measure_costs`, measured once)."""
        if self.costs is None:
            self.costs = self.stats.costs = measure_costs(self.runner, self.pad_id)
        return self.costs["min_saved_tokens"]

    def window_order(self, seqs: list[list[int]]) -> list[int]:
        """An order for a run's window of prompts (indices into ``seqs``): the records under a prefix the plan keeps
        (:meth:`plan`, the rule every block's scoring applies) side by side, so that a block holds a group and the
        cache carries it to the next; every other record after them, longest first (the length-sorted batches of a
        run without reuse: little padding). Grouping records whose shared head the plan would not keep only mixed
        lengths in every batch (the ~58M model's unique prompts: 20 % slower)."""
        root = self.plan(seqs)
        grouped = [i for child in root.children for i in child.subtree_members()]
        return grouped + sorted(root.members, key=lambda i: -len(seqs[i]))

    def plan(self, seqs: list[list[int]]) -> prefix_tree.Node:
        """The radix plan of ``seqs``, keeping only the prefixes that save more than they cost on this runner
        (:func:`measure_costs`): a small model's shared 30-token queries are cheaper recomputed in big batches than
        given calls of their own; a large model's are not."""
        root = prefix_tree.plan(seqs)
        if not root.children:
            return root
        if self.min_saved() > prefix_tree.MIN_SAVED:
            root = prefix_tree.plan(seqs, min_saved=self.min_saved())
        return root

    # ------------------------------------------------------------------ prefixes

    def prefix_for(self, tokens, parent: Prefix | None = None) -> tuple[Prefix, int]:
        """The computed prefix of ``tokens`` (its longest cached head, or ``parent``, extended), and how many of
        its tokens came from the cache."""
        tokens = np.asarray(tokens, dtype=np.int64)
        entry, m = self.cache.longest(self.owner, tokens)
        base, from_cache = parent, 0
        if entry is not None and m > (parent.length if parent is not None else 0):
            base, from_cache = entry.head(m), m
        if base is not None and base.length == len(tokens):
            self.stats.cached_tokens += from_cache
            return base, from_cache
        done = self.runner.extend(base, tokens)
        self.cache.put(self.owner, done)
        self.stats.cached_tokens += from_cache
        return done, from_cache

    def _children(self, node: prefix_tree.Node, prefix: Prefix | None) -> list[tuple[prefix_tree.Node, Prefix, int]]:
        """The computed prefixes of ``node``'s children: from the cache when it holds more of one than ``prefix``,
        the others as rows of one batch per ~CALL_TOKENS tokens (siblings share ``prefix``)."""
        base = prefix.length if prefix is not None else 0
        done, todo = [], []
        for child in node.children:
            entry, m = self.cache.longest(self.owner, child.tokens)
            if entry is not None and m > base:
                p, got = self.prefix_for(child.tokens, prefix)
                done.append((child, p, got))
            else:
                todo.append(child)
        for g in regroup([(list(c.tokens[base:]), []) for c in todo], CALL_TOKENS):
            group = [todo[k] for k in g]
            for child, p in zip(group, self.runner.extend_many(prefix, [c.tokens for c in group])):
                self.cache.put(self.owner, p)
                done.append((child, p, 0))
        return done

    def _visit(self, root: prefix_tree.Node, fn) -> None:
        """``fn(members, depth, prefix, from_cache)`` for every node with members, parents computed before
        children; ``from_cache``: how many of the prefix's tokens were computed before this call."""
        def walk(node, prefix, cached):
            if node.members:
                fn(node.members, node.depth, prefix, cached)
            for child, p, got in self._children(node, prefix):
                walk(child, p, max(cached, got))

        walk(root, None, 0)

    # ------------------------------------------------------------------ labelled scoring

    def score(self, items: list[tuple[list[int], list[list[int]]]]):
        """Per ``(prompt, continuations)`` item, what :meth:`Backend.score` returns for it."""
        prompts = [p for p, _ in items]
        root = self.plan(prompts)
        self.stats.savings.add(root, prompts)
        results: list = [None] * len(items)

        def members(idx, depth, prefix, _cached):
            order = sorted(idx, key=lambda i: -len(items[i][0]))
            sub = [(items[i][0][depth:], items[i][1]) for i in order]
            for g in regroup(sub, CALL_TOKENS):
                packed = pack([sub[k][0] for k in g], [sub[k][1] for k in g], self.pad_id, offset=depth)
                hidden, _ = self.runner.hidden(packed.ids, packed.mask, packed.positions, prefix=prefix)
                lp = self.runner.logprobs(self.runner.gather(hidden, packed.rows))
                for k, res in zip(g, unpack(packed, lp)):
                    results[order[k]] = res

        self._visit(root, members)
        return results

    def next_token(self, prompts: list[list[int]]) -> np.ndarray:
        """log P(next token | prompt) per prompt ``[len(prompts), V]``."""
        root = self.plan(prompts)
        self.stats.savings.add(root, prompts)
        out: list = [None] * len(prompts)

        def members(idx, depth, prefix, _cached):
            for g in _chunks(sorted(idx, key=lambda i: -len(prompts[i])), prompts, depth):
                ids, mask, pos = padded([prompts[i][depth:] for i in g], self.pad_id, depth)
                hidden, _ = self.runner.hidden(ids, mask, pos, prefix=prefix)
                lp = self.runner.logprobs(self.runner.gather(hidden, [(k, len(prompts[i]) - depth - 1)
                                                                      for k, i in enumerate(g)]))
                for k, i in enumerate(g):
                    out[i] = lp[k]

        self._visit(root, members)
        return np.stack(out)

    # ------------------------------------------------------------------ echo

    def _prefix_rows(self, prefix: Prefix, top_n: int) -> dict:
        """Log-prob results at a prefix's positions: ``token`` [P-1] (position j's log-prob of token j+1), ``top``
        ids/values [P, k] (k >= ``top_n``), ``last``: the whole distribution after the last token."""
        rows = prefix.rows
        if not rows or rows["k"] < top_n:
            lp = self.runner.logprobs(prefix.hidden)  # [P, V]
            toks = prefix.tokens
            k = min(max(top_n, rows.get("k", 0) if rows else 0), lp.shape[1])
            top = top_k(lp, k) if k else np.zeros((len(toks), 0), dtype=np.int64)
            rows = {"k": k, "token": lp[np.arange(len(toks) - 1), toks[1:]], "top_ids": top,
                    "top_lp": np.take_along_axis(lp, top, axis=1), "last": lp[-1].copy()}
            prefix.rows = rows
        elif rows.get("last") is None:  # a head of a longer entry: its last position is recomputed alone
            rows["last"] = self.runner.logprobs(prefix.hidden[-1:])[0]
            k = rows["k"]
            top = top_k(rows["last"][None], k)[0] if k else np.zeros(0, dtype=np.int64)
            rows["top_ids"] = np.concatenate([rows["top_ids"][:-1], top[None]])
            rows["top_lp"] = np.concatenate([rows["top_lp"][:-1], rows["last"][top][None]])
        return rows

    def _extend_rows(self, base: Prefix, p: Prefix, top_n: int) -> dict:
        """``p``'s position results, reusing those of ``base`` (a head of ``p`` whose rows are known): only the
        rows from the position where ``p`` leaves ``base`` on go through the LM head."""
        rows = base.rows
        if not rows or rows["k"] < top_n or base.length < 1:
            return self._prefix_rows(p, top_n)
        m, k = base.length, rows["k"]
        lp = self.runner.logprobs(p.hidden[m - 1:])  # rows m-1 .. P-1
        top = top_k(lp, k) if k else np.zeros((len(lp), 0), dtype=np.int64)
        p.rows = {"k": k,
                  "token": np.concatenate([rows["token"][: m - 1], lp[np.arange(len(lp) - 1), p.tokens[m:]]]),
                  "top_ids": np.concatenate([rows["top_ids"][: m - 1], top]),
                  "top_lp": np.concatenate([rows["top_lp"][: m - 1], np.take_along_axis(lp, top, axis=1)]),
                  "last": lp[-1].copy()}
        return p.rows

    def sequences(self, seqs: list[list[int]], top_n: int) -> tuple[list[SequenceLogprobs], list[int]]:
        """:meth:`Backend.sequence_logprobs` with reuse; also, per sequence, how many of its tokens came from
        prefixes computed before this call (``usage.prompt_tokens_details.cached_tokens``).

        Sequences that share a prefix with each other go through the radix plan. The others (typically one
        request's one sequence) are looked up in the cache, and kept in it for the requests that follow: lm-eval
        sends one request per answer choice with the same context, and the second finds the first's."""
        root = self.plan(seqs)
        self.stats.savings.add(root, seqs)
        out: list = [None] * len(seqs)
        cached = [0] * len(seqs)

        def members(idx, depth, prefix, from_cache):
            pre = self._prefix_rows(prefix, top_n) if prefix is not None else None
            for g in _chunks(sorted(idx, key=lambda i: -len(seqs[i])), seqs, depth):
                ids, mask, pos = padded([seqs[i][depth:] for i in g], self.pad_id, depth)
                hidden, _ = self.runner.hidden(ids, mask, pos, prefix=prefix)
                for k, i in enumerate(g):
                    s = np.asarray(seqs[i])
                    lp = self.runner.logprobs(hidden[k, : len(s) - depth])  # rows depth .. n-1
                    out[i] = _assemble(s, depth, pre, lp, top_n)
                    cached[i] = from_cache

        alone, root.members = root.members, []
        self._visit(root, members)
        fresh = []
        for i in alone:
            entry, m = self.cache.longest(self.owner, seqs[i])
            m = min(m, len(seqs[i]) - 1)
            if entry is None or m < prefix_tree.MIN_TOKENS:
                fresh.append(i)
                continue
            base = entry.head(m)
            p = self.runner.extend(base, seqs[i])
            self.cache.put(self.owner, p)
            out[i] = _from_rows(p, self._extend_rows(base, p, top_n), top_n)
            cached[i] = m
            self.stats.cached_tokens += m
        for g in _chunks(sorted(fresh, key=lambda i: -len(seqs[i])), seqs, 0):
            for i, p in zip(g, self.runner.extend_many(None, [seqs[i] for i in g])):
                self.cache.put(self.owner, p)
                out[i] = _from_rows(p, self._prefix_rows(p, top_n), top_n)
        return out, cached

    # ------------------------------------------------------------------ decoding

    def start(self, prompts: list[list[int]]) -> tuple[Prefix | None, int, int]:
        """The prefix all ``prompts`` share (their longest common head, computed or from the cache; None when they
        share fewer than MIN_TOKENS tokens), its length, and how many of its tokens came from the cache."""
        n = min(len(p) for p in prompts) - 1
        depth = n
        for p in prompts[1:]:
            depth = min(depth, prefix_tree.common_length(prompts[0][:n], p))
        if depth < prefix_tree.MIN_TOKENS:
            return None, 0, 0
        prefix, got = self.prefix_for(prompts[0][:depth])
        self.stats.savings.prefixes.append(depth)
        return prefix, depth, got


def _chunks(order: list[int], seqs, depth: int):
    """``order`` cut into groups of about CALL_TOKENS padded tokens (suffix lengths)."""
    groups = regroup([(seqs[i][depth:], []) for i in order], CALL_TOKENS)
    return [[order[k] for k in g] for g in groups]


def _from_rows(p: Prefix, rows: dict, top_n: int) -> SequenceLogprobs:
    """A whole sequence's SequenceLogprobs from its computed prefix's position results."""
    tok = np.full(p.length, np.nan, dtype=np.float32)
    tok[1:] = rows["token"]
    return SequenceLogprobs(tok, rows["top_ids"][:, :top_n], rows["top_lp"][:, :top_n].astype(np.float32),
                            rows["last"].copy())


def _assemble(s: np.ndarray, depth: int, pre: dict | None, lp: np.ndarray, top_n: int) -> SequenceLogprobs:
    """One sequence's SequenceLogprobs from its prefix's rows (positions < depth) and its own rows ``lp``."""
    n = len(s)
    tok = np.full(n, np.nan, dtype=np.float32)
    own_top = top_k(lp, min(top_n, lp.shape[1])) if top_n else np.zeros((len(lp), 0), dtype=np.int64)
    own_top_lp = np.take_along_axis(lp, own_top, axis=1)
    if len(lp) > 1:
        tok[depth + 1:] = lp[np.arange(len(lp) - 1), s[depth + 1:]]
    if pre is None:
        return SequenceLogprobs(tok, own_top, own_top_lp, lp[-1].copy())
    if depth > 1:
        tok[1:depth] = pre["token"][: depth - 1]
    tok[depth] = pre["last"][s[depth]]  # the position where this sequence leaves the prefix
    k = own_top.shape[1]
    top = np.concatenate([pre["top_ids"][:depth, :k], own_top])
    top_lp = np.concatenate([pre["top_lp"][:depth, :k], own_top_lp])
    return SequenceLogprobs(tok, top, top_lp.astype(np.float32), lp[-1].copy())
