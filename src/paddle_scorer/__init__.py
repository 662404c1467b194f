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
    "load": "paddle_scorer.model.loader",
    "Loaded": "paddle_scorer.model.loader",
    "describe": "paddle_scorer.checkpoint.describe",
    "Classifier": "paddle_scorer.tasks.classify",
    "ClassifyOptions": "paddle_scorer.tasks.classify",
    "Generator": "paddle_scorer.tasks.generate",
    "GenerateOptions": "paddle_scorer.tasks.generate",
    "Backend": "paddle_scorer.compute.in_ram",
    "evaluate": "paddle_scorer.tasks.metrics",
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
