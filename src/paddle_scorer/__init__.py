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
    "classify_file": "paddle_scorer.tasks.classify",
    "generate_file": "paddle_scorer.tasks.generate",
    "LoadOptions": "paddle_scorer.tasks.loading",
    "Source": "paddle_scorer.tasks.job",
    "Destination": "paddle_scorer.tasks.job",
    "Hooks": "paddle_scorer.tasks.job",
    "fmt_bytes": "paddle_scorer.model.memory_budget",
    "parse_size": "paddle_scorer.model.memory_budget",
    "prepare_process": "paddle_scorer.process.environment:prepare",
    "missing_paddle": "paddle_scorer.process.environment",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
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
