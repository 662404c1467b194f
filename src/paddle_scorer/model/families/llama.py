"""Llama (and the checkpoints saved as ``LlamaForCausalLM``: Llama 2/3.x, many fine-tunes). PaddleNLP 3.0.0b4 and
PaddleFormers 1.2.0 build it; the decoder computes it from its tensors where the installed library would compute
something other than config.json declares (:func:`library_reading`)."""

from __future__ import annotations

from paddle_scorer.model import rope_config
from paddle_scorer.model.families.spec import ATTENTION, Family


def _biases(c) -> frozenset[str]:
    out = set(ATTENTION) if c.get("attention_bias", False) else set()
    if c.get("mlp_bias", False):
        out |= {"gate_proj", "up_proj", "down_proj"}
    return frozenset(out)


def _check(c) -> None:
    if c.int("pretraining_tp", default=1) < 1:  # Llama 2's tensor-parallel slicing: the same product in pieces
        c.refuse("pretraining_tp below 1")


def library_reading(library: str, cfg: dict, where: str) -> str | None:
    """PaddleNLP 3.0.0b4's Llama builds no biases, derives head_dim from hidden_size, reads only its own rotary keys
    and a ``rope_scaling`` whose ``rope_type`` is llama3; PaddleFormers 1.2.0 reads what transformers 5 reads."""
    if library != "paddlenlp":
        return None
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) is True:
            return f"PaddleNLP 3.0.0b4's Llama has no biases, and config.json declares {key} true"
    hd, hidden, heads = cfg.get("head_dim"), cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hd, int) and isinstance(hidden, int) and isinstance(heads, int) and heads and hd != hidden // heads:
        return (f"PaddleNLP 3.0.0b4's Llama computes head_dim as hidden_size / num_attention_heads = {hidden // heads}, "
                f"and config.json declares head_dim {hd}")
    return rope_config.paddlenlp_differs(cfg, where, scaling=True)


FAMILY = Family(
    name="llama", title="Llama", architectures=("LlamaForCausalLM",), library_first=True, biases=_biases, check=_check,
    library_reading=library_reading,
)
