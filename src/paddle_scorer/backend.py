"""The only module that calls the model's forward.

Scoring asks for log-probabilities of token sequences; this is where batching, KV-cache reuse and
"LM head only where needed" live:

* prompts are batched (sorted by length, right-padded, explicit attention mask and position ids,
  original order restored by the caller's indices);
* the decoder body runs once per prompt; the LM head (``vocab x hidden`` per position, the biggest
  single matmul for short prompts) runs only at the positions whose next-token distribution is
  needed: the prompt's last token, and inside multi-token labels;
* multi-token labels are packed behind their prompt in the *same* forward ("tree attention"): the
  sequence is ``prompt, label1[:-1], label2[:-1], ...`` with an attention mask that lets each label's
  tokens see the prompt and their own label only, and position ids that restart after the prompt
  for each label. The prompt is encoded once and nothing is copied per label. (``tails =
  "kv-cache"`` keeps the earlier variant: a second forward over the label tokens on per-label copies
  of the prompt's KV cache; benchmarks compare both.)
* log-softmax is computed in float32 whatever the compute dtype, as ``x - logsumexp(x)``: Paddle's
  CPU ``log_softmax`` kernel is pathologically slow on wide rows (~0.14 s per 32000-wide row on a
  2-core EPYC, ~200x ``logsumexp``; see benchmarks/RESULTS.md), the same values within 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def unwrap(model):
    """The PaddleNLP causal LM inside a LoRAModel (or the model itself)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "lm_head"):
        return inner
    return model


class Backend:
    tails = "packed"  # how multi-token labels are scored: "packed" (one forward) or "kv-cache"

    def __init__(self, model, pad_id: int = 0):
        self.pd = paddle()
        self.net = unwrap(model)
        prefix = getattr(self.net, "base_model_prefix", None)
        self.body = getattr(self.net, prefix) if prefix and hasattr(self.net, prefix) else None
        self.head = getattr(self.net, "lm_head", None)
        if self.body is None or self.head is None:
            raise TypeError(f"{type(self.net).__name__} has no decoder body + lm_head; only causal LMs are supported")
        self.pad_id = pad_id
        self.forward_calls = 0  # for tests and benchmarks

    # ------------------------------------------------------------------ low-level passes

    def _run_body(self, ids, mask, pos, past=None, use_cache=False):
        self.forward_calls += 1
        out = self.body(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
            use_cache=use_cache, return_dict=True,
        )
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def _logprobs(self, hidden_rows):
        """LM head + float32 log-softmax on selected hidden rows ``[N, H]`` -> numpy ``[N, V]``."""
        logits = self.head(hidden_rows.unsqueeze(0)).squeeze(0)
        return log_softmax(self.pd, logits).numpy()

    def _prompt_pass(self, prompts: list[list[int]], use_cache: bool):
        pd = self.pd
        lens = [len(p) for p in prompts]
        width = max(lens)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            mask[i, : len(p)] = 1
        pos = np.tile(np.arange(width, dtype=np.int64), (len(prompts), 1))
        hidden, past = self._run_body(pd.to_tensor(ids), pd.to_tensor(mask), pd.to_tensor(pos), use_cache=use_cache)
        last = pd.to_tensor(np.array([n - 1 for n in lens], dtype=np.int64))
        rows = pd.gather_nd(hidden, pd.stack([pd.arange(len(prompts), dtype="int64"), last], axis=1))
        return rows, past, lens, mask

    # ------------------------------------------------------------------ API

    def next_token_logprobs(self, prompts: list[list[int]]) -> np.ndarray:
        """log P(next token | prompt) for each prompt: ``[len(prompts), vocab]`` float32."""
        with self.pd.no_grad():
            rows, _, _, _ = self._prompt_pass(prompts, use_cache=False)
            return self._logprobs(rows)

    def score(self, prompts: list[list[int]], continuations: list[list[list[int]]]) -> tuple[np.ndarray, list[list[ContinuationScore]]]:
        """Teacher-forced log-probs of every continuation of every prompt (one batch).

        Returns the prompts' next-token log-probs ``[B, V]`` and, per prompt, one
        :class:`ContinuationScore` per continuation.
        """
        pd = self.pd
        need_cache = any(len(c) > 1 for conts in continuations for c in conts)
        if need_cache and self.tails == "packed":
            with pd.no_grad():
                return self._score_packed(prompts, continuations)
        with pd.no_grad():
            rows, past, lens, pmask = self._prompt_pass(prompts, use_cache=need_cache)
            first = self._logprobs(rows)
            results = [[ContinuationScore([float(first[b, c[0]])], int(first[b].argmax()) == c[0]) for c in conts]
                       for b, conts in enumerate(continuations)]
            if need_cache:
                self._score_tails(past, lens, pmask, continuations, results)
        return first, results

    def _score_packed(self, prompts, continuations):
        """Prompt and every label's tokens in one forward, with a per-row tree attention mask."""
        pd = self.pd
        rows = []  # per prompt: token ids, position ids, segment id per position
        for p, conts in zip(prompts, continuations):
            ids, pos, seg = list(p), list(range(len(p))), [0] * len(p)
            starts = []
            for j, c in enumerate(conts):
                starts.append(len(ids))
                tail = c[:-1]
                ids += tail
                pos += [len(p) + t for t in range(len(tail))]
                seg += [j + 1] * len(tail)
            rows.append((ids, pos, seg, starts))
        width = max(len(r[0]) for r in rows)
        n = len(rows)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, 1, width, width), dtype=bool)
        for b, (r_ids, r_pos, r_seg, _) in enumerate(rows):
            m = len(r_ids)
            ids[b, :m] = r_ids
            pos[b, :m] = r_pos
            seg = np.array(r_seg)
            causal = np.tril(np.ones((m, m), dtype=bool))
            same = (seg[:, None] == seg[None, :]) | (seg[None, :] == 0)  # own segment, or the prompt
            mask[b, 0, :m, :m] = causal & same
            mask[b, 0, np.arange(m, width), np.arange(m, width)] = True  # pad rows see themselves (no NaN)
        hidden, _ = self._run_body(pd.to_tensor(ids), pd.to_tensor(mask), pd.to_tensor(pos))
        sel, where = [], []
        for b, ((_, _, _, starts), p, conts) in enumerate(zip(rows, prompts, continuations)):
            sel.append((b, len(p) - 1))
            where.append((b, None, 0))
            for j, c in enumerate(conts):
                for t in range(len(c) - 1):
                    sel.append((b, starts[j] + t))
                    where.append((b, j, t + 1))
        lp = self._logprobs(pd.gather_nd(hidden, pd.to_tensor(np.array(sel, dtype=np.int64))))
        first_rows = [k for k, (_, j, _) in enumerate(where) if j is None]
        first = lp[first_rows]
        results = [[ContinuationScore([float(first[b, c[0]])], int(first[b].argmax()) == c[0]) for c in conts]
                   for b, conts in enumerate(continuations)]
        for k, (b, j, t) in enumerate(where):
            if j is None:
                continue
            target = continuations[b][j][t]
            res = results[b][j]
            res.token_logprobs.append(float(lp[k, target]))
            res.greedy = res.greedy and int(lp[k].argmax()) == target
        return first, results

    def _score_tails(self, past, lens, pmask, continuations, results):
        """Tokens 2..n of multi-token continuations, in one forward over the cached prompts."""
        pd = self.pd
        jobs = [(b, j, c) for b, conts in enumerate(continuations) for j, c in enumerate(conts) if len(c) > 1]
        width = max(len(c) - 1 for _, _, c in jobs)
        n = len(jobs)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        cmask = np.zeros((n, width), dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        for r, (b, _, c) in enumerate(jobs):
            t = len(c) - 1
            ids[r, :t] = c[:-1]
            cmask[r, :t] = 1
            pos[r] = lens[b] + np.arange(width)
        index = pd.to_tensor(np.array([b for b, _, _ in jobs], dtype=np.int64))
        past_rows = [tuple(pd.index_select(t, index, axis=0) for t in layer) for layer in past]
        mask = np.concatenate([pmask[[b for b, _, _ in jobs]], cmask], axis=1)
        hidden, _ = self._run_body(pd.to_tensor(ids), pd.to_tensor(mask), pd.to_tensor(pos), past=past_rows, use_cache=False)
        sel = [(r, t) for r, (_, _, c) in enumerate(jobs) for t in range(len(c) - 1)]
        rows = pd.gather_nd(hidden, pd.to_tensor(np.array(sel, dtype=np.int64)))
        lp = self._logprobs(rows)
        for k, (r, t) in enumerate(sel):
            b, j, c = jobs[r]
            target = c[t + 1]
            res = results[b][j]
            res.token_logprobs.append(float(lp[k, target]))
            res.greedy = res.greedy and int(lp[k].argmax()) == target

    def sequence_logprobs(self, seqs: list[list[int]], top_n: int = 0) -> list[SequenceLogprobs]:
        """Log-probs at every position of each sequence (one batched forward). See :class:`SequenceLogprobs`."""
        pd = self.pd
        lens = [len(s) for s in seqs]
        if min(lens) < 1:
            raise ValueError("empty sequence")
        width = max(lens)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        pos = np.tile(np.arange(width, dtype=np.int64), (len(seqs), 1))
        out = []
        with pd.no_grad():
            hidden, _ = self._run_body(pd.to_tensor(ids), pd.to_tensor(mask), pd.to_tensor(pos))
            for i, s in enumerate(seqs):
                lp = self._logprobs(hidden[i, : len(s)])  # [n, V]
                tok = np.full(len(s), np.nan, dtype=np.float32)
                if len(s) > 1:
                    tok[1:] = lp[np.arange(len(s) - 1), np.asarray(s[1:])]
                k = min(top_n, lp.shape[1])
                if k:
                    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
                    top_lp = np.take_along_axis(lp, top, axis=1)
                else:
                    top = np.zeros((len(s), 0), dtype=np.int64)
                    top_lp = np.zeros((len(s), 0), dtype=np.float32)
                out.append(SequenceLogprobs(tok, top, top_lp, lp[-1].copy()))
        return out

    # ------------------------------------------------------------------ generation

    def start(self, prompt: list[int]):
        """Prompt pass with cache for step-by-step decoding: returns (logprobs [V], state)."""
        with self.pd.no_grad():
            rows, past, lens, mask = self._prompt_pass([prompt], use_cache=True)
            return self._logprobs(rows)[0], (past, lens[0])

    def step(self, token: int, state):
        pd = self.pd
        past, n = state
        with pd.no_grad():
            ids = pd.to_tensor(np.array([[token]], dtype=np.int64))
            mask = pd.to_tensor(np.ones((1, n + 1), dtype=np.int64))
            pos = pd.to_tensor(np.array([[n]], dtype=np.int64))
            self.forward_calls += 1
            out = self.body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                            use_cache=True, return_dict=True)
            lp = self._logprobs(out.last_hidden_state[:, -1, :])[0]
            return lp, (out.past_key_values, n + 1)

    def full_logprobs(self, ids: list[int]) -> np.ndarray:
        """Plain forward, all positions (the reference path used by tests): ``[len, V]``."""
        pd = self.pd
        with pd.no_grad():
            self.forward_calls += 1
            logits = self.net(pd.to_tensor([ids]), return_dict=True).logits
            return log_softmax(pd, logits).numpy()[0]


    # ================================================================== serve: batched decoding
    # Added on branch `serve` for `paddle-scorer serve` (serve/engine.py), which falls back to
    # start()/step() per sequence when these are absent. Several sequences share one KV cache:
    # prompts right-padded (the pad slots stay in the cache, masked out by the 2-D attention mask),
    # every row with its own position ids. Finished rows are dropped with decode_keep(). The same
    # forward and float32 log-softmax as start()/step(); results equal them within float32 noise.

    def decode_start(self, prompts: list[list[int]]):
        """Prompt pass with cache for several sequences: ``(logprobs [B, V], state)``."""
        with self.pd.no_grad():
            rows, past, lens, mask = self._prompt_pass(prompts, use_cache=True)
            return self._logprobs(rows), (past, mask, np.array(lens, dtype=np.int64))

    def decode_step(self, tokens: list[int], state):
        """One token per row (in the state's row order): ``(logprobs [B, V], state)``."""
        pd = self.pd
        past, mask, nxt = state
        mask = np.concatenate([mask, np.ones((len(tokens), 1), dtype=mask.dtype)], axis=1)
        with pd.no_grad():
            ids = pd.to_tensor(np.array(tokens, dtype=np.int64)[:, None])
            hidden, past = self._run_body(ids, pd.to_tensor(mask), pd.to_tensor(nxt[:, None]), past=past, use_cache=True)
            return self._logprobs(hidden[:, -1, :]), (past, mask, nxt + 1)

    def decode_keep(self, state, rows: list[int]):
        """The state with only ``rows`` (indices into its current rows), in that order."""
        past, mask, nxt = state
        index = self.pd.to_tensor(np.array(rows, dtype=np.int64))
        past = [tuple(self.pd.index_select(t, index, axis=0) for t in layer) for layer in past]
        return past, mask[rows], nxt[rows]


def backend_for(loaded) -> Backend:
    """The scoring backend for a :func:`paddle_scorer.loader.load` result (pad id from its tokenizer)."""
    pid = getattr(loaded.tokenizer, "pad_token_id", None)
    return Backend(loaded.model, pad_id=int(pid) if pid is not None else 0)
