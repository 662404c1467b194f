"""Mistral (dense): a Llama without biases whose ``sliding_window``, when set, applies to every layer."""

from __future__ import annotations

from paddle_scorer.model.families.spec import Family

FAMILY = Family(name="mistral", title="Mistral", architectures=("MistralForCausalLM",), window_on_every_layer=True)
