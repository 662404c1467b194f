"""paddle-scorer: load a fine-tuned PaddleNLP LLM safely and read its real softmax outputs."""

from __future__ import annotations

__version__ = "0.1.0"

from paddle_scorer.errors import (  # noqa: E402
    CheckpointError,
    NotACheckpointError,
    ScorerError,
    UnsafeCheckpointError,
    UsageError,
    WeightMismatchError,
)

__all__ = [
    "__version__",
    "ScorerError",
    "UsageError",
    "NotACheckpointError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "WeightMismatchError",
]
