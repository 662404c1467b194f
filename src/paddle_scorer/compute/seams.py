"""The two seams of the compute layer, as types (lm-eval's ``LM`` is its one seam; ours are two):

* a :class:`Runner` is one model's forward: hidden states for a batch of token ids, log-probs for chosen rows. Two
  implement it: paddle-scorer's decoder over numpy arrays (:class:`~paddle_scorer.compute.numpy_runner.NumpyRunner`,
  which can also continue a computed prefix: :class:`PrefixRunner`) and the library's own forward
  (:class:`~paddle_scorer.compute.library_runner.ModelRunner`);
* a :class:`ScoringBackend` is what the tasks call: labelled scoring, next-token distributions, provenance. Two
  implement it: :class:`~paddle_scorer.compute.in_ram.Backend` (over a runner, with generation and echo besides:
  :class:`GeneratingBackend`) and :class:`~paddle_scorer.compute.streamed.StreamedBackend` (layer by layer).

:func:`paddle_scorer.compute.choose_backend.backend_for` picks one per loaded model.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

Batches = list  # [(prompts [[token id]], continuations [[[token id]]])]


@runtime_checkable
class Runner(Protocol):
    def hidden(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: Any = None,
               use_cache: bool = False) -> tuple[Any, Any]:
        """Final-normed hidden states ``[B, T, H]`` of a right-padded batch (a 2-D padding or 4-D tree mask, explicit
        positions), and the cache extended by these tokens when ``use_cache``."""

    def logprobs(self, rows: Any) -> np.ndarray:
        """LM head + float32 log-softmax on hidden rows ``[N, H]`` -> ``[N, V]``."""

    def gather(self, hidden: Any, rows: list[tuple[int, int]]) -> Any:
        """The hidden rows at ``(batch, position)`` pairs."""

    def select_cache(self, cache: Any, index: list[int]) -> Any:
        """The cache of the rows ``index``, in that order."""


@runtime_checkable
class PrefixRunner(Runner, Protocol):
    """A runner that continues a computed prefix (prefix reuse, :mod:`paddle_scorer.compute.prefix_reuse`)."""

    supports_prefix: bool

    def extend(self, prefix: Any, tokens) -> Any:
        """``prefix`` (None: nothing) followed by ``tokens``, computed."""

    def extend_many(self, prefix: Any, sequences: list) -> list:
        """Several continuations of one prefix, computed as rows of one batch."""


@runtime_checkable
class ScoringBackend(Protocol):
    def score(self, prompts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[Any]]:
        """Teacher-forced log-probs of every continuation of every prompt (per prompt, one score per continuation)."""

    def score_many(self, batches: Batches) -> list[list[list[Any]]]:
        """:meth:`score` for each batch (one pool: the executor may re-cut and share prefixes across them)."""

    def next_token_logprobs(self, prompts: list[list[int]]) -> np.ndarray:
        """log P(next token | prompt) ``[len(prompts), vocab]``."""

    def reuse_stats(self) -> dict:
        """What prefix reuse did (provenance)."""


@runtime_checkable
class GeneratingBackend(ScoringBackend, Protocol):
    """A backend with the whole model in memory: step-by-step and batched decoding, echo log-probs (generate, serve)."""

    def start(self, prompt: list[int]) -> tuple[np.ndarray, Any]: ...

    def step(self, token: int, state: Any) -> tuple[np.ndarray, Any]: ...

    def decode_start(self, prompts: list[list[int]]) -> tuple[np.ndarray, Any]: ...

    def decode_step(self, tokens: list[int], state: Any) -> tuple[np.ndarray, Any]: ...

    def decode_keep(self, state: Any, rows: list[int]) -> Any: ...

    def sequence_logprobs_cached(self, seqs: list[list[int]], top_n: int = 0) -> tuple[list, list[int]]: ...
