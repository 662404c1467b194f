"""Which token prefixes the records of a batch share, decided on token ids (pure, no model).

Real classification prompts share most of their tokens (a system prompt, a chat header, instructions, few-shot
examples). :func:`plan` builds a radix tree over the records' token ids and keeps the nodes worth computing
once: a node is a prefix shared by at least two records, at least :data:`MIN_TOKENS` tokens longer than the
node above it (shorter steps are folded into their children: a few shared tokens do not pay for a separate
forward). Every record hangs under its deepest kept node and keeps at least one token of its own (its last
position's distribution is what it needs). Sharing is decided on the ids of each whole tokenized prompt, never
on template text, so a BPE merge across the template/query boundary cannot change a result: two records share
exactly the ids they really share.

A node is also kept only when the work it saves, ``(records under it - 1) x its own tokens``, reaches
:data:`MIN_SAVED` tokens: two duplicate 30-token queries are cheaper recomputed than given a prefix of their own.

The executors compute each kept node once (from its parent's KV), then every record's remaining tokens (and its
labels, tree-packed) on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_TOKENS = 16  # a node is kept only when it adds at least this many tokens to its parent
MIN_SAVED = 64  # ... and saves at least this many token computations (members - 1 shared edges)


@dataclass
class Node:
    """A shared prefix: ``depth`` tokens of every member's sequence (``tokens`` = ``seqs[any][:depth]``)."""

    depth: int
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    members: list[int] = field(default_factory=list)  # records whose own tokens start here
    tokens: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def walk(self):
        """This node and its descendants, parents before children."""
        yield self
        for c in self.children:
            yield from c.walk()

    def subtree_members(self) -> list[int]:
        return [m for n in self.walk() for m in n.members]


def _common(seqs: list[tuple[int, ...]], idx: list[int], start: int, cap: int) -> int:
    """Length of the prefix all ``seqs[idx]`` share, at least ``start`` (already known), at most ``cap``."""
    first = seqs[idx[0]]
    d = start
    while d < cap and all(seqs[i][d] == first[d] for i in idx[1:]):
        d += 1
    return d


def _build(seqs, idx: list[int], depth: int, parent: Node) -> None:
    """Attach ``idx`` (sharing ``depth`` tokens) under ``parent``: radix recursion on the next differing token."""
    if len(idx) == 1:
        parent.members.append(idx[0])
        return
    cap = min(len(seqs[i]) for i in idx) - 1  # every record keeps its last token
    d = _common(seqs, idx, depth, cap)
    node = parent
    if d > parent.depth:
        node = Node(d, parent, tokens=tuple(seqs[idx[0]][:d]))
        parent.children.append(node)
    groups: dict[int, list[int]] = {}
    for i in idx:
        if len(seqs[i]) - 1 <= d:  # nothing left to share beyond d for this record
            node.members.append(i)
        else:
            groups.setdefault(seqs[i][d], []).append(i)
    for g in groups.values():
        _build(seqs, g, d, node)


def _prune(node: Node, min_tokens: int, min_saved: int) -> None:
    """Fold nodes that share too little into their parent (recursively, children first)."""
    for c in list(node.children):
        _prune(c, min_tokens, min_saved)
    for c in list(node.children):
        n = len(c.subtree_members())
        edge = c.depth - node.depth
        if n < 2 or edge < min_tokens or (n - 1) * edge < min_saved:
            node.children.remove(c)
            node.children.extend(c.children)
            for g in c.children:
                g.parent = node
            node.members.extend(c.members)


def plan(seqs: list[list[int]], min_tokens: int = MIN_TOKENS, min_saved: int = MIN_SAVED) -> Node:
    """The radix plan of ``seqs``: a root (no prefix) whose kept descendants are shared prefixes."""
    tup = [tuple(s) for s in seqs]
    root = Node(0)
    if tup:
        _build(tup, list(range(len(tup))), 0, root)
    _prune(root, min_tokens, min_saved)
    for n in root.walk():  # a node's direct members in input order (the executors batch them by length later)
        n.members.sort()
    return root


@dataclass
class Savings:
    """What a plan saves: prompt tokens computed without it, with it, and the shared prefixes' lengths."""

    records: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    prefixes: list[int] = field(default_factory=list)

    @property
    def saved_tokens(self) -> int:
        return self.prompt_tokens - self.computed_tokens

    def add(self, root: Node, seqs: list[list[int]]) -> None:
        for n in root.walk():
            if not n.is_root:
                self.prefixes.append(n.depth)
                self.computed_tokens += n.depth - n.parent.depth
            for m in n.members:
                self.records += 1
                self.prompt_tokens += len(seqs[m])
                self.computed_tokens += len(seqs[m]) - n.depth

    def to_dict(self) -> dict:
        lengths = sorted(self.prefixes)
        return {"records": self.records, "prompt_tokens": self.prompt_tokens, "computed_tokens": self.computed_tokens,
                "tokens_saved": self.saved_tokens, "shared_prefixes": len(lengths),
                "longest_shared_prefix": lengths[-1] if lengths else 0}


# --------------------------------------------------------------------------------------------------
# Computed prefixes and the bounded cache that keeps them
# --------------------------------------------------------------------------------------------------


@dataclass
class Prefix:
    """A computed token prefix: its keys/values per layer ``[kv_heads, P, head_dim]`` and its final-normed hidden
    states ``[P, hidden]`` (for echo log-probs at its positions). ``rows``: the log-prob results at its positions
    computed so far (see :meth:`paddle_scorer.compute.in_ram.Backend.sequence_logprobs`)."""

    tokens: np.ndarray
    keys: list
    values: list
    hidden: np.ndarray | None = None
    rows: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(len(self.tokens))

    def layer(self, i: int):
        return self.keys[i], self.values[i]

    def head(self, m: int) -> "Prefix":
        """The first ``m`` tokens (views: a causal model's first ``m`` keys depend on those tokens only)."""
        if m == self.length:
            return self
        rows = {}
        if self.rows:  # results at positions < m stay valid; position m-1's next token differs: recomputed alone
            rows = {"k": self.rows["k"], "token": self.rows["token"][: m - 1], "top_ids": self.rows["top_ids"][:m],
                    "top_lp": self.rows["top_lp"][:m], "last": None}
        return Prefix(self.tokens[:m], [k[:, :m] for k in self.keys], [v[:, :m] for v in self.values],
                      None if self.hidden is None else self.hidden[:m], rows)

    @property
    def nbytes(self) -> int:
        return int(sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
                   + (self.hidden.nbytes if self.hidden is not None else 0))


def common_length(a, b) -> int:
    """How many leading tokens two id sequences share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


CHUNK = MIN_TOKENS  # the cache's index walks token ids in chunks of this many
CANDIDATES = 16  # entries compared token by token at the deepest chunk a lookup reaches (most recently used first)


class _Node:
    __slots__ = ("children", "through", "ends")

    def __init__(self):
        self.children: dict[tuple, _Node] = {}
        self.through: dict[int, None] = {}  # entries whose first chunks lead here (insertion/use order)
        self.ends: set[int] = set()  # entries whose last full chunk is this node's


class PrefixCache:
    """Computed prefixes kept for later requests, least recently used evicted first, within ``max_bytes``.
    Keyed by an owner (the adapter the keys were computed with) and the token ids: a lookup returns the entry
    sharing the most leading tokens with a request (any of its heads is usable).

    Lookups cost the request's length, not the cache's size: entries are indexed by their ids in chunks of
    :data:`CHUNK` (a trie per owner); a lookup walks the chunks it shares with the entries, then compares the last
    partial chunk with the most recently used entries there. A head shorter than one chunk is never returned (the
    plan does not keep such prefixes either: recomputing them is cheaper)."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = max(0, int(max_bytes))
        self._entries: "OrderedDict[int, tuple[object, Prefix]]" = OrderedDict()
        self._roots: dict[object, _Node] = {}
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.lookups = 0
        self.cached_tokens = 0

    @staticmethod
    def _chunks(tokens) -> list[tuple]:
        t = [int(x) for x in tokens]
        return [tuple(t[i:i + CHUNK]) for i in range(0, len(t) - CHUNK + 1, CHUNK)]

    def _path(self, owner, tokens, create: bool = False) -> list[_Node]:
        node = self._roots.get(owner)
        if node is None:
            if not create:
                return []
            node = self._roots[owner] = _Node()
        path = []
        for chunk in self._chunks(tokens):
            nxt = node.children.get(chunk)
            if nxt is None:
                if not create:
                    break
                nxt = node.children[chunk] = _Node()
            path.append(nxt)
            node = nxt
        return path

    def longest(self, owner, tokens) -> tuple[Prefix | None, int]:
        self.lookups += 1
        path = self._path(owner, tokens)
        while path and not path[-1].through:
            path.pop()
        if not path:
            return None, 0
        best, best_m, best_key = None, 0, None
        for n, key in enumerate(reversed(path[-1].through)):
            if n >= CANDIDATES:
                break
            entry = self._entries[key][1]
            m = common_length(entry.tokens, tokens)
            if m > best_m:
                best, best_m, best_key = entry, m, key
        self._touch(best_key, best.tokens)
        self.hits += 1
        return best, best_m

    def _touch(self, key: int, tokens) -> None:
        self._entries.move_to_end(key)
        for node in self._path(self._entries[key][0], tokens):
            if key in node.through:
                node.through.pop(key)
                node.through[key] = None

    def put(self, owner, prefix: Prefix) -> None:
        if self.max_bytes <= 0 or prefix.nbytes > self.max_bytes or prefix.length < CHUNK:
            return
        for node in self._path(owner, prefix.tokens):  # a shorter head of the same tokens is redundant
            for key in list(node.ends):
                entry = self._entries[key][1]
                if entry.length <= prefix.length and common_length(entry.tokens, prefix.tokens) == entry.length:
                    self._remove(key)
        path = self._path(owner, prefix.tokens, create=True)  # after the removals, which may prune its branch
        key = self._next
        self._next += 1
        self._entries[key] = (owner, prefix)
        for node in path:
            node.through[key] = None
        path[-1].ends.add(key)
        self.bytes += prefix.nbytes
        while self.bytes > self.max_bytes and self._entries:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: int) -> None:
        owner, entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        path = self._path(owner, entry.tokens)
        for node in path:
            node.through.pop(key, None)
        if path:
            path[-1].ends.discard(key)
        parent = self._roots.get(owner)  # drop the branches no entry passes through any more
        for chunk, node in zip(self._chunks(entry.tokens), path):
            if not node.through:
                parent.children.pop(chunk, None)
                break
            parent = node

    def clear(self) -> None:
        self._entries.clear()
        self._roots.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"max_bytes": self.max_bytes, "bytes": self.bytes, "entries": len(self._entries), "lookups": self.lookups,
                "hits": self.hits}
