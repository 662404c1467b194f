"""Which executor scores a loaded model: the model in memory (:class:`~paddle_scorer.backend.Backend`), or
layer by layer from disk (:class:`~paddle_scorer.stream.StreamedBackend`) when the load plan says the model
does not fit the memory budget. The decision itself is :mod:`paddle_scorer.memory`'s, taken once in the plan.
"""

from __future__ import annotations

from paddle_scorer.backend import Backend, ModelRunner, Strategy


def pad_id_of(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def backend_for(loaded, strategy: Strategy | None = None):
    """The scoring backend for a :func:`paddle_scorer.loader.load` result (pad id from its tokenizer)."""
    if loaded.streamed:
        from paddle_scorer.stream import StreamedBackend  # imports the model library's layer code

        return StreamedBackend(loaded, pad_id=pad_id_of(loaded.tokenizer))
    return Backend(ModelRunner(loaded.model), pad_id=pad_id_of(loaded.tokenizer), strategy=strategy)
