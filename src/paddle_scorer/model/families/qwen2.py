"""Qwen2 / Qwen2.5 (dense): q/k/v biases always, sliding layers from ``max_window_layers`` on when
``use_sliding_window``. PaddleNLP 3.0.0b4 builds it, without any rotary scaling (Qwen2.5's YaRN): the decoder computes
such a checkpoint, and every Qwen2 in the PaddleFormers environment (no plain-Paddle Qwen2 there)."""

from __future__ import annotations

from paddle_scorer.model import rope_config
from paddle_scorer.model.families.spec import ATTENTION, Family


def library_reading(library: str, cfg: dict, where: str) -> str | None:
    """PaddleNLP 3.0.0b4's Qwen2 computes no rotary scaling and no sliding window (its modeling never reads them)."""
    if library != "paddlenlp":
        return None
    layers = cfg.get("num_hidden_layers")
    types = cfg.get("layer_types")
    sliding = (isinstance(types, list) and "sliding_attention" in types) or (
        bool(cfg.get("use_sliding_window")) and cfg.get("sliding_window") is not None
        and not (isinstance(layers, int) and isinstance(cfg.get("max_window_layers"), int)
                 and cfg["max_window_layers"] >= layers))
    if sliding:
        return "PaddleNLP 3.0.0b4's Qwen2 has no sliding window, and config.json declares sliding layers"
    return rope_config.paddlenlp_differs(cfg, where, scaling=False)


FAMILY = Family(
    name="qwen2", title="Qwen2", architectures=("Qwen2ForCausalLM",), library_first=True,
    biases=lambda c: frozenset(ATTENTION[:3]), library_reading=library_reading,
)
