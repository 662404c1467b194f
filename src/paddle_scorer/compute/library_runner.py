"""The library's own forward behind the runner seam (:class:`~paddle_scorer.compute.seams.Runner`): the decoder body
and LM head of a PaddleNLP or PaddleFormers model (attached LoRA or not), on any device and dtype. The library
differences (where the body is, the KV-cache object) stay in :mod:`paddle_scorer.model.libraries`.

log-softmax is computed in float32 whatever the compute dtype, as ``x - logsumexp(x)``: Paddle's CPU
``log_softmax`` kernel is pathologically slow on wide rows (~0.14 s per 32000-wide row on a 2-core EPYC, ~200x
``logsumexp``; see benchmarks/RESULTS.md), the same values within 1e-6.
"""

from __future__ import annotations

import numpy as np

from paddle_scorer.process.environment import paddle


def log_softmax(pd, logits):
    """float32 log-softmax over the last axis, as ``x - logsumexp(x)`` (see the module docstring)."""
    logits = logits.astype("float32")
    return logits - pd.logsumexp(logits, axis=-1, keepdim=True)


class ModelRunner:
    """The decoder body and LM head of a loaded model."""

    def __init__(self, model, library: str | None = None):
        from paddle_scorer.model.libraries import body_and_head

        self.pd = paddle()
        self.net, self.body, self.head = body_and_head(model)
        self.rope = None  # the model's rotary table, only to refuse positions past its end (PaddleNLP's Llama)
        if library is not None:
            from paddle_scorer.compute import decoder

            rotary = decoder.find_rotary(self.body)
            if rotary is not None and not decoder.rotary_is_dynamic(library, rotary):
                self.rope = decoder.Rope(library, rotary)
        self.checked_positions = 0

    def hidden(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache=None, use_cache: bool = False):
        """Body forward: ``[B, W]`` ids, a 2-D ``[B, W(+past)]`` or 4-D ``[B, 1, W, W]`` mask, ``[B, W]``
        positions -> (hidden ``[B, W, H]`` tensor, new cache or None). Positions past the rotary table (whose
        rows the library would silently truncate) are refused with :class:`~paddle_scorer.compute.decoder.ContextLimit`."""
        pd = self.pd
        top = int(np.max(positions)) + 1 if np.size(positions) else 0
        if self.rope is not None and top > self.checked_positions:
            self.rope(np.array([top - 1]))
            self.checked_positions = top
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
        from paddle_scorer.model.libraries import select_cache_rows

        return select_cache_rows(cache, self.pd.to_tensor(np.asarray(index, dtype=np.int64)))
