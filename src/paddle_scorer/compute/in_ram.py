"""Scoring on a model in memory: the algorithms (packed labels, echo log-probs, batched decoding, prefix reuse)
over one runner (:class:`~paddle_scorer.compute.seams.Runner`: paddle-scorer's decoder,
:mod:`~paddle_scorer.compute.numpy_runner`, or the library's forward, :mod:`~paddle_scorer.compute.library_runner`).
What :mod:`paddle_scorer.tasks.classify`, :mod:`paddle_scorer.tasks.generate` and ``serve`` call.

Batches are built by :mod:`paddle_scorer.compute.packing` (labels packed behind their prompt, the LM head only
at the rows whose distribution is needed).

Hooks (documented, for benchmarks and tests; production uses the defaults): ``Backend(runner,
pad_id, strategy=...)`` replaces how a batch of labelled prompts is scored (the benchmarks compare a
KV-cache variant this way), and ``Backend.runner`` may be wrapped to count or inspect forwards.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from paddle_scorer.compute.packing import ContinuationScore, SequenceLogprobs, pack, padded, top_k, unpack
from paddle_scorer.compute.seams import Runner
from paddle_scorer.process.environment import paddle


Strategy = Callable[["Backend", list, list], list]


def packed_strategy(backend: "Backend", prompts: list[list[int]], continuations: list[list[list[int]]]):
    """The default: :func:`pack` -> one body forward -> LM head at the needed rows -> :func:`unpack`."""
    packed = pack(prompts, continuations, backend.pad_id)
    hidden, _ = backend.runner.hidden(packed.ids, packed.mask, packed.positions)
    lp = backend.runner.logprobs(backend.runner.gather(hidden, packed.rows))
    return unpack(packed, lp)


class Backend:
    def __init__(self, runner: Runner, pad_id: int = 0, strategy: Strategy | None = None,
                 prefix_reuse: bool = True, prefix_cache_bytes: int | None = None):
        """``prefix_reuse``: compute shared prompt prefixes once (:mod:`paddle_scorer.compute.prefix_reuse`) when the runner can
        continue a computed prefix (the CPU decoder) and no strategy replaces the scoring."""
        self.pd = paddle()
        self.runner = runner
        self.pad_id = pad_id
        self.strategy = strategy or packed_strategy
        self.reuse = None
        self.no_reuse_reason = ("--no-prefix-reuse" if not prefix_reuse else "a scoring strategy replaces the default"
                                if strategy is not None else getattr(runner, "no_prefix_reason", None)
                                or "the library's forward cannot continue a computed prefix")
        if prefix_reuse and strategy is None and getattr(runner, "supports_prefix", False):
            self.no_reuse_reason = None
            from paddle_scorer.compute.prefix_reuse import Reuse

            self.reuse = Reuse(runner, pad_id, prefix_cache_bytes)

    def reuse_stats(self) -> dict:
        """What prefix reuse did (provenance)."""
        if self.reuse is None:
            return {"enabled": False, "why": self.no_reuse_reason}
        return self.reuse.stats.to_dict(self.reuse.cache)

    def score(self, prompts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[ContinuationScore]]:
        """Teacher-forced log-probs of every continuation of every prompt (one batch): per prompt, one
        :class:`ContinuationScore` per continuation."""
        if self.reuse is not None:
            return self.score_many([(prompts, continuations)])[0]
        with self.pd.no_grad():
            return self.strategy(self, prompts, continuations)

    def score_many(self, batches: list[tuple[list[list[int]], list[list[list[int]]]]]):
        """:meth:`score` for each ``(prompts, continuations)`` batch (the streamed backend runs them as one block;
        with prefix reuse the batches are one pool, re-cut around the prefixes they share)."""
        if self.reuse is None:
            return [self.score(prompts, conts) for prompts, conts in batches]
        items = [(p, c) for prompts, conts in batches for p, c in zip(prompts, conts, strict=True)]
        with self.pd.no_grad():
            flat = self.reuse.score(items)
        out, start = [], 0
        for prompts, _ in batches:
            out.append(flat[start:start + len(prompts)])
            start += len(prompts)
        return out

    def next_token_logprobs(self, prompts: list[list[int]]) -> np.ndarray:
        """log P(next token | prompt) for each prompt: ``[len(prompts), vocab]`` float32."""
        if self.reuse is not None:
            with self.pd.no_grad():
                return self.reuse.next_token(prompts)
        ids, mask, pos = padded(prompts, self.pad_id)
        with self.pd.no_grad():
            hidden, _ = self.runner.hidden(ids, mask, pos)
            return self.runner.logprobs(self.runner.gather(hidden, [(i, len(p) - 1) for i, p in enumerate(prompts)]))

    def position_logprobs(self, seq: list[int]) -> np.ndarray:
        """The next-token distribution after every prefix of ``seq``: ``[len(seq), vocab]`` float32."""
        ids, mask, pos = padded([seq], self.pad_id)
        with self.pd.no_grad():
            hidden, _ = self.runner.hidden(ids, mask, pos)
            return self.runner.logprobs(hidden[0, : len(seq)])

    def sequence_logprobs(self, seqs: list[list[int]], top_n: int = 0) -> list[SequenceLogprobs]:
        """Log-probs at every position of each sequence (one batched forward). See :class:`SequenceLogprobs`."""
        return self.sequence_logprobs_cached(seqs, top_n)[0]

    def sequence_logprobs_cached(self, seqs: list[list[int]], top_n: int = 0) -> tuple[list[SequenceLogprobs], list[int]]:
        """:meth:`sequence_logprobs` and, per sequence, how many of its tokens a computed prefix supplied."""
        if not seqs or min(len(s) for s in seqs) < 1:
            raise ValueError("empty sequence")
        if self.reuse is not None:
            with self.pd.no_grad():
                return self.reuse.sequences(seqs, top_n)
        return self._sequence_logprobs(seqs, top_n), [0] * len(seqs)

    def _sequence_logprobs(self, seqs: list[list[int]], top_n: int = 0) -> list[SequenceLogprobs]:
        ids, mask, pos = padded(seqs, self.pad_id)
        out = []
        with self.pd.no_grad():
            hidden, _ = self.runner.hidden(ids, mask, pos)
            for i, s in enumerate(seqs):
                lp = self.runner.logprobs(hidden[i, : len(s)])  # [n, V]
                tok = np.full(len(s), np.nan, dtype=np.float32)
                if len(s) > 1:
                    tok[1:] = lp[np.arange(len(s) - 1), np.asarray(s[1:])]
                k = min(top_n, lp.shape[1])
                if k:
                    top = top_k(lp, k)
                    top_lp = np.take_along_axis(lp, top, axis=1)
                else:
                    top = np.zeros((len(s), 0), dtype=np.int64)
                    top_lp = np.zeros((len(s), 0), dtype=np.float32)
                out.append(SequenceLogprobs(tok, top, top_lp, lp[-1].copy()))
        return out

    # ------------------------------------------------------------------ generation

    def start(self, prompt: list[int]):
        """Prompt pass with cache for step-by-step decoding: returns (logprobs [V], state)."""
        if self.reuse is not None:
            lp, (cache, mask, lens) = self.decode_start([prompt])
            return lp[0], (cache, len(prompt))
        ids, mask, pos = padded([prompt], self.pad_id)
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(ids, mask, pos, use_cache=True)
            return self.runner.logprobs(hidden[:, len(prompt) - 1, :])[0], (cache, len(prompt))

    def step(self, token: int, state):
        cache, n = state
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(np.array([[token]], dtype=np.int64),
                                               np.ones((1, n + 1 - _shared(cache)), dtype=np.int64),
                                               np.array([[n]], dtype=np.int64), cache=cache, use_cache=True)
            return self.runner.logprobs(hidden[:, -1, :])[0], (cache, n + 1)


    # ------------------------------------------------------------------ batched decoding (serve)
    # Several sequences share one KV cache: prompts right-padded (pad slots stay in the cache, masked out by
    # the 2-D attention mask), every row with its own position ids; finished rows are dropped with
    # decode_keep(). The same forward and float32 log-softmax as start()/step(): equal within float32 noise.

    def decode_start(self, prompts: list[list[int]]):
        """Prompt pass with cache for several sequences: ``(logprobs [B, V], state)``. With prefix reuse the
        prefix the prompts share is computed once (or found in the cache) and kept in the state, not per row."""
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        prefix, depth, self.last_start_cached = self.reuse.start(prompts) if self.reuse is not None else (None, 0, 0)
        ids, mask, pos = padded([p[depth:] for p in prompts], self.pad_id, depth)
        lens = lens - depth
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(ids, mask, pos, use_cache=True, **({"prefix": prefix} if prefix else {}))
            lp = self.runner.logprobs(self.runner.gather(hidden, [(i, n - 1) for i, n in enumerate(lens)]))
        return lp, (cache, mask, lens + depth)  # the next positions count the shared prefix

    def decode_step(self, tokens: list[int], state):
        """One token per row (in the state's row order): ``(logprobs [B, V], state)``."""
        cache, mask, nxt = state
        mask = np.concatenate([mask, np.ones((len(tokens), 1), dtype=mask.dtype)], axis=1)
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(np.array(tokens, dtype=np.int64)[:, None], mask, nxt[:, None],
                                               cache=cache, use_cache=True)
            return self.runner.logprobs(hidden[:, -1, :]), (cache, mask, nxt + 1)

    def decode_keep(self, state, rows: list[int]):
        """The state with only ``rows`` (indices into its current rows), in that order."""
        cache, mask, nxt = state
        return self.runner.select_cache(cache, rows), mask[rows], nxt[rows]


def _shared(cache) -> int:
    """Tokens of a shared prefix a KV cache continues (the CPU decoder's caches; the library's have none)."""
    prefix = getattr(cache, "prefix", None)
    return prefix.length if prefix is not None else 0
