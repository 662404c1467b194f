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

# Heavy parts are imported on first use so `paddle-scorer --help` and `inspect` never import paddle.
_LAZY = {
    "load": "paddle_scorer.loader",
    "Loaded": "paddle_scorer.loader",
    "describe": "paddle_scorer.checkpoint",
    "Classifier": "paddle_scorer.scoring",
    "ClassifyOptions": "paddle_scorer.scoring",
    "Generator": "paddle_scorer.generation",
    "GenerateOptions": "paddle_scorer.generation",
    "Backend": "paddle_scorer.backend",
    "evaluate": "paddle_scorer.metrics",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paddle_scorer' has no attribute {name!r}")


__all__ = [*_LAZY,
    "__version__",
    "ScorerError",
    "UsageError",
    "NotACheckpointError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "WeightMismatchError",
]
