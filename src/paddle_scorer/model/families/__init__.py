"""The model families paddle-scorer's decoder computes from a checkpoint's tensors, one module each (what a family
is, its config.json's reading, its tensor names and layouts, its library's reading), and this registry of them. Pure:
no paddle.

On a CPU neither library runs most of them (PaddleFormers builds Qwen*/GLM through ``paddlefleet``, which is not on
the package index, and ERNIE 4.5 MoE only with GPU kernels; PaddleNLP 3.0.0b4's MoE forwards break under paddle 3.3;
Mistral, Phi-3, Gemma 3, GPT-OSS have no plain-Paddle class here), so the decoder is the way to run them; Llama and
Qwen2 go to it where the installed library would not compute what their config.json declares. What it computes is HF
transformers' eval-mode forward (the reference the tests hold it to) and PaddleFormers' where that runs.

Adding a family: a module here with its ``FAMILY`` (:class:`~paddle_scorer.model.families.spec.Family`), its entry in
:data:`MODULES`, and a tiny checkpoint in ``tests/family_fixtures.py`` (docs/layout.md)."""

from __future__ import annotations

from paddle_scorer.model.families import (
    deepseek_v3,
    ernie4_5_moe,
    gemma3,
    glm4_moe,
    gpt_oss,
    llama,
    mistral,
    mixtral,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    reading,
)
from paddle_scorer.model.families.spec import (  # noqa: F401 - the names the rest of the code imports from here
    ROPE_TYPES,
    Family,
    FamilyConfig,
    MoeSpec,
    RopeSpec,
    yarn_mscale,
)

MODULES = (llama, mistral, qwen2, phi3, gemma3, gpt_oss, qwen3, qwen3_moe, qwen2_moe, mixtral, deepseek_v3, glm4_moe,
           ernie4_5_moe)
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in MODULES}
# architecture name (config.json "architectures"[0], PaddleFormers' class names included) -> family
ARCHITECTURES = {a: f.name for f in FAMILIES.values() for a in f.architectures}
MODEL_TYPES = {t: f.name for f in FAMILIES.values() for t in (f.name, *f.model_types)}
TITLES = {n: f.title for n, f in FAMILIES.items()}
# Runtime modules fused as PaddleFormers holds them in memory (its LoRA adapters target these names)
FUSED = {n: f.fused for n, f in FAMILIES.items()}
# Families a model library also builds: the library runs them where it computes what config.json declares
LIBRARY_FIRST = frozenset(n for n, f in FAMILIES.items() if f.library_first)
# The decoder-body prefix PaddleNLP 3.0.0b4 gives the families it builds (its checkpoints and LoRA adapters use it)
PADDLENLP_PREFIX = {n: f.paddlenlp_prefix for n, f in FAMILIES.items() if f.paddlenlp_prefix}


def family_of(architecture: str | None, model_type: str | None) -> str | None:
    """The family of an architecture name (or, without one, of a ``model_type``), None when it is not one of ours."""
    if architecture:
        return ARCHITECTURES.get(architecture)
    return MODEL_TYPES.get(model_type or "")


def read(cfg: dict, where: str) -> FamilyConfig:
    """The normalized config of a family's config.json (:func:`family_of` must know it)."""
    family = family_of((cfg.get("architectures") or [None])[0], cfg.get("model_type"))
    return reading.read(cfg, where, FAMILIES[family])


def library_differs(library: str, family: str | None, cfg: dict, where: str) -> str | None:
    """Why ``library`` would compute something other than config.json declares for this family, or None."""
    kind = FAMILIES.get(family or "")
    if kind is None or kind.library_reading is None:
        return None
    return kind.library_reading(library, cfg, where)
