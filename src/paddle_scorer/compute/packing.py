"""Labelled prompts as model inputs, and model outputs as scores: pure numpy, no paddle.

How labels are scored (:func:`pack`, :func:`unpack`), shared by every executor:

* prompts are batched (sorted by length by the caller, right-padded, explicit mask and position ids);
* multi-token labels are packed behind their prompt in the *same* forward ("tree attention"): the
  row is ``prompt, label1[:-1], label2[:-1], ...`` with a mask that lets each label's tokens see the
  prompt and their own label only, and position ids that restart after the prompt for each label.
  The prompt is encoded once and nothing is copied per label;
* the LM head (``vocab x hidden`` per position, the biggest single matmul for short prompts) runs only
  at the positions (``Packed.rows``) whose next-token distribution is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paddle_scorer.model.memory_budget import CALL_TOKENS


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


@dataclass
class Packed:
    """One batch of prompts with their labels packed behind them (see the module docstring)."""

    ids: np.ndarray  # [B, W]
    positions: np.ndarray  # [B, W]
    mask: np.ndarray  # [B, 1, W, W] bool (tree mask) or [B, W] int (plain padding mask)
    rows: list[tuple[int, int]]  # (batch, position) whose next-token distribution is needed
    targets: list[tuple[int, int | None, int]]  # per row: (prompt, label index or None for the prompt's last, token)
    continuations: list[list[list[int]]]


LABEL_ROW_TOKENS = 256
"""Label tokens packed behind one copy of a prompt: a prompt with more (a thousand labels of a few tokens) gets
several rows, each with the prompt and a share of the labels, so attention grows with the labels, not with their
square (2,000 labels in one row kept a server busy for 20-29 s)."""


def label_rows(conts: list[list[int]], budget: int = LABEL_ROW_TOKENS) -> list[list[int]]:
    """The labels of one prompt (their indices) cut, in order, into rows of at most ``budget`` packed tokens (a label
    longer than that alone)."""
    rows: list[list[int]] = [[]]
    used = 0
    for j, c in enumerate(conts):
        n = len(c) - 1
        if rows[-1] and used + n > budget:
            rows.append([])
            used = 0
        rows[-1].append(j)
        used += n
    return rows


def pack(prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int, offset: int = 0) -> Packed:
    """Prompts and every label's tokens in one forward, with a per-row tree attention mask. ``offset``: the prompts
    continue a shared prefix of that many tokens (position ids start there; the prefix is not in the mask). A prompt
    with more than :data:`LABEL_ROW_TOKENS` label tokens gets more than one row (see :func:`label_rows`)."""
    multi = any(len(c) > 1 for conts in continuations for c in conts)
    layout = []  # per row: prompt index, token ids, position ids, segment id per position, {label: start}
    for b, (p, conts) in enumerate(zip(prompts, continuations)):
        for labels in (label_rows(conts) if multi else [[]]):
            ids, pos, seg, starts = list(p), list(range(len(p))), [0] * len(p), {}
            for j in labels:
                starts[j] = len(ids)
                tail = conts[j][:-1]
                ids += tail
                pos += [len(p) + t for t in range(len(tail))]
                seg += [j + 1] * len(tail)
            layout.append((b, ids, pos, seg, starts))
    width = max(len(r[1]) for r in layout)
    n = len(layout)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    if multi:
        mask = np.zeros((n, 1, width, width), dtype=bool)
    else:
        mask = np.zeros((n, width), dtype=np.int64)
    for r, (_, r_ids, r_pos, r_seg, _) in enumerate(layout):
        m = len(r_ids)
        ids[r, :m] = r_ids
        pos[r, :m] = [x + offset for x in r_pos]
        if multi:
            seg = np.array(r_seg)
            causal = np.tril(np.ones((m, m), dtype=bool))
            same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)  # own segment, or the prompt
            mask[r, 0, :m, :m] = causal & same
            mask[r, 0, np.arange(m, width), np.arange(m, width)] = True  # pad rows see themselves (no NaN)
        else:
            pos[r, m:] = np.arange(m, width) + offset
            mask[r, :m] = 1
    rows, targets, seen = [], [], set()
    for r, (b, _, _, _, starts) in enumerate(layout):
        if b not in seen:  # the prompt's last position: the first token of every label
            seen.add(b)
            rows.append((r, len(prompts[b]) - 1))
            targets.append((b, None, 0))
        for j, start in starts.items():
            for t in range(len(continuations[b][j]) - 1):
                rows.append((r, start + t))
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


def regroup(items: list[tuple[list[int], list[list[int]]]], tokens: int = CALL_TOKENS) -> list[list[int]]:
    """Indices of ``(prompt, continuations)`` items cut, in order, into groups of at most ``tokens`` padded
    tokens (a longer item goes alone). Items are expected sorted by length, so little padding is added."""
    multi = any(len(c) > 1 for _, conts in items for c in conts)
    groups: list[list[int]] = []
    current: list[int] = []
    widest = rows = 0
    for i, (prompt, conts) in enumerate(items):
        n, width = 1, len(prompt)
        if multi:  # the rows pack() makes of this item (see label_rows) and the widest of them
            cut = label_rows(conts)
            n = len(cut)
            width += max(sum(len(conts[j]) - 1 for j in r) for r in cut)
        if current and (rows + n) * max(widest, width) > tokens:
            groups.append(current)
            current, widest, rows = [], 0, 0
        current.append(i)
        widest, rows = max(widest, width), rows + n
    if current:
        groups.append(current)
    return groups


def padded(seqs: list[list[int]], pad_id: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids, 2-D mask and positions for plain sequences (continuing ``offset`` shared tokens)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    pos = np.tile(np.arange(offset, offset + width, dtype=np.int64), (len(seqs), 1))
    return ids, mask, pos
