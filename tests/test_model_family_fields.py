"""Every parameter of every family's configuration class in the installed transformers is classified
(model/family_fields.py): a field a new release adds fails here until the decoder reads it, refuses it or it is shown
inert. Runs in both environments (transformers 4.55 beside PaddleNLP, 5.x beside PaddleFormers: tests/formers imports
it)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from paddle_scorer.model import family_fields

CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig", "mixtral": "MixtralConfig",
           "deepseek_v3": "DeepseekV3Config", "glm4_moe": "Glm4MoeConfig", "ernie4_5_moe": "Ernie4_5_MoeConfig",
           "phi3": "Phi3Config", "gemma3": "Gemma3TextConfig", "gpt_oss": "GptOssConfig"}
SRC = Path(__file__).resolve().parents[1] / "src" / "paddle_scorer" / "model"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_config_field_of_the_family_is_classified(family):
    import transformers

    params = inspect.signature(getattr(transformers, CONFIGS[family]).__init__).parameters
    assert family_fields.unclassified(params) == [], f"{CONFIGS[family]} ({transformers.__version__})"


def test_every_field_said_to_be_read_is_read():
    source = "".join(p.read_text() for p in sorted((SRC / "families").glob("*.py"))) + (SRC / "rope_config.py").read_text()
    missing = sorted(f for f in family_fields.READ if f'"{f}"' not in source)
    assert missing == []


def test_partial_rotary_is_read_for_glm_and_refused_where_the_forward_rotates_whole_heads():
    from paddle_scorer.errors import UnsupportedModelError
    from paddle_scorer.model import families

    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 8, "head_dim": 16,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    glm = {**base, "architectures": ["Glm4MoeForCausalLM"]}
    assert families.read({**glm, "partial_rotary_factor": 0.5}, "m").rope.dim == 8
    assert families.read({**glm, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.25}}, "m").rope.dim == 4
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 1.5"):
        families.read({**glm, "partial_rotary_factor": 1.5}, "m")
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.5 .this family's forward rotates whole"):
        families.read({**base, "architectures": ["LlamaForCausalLM"], "partial_rotary_factor": 0.5}, "m")
