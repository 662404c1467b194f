"""The layout of one call's new tokens (real tokens only, masks, key ranges per query block) and the KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MASKED = np.finfo(np.float32).min  # what the libraries add at masked positions (not -inf: no NaN rows)
BLOCK_SCORES = 1 << 24  # attention scores held at once (64 MB); above it keys are taken in blocks (online softmax)
KEY_BLOCK_STEP = 256  # key blocks are a multiple of this many keys (numpy reduces long rows faster than short ones)


@dataclass
class Batch:
    """The layout of one call's new tokens: ``B`` rows of ``T`` slots, of which the real tokens are the flat slots
    ``index`` (``b * T + t``, in order; ``None``: every slot is real). Hidden states, positions and the GEMMs hold
    only the real tokens: padding costs no matrix work (a length-sorted batch of 24 demo prompts on 1008 slots
    held 797 tokens). Attention sees:

    * ``keep[b, i, j]``: new token ``i`` sees new token ``j`` (causal / tree / padding), ``[B, T, T]`` bool;
    * ``past_keep [B, S]``: which slots of a per-row KV cache are real.

    The additive mask and the key range each block of queries needs are computed once per call, for every layer.
    """

    B: int
    T: int
    keep: np.ndarray
    index: np.ndarray | None = None
    past_keep: np.ndarray | None = None
    _bias: np.ndarray | None = field(default=None, repr=False)
    _blocks: list | None = field(default=None, repr=False)
    _plan: tuple | None = field(default=None, repr=False)
    # positions, for sliding windows: of the new slots [B, T], and of every key slot [B, S + T] (cache, then new)
    q_pos: np.ndarray | None = field(default=None, repr=False)
    k_pos: np.ndarray | None = field(default=None, repr=False)
    _windowed: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray, T: int, past: int = 0, lengths=None) -> "Batch":
        keep, past_keep = keep_from_mask(np.asarray(mask), T, past)
        B = keep.shape[0]
        if lengths is None:
            lengths = real_lengths(np.asarray(mask), T)
        lengths = np.asarray(lengths, dtype=np.int64)
        index = None
        if (lengths < T).any():
            index = np.concatenate([b * T + np.arange(n) for b, n in enumerate(lengths)])
        return cls(B, T, keep, index, past_keep)

    def set_positions(self, positions: np.ndarray, past_positions: np.ndarray | None = None) -> None:
        """The position ids of the new slots ``[B, T]`` and of the cached keys ``[B, S]`` (what a sliding window
        counts: transformers' mask compares a key's index in its sequence with the query's, which are these)."""
        self.q_pos = np.asarray(positions, dtype=np.int64).reshape(self.B, self.T)
        self.k_pos = self.q_pos if past_positions is None else np.concatenate(
            [np.asarray(past_positions, dtype=np.int64).reshape(self.B, -1), self.q_pos], axis=1)

    def windowed(self, window: int) -> "Batch":
        """This batch as a sliding-window layer sees it: a query at position p sees the keys at positions above
        ``p - window`` (and what its mask lets it see). Key blocks no query of a block sees are then skipped by the
        attention plan. The batch itself when no query reaches past the window."""
        if self.q_pos is None:
            raise ValueError("a sliding window needs the batch's positions (set_positions)")
        if int(self.q_pos.max(initial=0)) < window:
            return self
        if window not in self._windowed:
            inside = (self.q_pos[:, :, None] - self.k_pos[:, None, :]) < window
            bias = np.where(inside, self.bias(), MASKED).astype(np.float32)
            self._windowed[window] = Batch(self.B, self.T, self.keep, self.index, self.past_keep, _bias=bias,
                                           q_pos=self.q_pos, k_pos=self.k_pos)
        return self._windowed[window]

    def prefix_bias(self, window: int, t0: int, t1: int, p0: int, p1: int) -> np.ndarray | None:
        """``[1, B, 1, n, p]``: the window's mask over a shared prefix's keys ``p0..p1`` (positions) for the queries
        ``t0..t1`` (None: every query sees them all)."""
        q = self.q_pos[:, t0:t1]
        if int(q.max(initial=0)) - p0 < window:
            return None
        inside = (q[:, :, None] - np.arange(p0, p1)[None, None, :]) < window
        return np.where(inside, np.float32(0.0), MASKED).astype(np.float32)[None, :, None]

    @property
    def size(self) -> int:
        return self.B * self.T if self.index is None else len(self.index)

    def pick(self, a: np.ndarray) -> np.ndarray:
        """The real tokens' entries of a ``[B, T, ...]`` array, as ``[N, ...]``."""
        flat = a.reshape(self.B * self.T, *a.shape[2:])
        return flat if self.index is None else flat[self.index]

    def spread(self, a: np.ndarray) -> np.ndarray:
        """``[N, ...]`` real-token rows back into ``[B, T, ...]`` slots (padding zero)."""
        if self.index is None:
            return a.reshape(self.B, self.T, *a.shape[1:])
        out = np.zeros((self.B * self.T, *a.shape[1:]), dtype=a.dtype)
        out[self.index] = a
        return out.reshape(self.B, self.T, *a.shape[1:])

    def bias(self) -> np.ndarray:
        """``[B, T, S + T]`` float32: 0 where a query sees a key, the libraries' masked value elsewhere."""
        if self._bias is None:
            keep = self.keep
            if self.past_keep is not None:
                keep = np.concatenate([np.broadcast_to(self.past_keep[:, None, :], (self.B, self.T, self.past_keep.shape[1])),
                                       keep], axis=2)
            self._bias = np.where(keep, np.float32(0.0), MASKED).astype(np.float32)
        return self._bias

    def blocks(self, rows: int) -> list[tuple[int, int, int]]:
        """Query blocks ``(t0, t1, key_end)``: keys past ``key_end`` are masked for every query of the block
        (causal masks need only the keys up to the block's last query)."""
        if self._blocks is None or self._blocks[0] != rows:
            bias = self.bias()
            seen = (bias > MASKED).any(axis=0)  # [T, K]
            out = []
            for t0 in range(0, self.T, rows):
                t1 = min(self.T, t0 + rows)
                cols = np.flatnonzero(seen[t0:t1].any(axis=0))
                out.append((t0, t1, int(cols[-1]) + 1 if cols.size else 1))
            self._blocks = (rows, out)
        return self._blocks[1]


    def attention_plan(self, rows: int, heads: int, prefix: int = 0) -> list[tuple[int, int, list, int]]:
        """Per query block ``(t0, t1, key_blocks, size)``: the keys the block sees as ``(k0, k1, masked)`` blocks of at
        most ``size`` keys. First the keys every query of the block sees (for one causal sequence: all before the
        block), with no mask to add; then the rest up to the block's last visible key, masked (the causal diagonal,
        padding, the tree of packed labels); blocks no query sees are left out. ``size`` keeps ``heads x (t1 - t0) x
        size`` scores within :data:`BLOCK_SCORES` (every key in one block when they fit, as short prompts always do).
        ``heads``: the scores' leading dimensions (rows x query heads); ``prefix``: keys of a shared prefix before
        them (every query sees them; in blocks of the same size)."""
        key = (rows, heads, prefix)
        if self._plan is None or self._plan[0] != key:
            keep = self.bias() > MASKED  # [B, T, K]
            out = []
            for t0, t1, end in self.blocks(rows):
                n = t1 - t0
                seen = keep[:, t0:t1, :end]
                step = KEY_BLOCK_STEP
                size = max(end, prefix, 1)
                if heads * n * (end + prefix) > BLOCK_SCORES:
                    size = max(step, (BLOCK_SCORES // max(1, heads * n)) // step * step)
                blocks = []
                for k0, k1, masked in _runs(seen.all(axis=(0, 1)), min(step, 64)):
                    for c0 in range(k0, k1, size):
                        c1 = min(k1, c0 + size)
                        if not masked or seen[:, :, c0:c1].any():
                            blocks.append((c0, c1, masked))
                out.append((t0, t1, blocks, size))
            self._plan = (key, out)
        return self._plan[1]


def _runs(full: np.ndarray, shortest: int) -> list[tuple[int, int, bool]]:
    """``full`` (keys every query sees) as runs ``(k0, k1, masked)``. A run of fully seen keys keeps a multiple of
    ``shortest`` keys (the rest, and any shorter run, counted as masked: a mask added to a few more keys costs less
    than another block)."""
    edges = [0, *(np.flatnonzero(np.diff(full.astype(np.int8))) + 1).tolist(), len(full)]
    runs: list[list] = []

    def add(k0: int, k1: int, masked: bool) -> None:
        if k1 <= k0:
            return
        if runs and runs[-1][2] == masked:
            runs[-1][1] = k1
        else:
            runs.append([k0, k1, masked])

    for k0, k1 in zip(edges[:-1], edges[1:]):
        if full[k0]:
            cut = k0 + (k1 - k0) // shortest * shortest
            add(k0, cut, False)
            add(cut, k1, True)
        else:
            add(k0, k1, True)
    return [tuple(r) for r in runs]


def real_lengths(mask: np.ndarray, T: int) -> np.ndarray:
    """Real tokens per row (rows are right-padded). A 2-D mask marks them; in a 4-D tree mask every real token
    sees the row's first token, and a padding slot sees only itself."""
    if mask.ndim == 4:
        col0 = mask[:, 0, :, 0].astype(bool)
        return np.maximum(col0.sum(axis=1), 1)
    return mask.astype(bool)[:, -T:].sum(axis=1)


@dataclass
class KV:
    """Per-layer keys and values ``[B, kv_heads, S, head_dim]`` (after RoPE) and which slots are real."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    keep: np.ndarray | None = None  # [B, S]
    prefix: object = None  # a prefixes.Prefix every row continues (not copied per row)

    @property
    def length(self) -> int:
        return 0 if self.keep is None else self.keep.shape[1]

    def rows(self, index) -> "KV":
        idx = np.asarray(index, dtype=np.int64)
        return KV([k[idx] for k in self.keys], [v[idx] for v in self.values], None if self.keep is None else self.keep[idx],
                  self.prefix)


def keep_from_mask(mask: np.ndarray, T: int, past: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The runner's masks as ``(keep [B, T, T], past_keep [B, past])``: a 4-D ``[B, 1, T, T]`` keep-mask is used
    as given (tree/causal already in it); a 2-D ``[B, past + T]`` padding mask becomes padding AND causal."""
    if mask.ndim == 4:
        return mask[:, 0].astype(bool), None
    m = mask.astype(bool)
    causal = np.tril(np.ones((T, T), dtype=bool))
    keep = m[:, None, past:] & causal[None]
    return keep, (m[:, :past] if past else None)
