"""The only module that runs the model: token ids in, float32 log-probs out.

One narrow seam, two layers:

* :class:`ModelRunner` wraps the library's model (PaddleNLP or PaddleFormers, attached LoRA or not):
  ``hidden(ids, mask, positions, cache)`` runs the decoder body, ``logprobs(rows)`` runs the LM head
  on selected hidden rows and a float32 log-softmax. The library differences (where the body is,
  the KV-cache object) stay in :mod:`paddle_scorer.libraries`.
* :class:`Backend` owns the scoring algorithms on top of it: what :mod:`paddle_scorer.scoring`,
  :mod:`paddle_scorer.generation` and ``serve`` call.

How labels are scored (:func:`pack`, :func:`unpack`, pure numpy, shared with the layer-streamed
executor in :mod:`paddle_scorer.stream`):

* prompts are batched (sorted by length by the caller, right-padded, explicit mask and position ids);
* multi-token labels are packed behind their prompt in the *same* forward ("tree attention"): the
  row is ``prompt, label1[:-1], label2[:-1], ...`` with a mask that lets each label's tokens see the
  prompt and their own label only, and position ids that restart after the prompt for each label.
  The prompt is encoded once and nothing is copied per label;
* the LM head (``vocab x hidden`` per position, the biggest single matmul for short prompts) runs only
  at the positions whose next-token distribution is needed;
* log-softmax is computed in float32 whatever the compute dtype, as ``x - logsumexp(x)``: Paddle's
  CPU ``log_softmax`` kernel is pathologically slow on wide rows (~0.14 s per 32000-wide row on a
  2-core EPYC, ~200x ``logsumexp``; see benchmarks/RESULTS.md), the same values within 1e-6.

Hooks (documented, for benchmarks and tests; production uses the defaults): ``Backend(runner,
pad_id, strategy=...)`` replaces how a batch of labelled prompts is scored (the benchmarks compare a
KV-cache variant this way), and ``Backend.runner`` may be wrapped to count or inspect forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from paddle_scorer.runtime import paddle


@dataclass
class SequenceLogprobs:
    """Per-position log-probs of one token sequence (``n`` tokens), all from one float32 log-softmax.

    * ``token_logprobs[i]`` = log P(tokens[i] | tokens[:i]) for ``i >= 1``; ``token_logprobs[0]`` is NaN
      (the first token has no context).
    * ``top_ids[j]`` / ``top_logprobs[j]``: the ``top_n`` most likely tokens of the distribution after
      ``tokens[:j + 1]`` (row ``j`` predicts token ``j + 1``; the last row predicts the next new token).
      Values are copied from the same float32 array as ``token_logprobs``, so equal tokens have
      bit-identical values.
    * ``next_logprobs``: the whole distribution after the last token ``[V]`` (float32).
    """

    token_logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    next_logprobs: np.ndarray


@dataclass
class ContinuationScore:
    token_logprobs: list[float]
    greedy: bool

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))


def log_softmax(pd, logits):
    """float32 log-softmax over the last axis, as ``x - logsumexp(x)`` (see the module docstring)."""
    logits = logits.astype("float32")
    return logits - pd.logsumexp(logits, axis=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# The runner: the model's forward, library-agnostic
# --------------------------------------------------------------------------------------------------


class ModelRunner:
    """The decoder body and LM head of a loaded model."""

    def __init__(self, model):
        from paddle_scorer.libraries import body_and_head

        self.pd = paddle()
        self.net, self.body, self.head = body_and_head(model)

    def hidden(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache=None, use_cache: bool = False):
        """Body forward: ``[B, W]`` ids, a 2-D ``[B, W(+past)]`` or 4-D ``[B, 1, W, W]`` mask, ``[B, W]``
        positions -> (hidden ``[B, W, H]`` tensor, new cache or None)."""
        pd = self.pd
        out = self.body(
            input_ids=pd.to_tensor(ids), attention_mask=pd.to_tensor(mask), position_ids=pd.to_tensor(positions),
            past_key_values=cache, use_cache=use_cache, return_dict=True,
        )
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def logprobs(self, rows) -> np.ndarray:
        """LM head + float32 log-softmax on hidden rows ``[N, H]`` -> numpy ``[N, V]``."""
        logits = self.head(rows.unsqueeze(0)).squeeze(0)
        return log_softmax(self.pd, logits).numpy()

    def gather(self, hidden, rows: list[tuple[int, int]]):
        """The hidden rows at ``(batch, position)`` pairs ``[N, H]``."""
        pd = self.pd
        return pd.gather_nd(hidden, pd.to_tensor(np.asarray(rows, dtype=np.int64).reshape(-1, 2)))

    def select_cache(self, cache, index: list[int]):
        from paddle_scorer.libraries import select_cache_rows

        return select_cache_rows(cache, self.pd.to_tensor(np.asarray(index, dtype=np.int64)))


# --------------------------------------------------------------------------------------------------
# Packing labelled prompts into one forward (pure numpy)
# --------------------------------------------------------------------------------------------------


@dataclass
class Packed:
    """One batch of prompts with their labels packed behind them (see the module docstring)."""

    ids: np.ndarray  # [B, W]
    positions: np.ndarray  # [B, W]
    mask: np.ndarray  # [B, 1, W, W] bool (tree mask) or [B, W] int (plain padding mask)
    rows: list[tuple[int, int]]  # (batch, position) whose next-token distribution is needed
    targets: list[tuple[int, int | None, int]]  # per row: (batch, label index or None for the prompt's last, token)
    continuations: list[list[list[int]]]


def pack(prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int) -> Packed:
    """Prompts and every label's tokens in one forward, with a per-row tree attention mask."""
    multi = any(len(c) > 1 for conts in continuations for c in conts)
    layout = []  # per prompt: token ids, position ids, segment id per position, start of each label
    for p, conts in zip(prompts, continuations):
        ids, pos, seg, starts = list(p), list(range(len(p))), [0] * len(p), []
        if multi:
            for j, c in enumerate(conts):
                starts.append(len(ids))
                tail = c[:-1]
                ids += tail
                pos += [len(p) + t for t in range(len(tail))]
                seg += [j + 1] * len(tail)
        layout.append((ids, pos, seg, starts))
    width = max(len(r[0]) for r in layout)
    n = len(layout)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    if multi:
        mask = np.zeros((n, 1, width, width), dtype=bool)
    else:
        mask = np.zeros((n, width), dtype=np.int64)
    for b, (r_ids, r_pos, r_seg, _) in enumerate(layout):
        m = len(r_ids)
        ids[b, :m] = r_ids
        pos[b, :m] = r_pos
        if multi:
            seg = np.array(r_seg)
            causal = np.tril(np.ones((m, m), dtype=bool))
            same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)  # own segment, or the prompt
            mask[b, 0, :m, :m] = causal & same
            mask[b, 0, np.arange(m, width), np.arange(m, width)] = True  # pad rows see themselves (no NaN)
        else:
            pos[b, m:] = np.arange(m, width)
            mask[b, :m] = 1
    rows, targets = [], []
    for b, ((_, _, _, starts), p, conts) in enumerate(zip(layout, prompts, continuations)):
        rows.append((b, len(p) - 1))
        targets.append((b, None, 0))
        for j, c in enumerate(conts):
            for t in range(len(c) - 1):
                rows.append((b, starts[j] + t))
                targets.append((b, j, t + 1))
    return Packed(ids, pos, mask, rows, targets, continuations)


def unpack(packed: Packed, lp: np.ndarray) -> list[list[ContinuationScore]]:
    """Continuation scores from the log-probs ``[len(rows), V]`` at ``packed.rows``."""
    conts = packed.continuations
    first = {b: k for k, (b, j, _) in enumerate(packed.targets) if j is None}
    results = [[ContinuationScore([float(lp[first[b], c[0]])], int(lp[first[b]].argmax()) == c[0]) for c in cs]
               for b, cs in enumerate(conts)]
    for k, (b, j, t) in enumerate(packed.targets):
        if j is None:
            continue
        target = conts[b][j][t]
        res = results[b][j]
        res.token_logprobs.append(float(lp[k, target]))
        res.greedy = res.greedy and int(lp[k].argmax()) == target
    return results


def top_k(lp: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values of each row, largest first (ties: lower index first).
    ``argpartition`` then a sort of the ``k`` winners: a full sort of every 32000-wide row was half of
    ``sequence_logprobs``' time (serve's echo requests; measured 331 vs 177 ms on the ~58M model)."""
    if k == 1:
        return np.argmax(lp, axis=1)[:, None]
    part = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(lp, part, axis=1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=1)


CALL_TOKENS = 1024
"""Padded tokens per forward (in RAM: classify's default batches) or per layer call (streamed). Matmuls
with few rows run at half speed on CPU ([264, 4096] x [4096, 11008]: 39 GFLOP/s on the 2-core box of
benchmarks/RESULTS.md; >= 528 rows: 70), and a fixed 8 short prompts are ~260 rows."""


def regroup(items: list[tuple[list[int], list[list[int]]]], tokens: int = CALL_TOKENS) -> list[list[int]]:
    """Indices of ``(prompt, continuations)`` items cut, in order, into groups of at most ``tokens`` padded
    tokens (a longer item goes alone). Items are expected sorted by length, so little padding is added."""
    multi = any(len(c) > 1 for _, conts in items for c in conts)
    groups: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i, (prompt, conts) in enumerate(items):
        width = len(prompt) + (sum(len(c) - 1 for c in conts) if multi else 0)
        if current and (len(current) + 1) * max(widest, width) > tokens:
            groups.append(current)
            current, widest = [], 0
        current.append(i)
        widest = max(widest, width)
    if current:
        groups.append(current)
    return groups


def padded(seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids, 2-D mask and positions for plain sequences."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    pos = np.tile(np.arange(width, dtype=np.int64), (len(seqs), 1))
    return ids, mask, pos


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


Strategy = Callable[["Backend", list, list], list]


def packed_strategy(backend: "Backend", prompts: list[list[int]], continuations: list[list[list[int]]]):
    """The default: :func:`pack` -> one body forward -> LM head at the needed rows -> :func:`unpack`."""
    packed = pack(prompts, continuations, backend.pad_id)
    hidden, _ = backend.runner.hidden(packed.ids, packed.mask, packed.positions)
    lp = backend.runner.logprobs(backend.runner.gather(hidden, packed.rows))
    return unpack(packed, lp)


class Backend:
    def __init__(self, runner: ModelRunner, pad_id: int = 0, strategy: Strategy | None = None):
        self.pd = paddle()
        self.runner = runner
        self.pad_id = pad_id
        self.strategy = strategy or packed_strategy

    def score(self, prompts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[ContinuationScore]]:
        """Teacher-forced log-probs of every continuation of every prompt (one batch): per prompt, one
        :class:`ContinuationScore` per continuation."""
        with self.pd.no_grad():
            return self.strategy(self, prompts, continuations)

    def score_many(self, batches: list[tuple[list[list[int]], list[list[list[int]]]]]):
        """:meth:`score` for each ``(prompts, continuations)`` batch (the streamed backend runs them as one block)."""
        return [self.score(prompts, conts) for prompts, conts in batches]

    def next_token_logprobs(self, prompts: list[list[int]]) -> np.ndarray:
        """log P(next token | prompt) for each prompt: ``[len(prompts), vocab]`` float32."""
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
        if not seqs or min(len(s) for s in seqs) < 1:
            raise ValueError("empty sequence")
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
        ids, mask, pos = padded([prompt], self.pad_id)
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(ids, mask, pos, use_cache=True)
            return self.runner.logprobs(hidden[:, len(prompt) - 1, :])[0], (cache, len(prompt))

    def step(self, token: int, state):
        cache, n = state
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(np.array([[token]], dtype=np.int64), np.ones((1, n + 1), dtype=np.int64),
                                               np.array([[n]], dtype=np.int64), cache=cache, use_cache=True)
            return self.runner.logprobs(hidden[:, -1, :])[0], (cache, n + 1)


    # ------------------------------------------------------------------ batched decoding (serve)
    # Several sequences share one KV cache: prompts right-padded (pad slots stay in the cache, masked out by
    # the 2-D attention mask), every row with its own position ids; finished rows are dropped with
    # decode_keep(). The same forward and float32 log-softmax as start()/step(): equal within float32 noise.

    def decode_start(self, prompts: list[list[int]]):
        """Prompt pass with cache for several sequences: ``(logprobs [B, V], state)``."""
        ids, mask, pos = padded(prompts, self.pad_id)
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        with self.pd.no_grad():
            hidden, cache = self.runner.hidden(ids, mask, pos, use_cache=True)
            lp = self.runner.logprobs(self.runner.gather(hidden, [(i, n - 1) for i, n in enumerate(lens)]))
        return lp, (cache, mask, lens)

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


def pad_id_of(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def backend_for(loaded, strategy: Strategy | None = None):
    """The scoring backend for a :func:`paddle_scorer.loader.load` result (pad id from its tokenizer): a
    :class:`Backend` over the model in memory, or a :class:`~paddle_scorer.stream.StreamedBackend` when the
    plan streams the model layer by layer."""
    if getattr(loaded, "streamed", False):
        from paddle_scorer.stream import StreamedBackend

        return StreamedBackend(loaded, pad_id=pad_id_of(loaded.tokenizer))
    return Backend(ModelRunner(loaded.model), pad_id=pad_id_of(loaded.tokenizer), strategy=strategy)
