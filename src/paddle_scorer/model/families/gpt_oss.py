"""GPT-OSS: attention sinks (a learned logit per head that joins every softmax and takes a share of nothing), attention
biases, sliding and full layers alternating, YaRN; a router with a bias whose top-k logits are then softmaxed; experts
stacked ``[E, in, out]`` with gate and up interleaved (de-interleaved on load) and biases, the clamped SwiGLU; experts
stored as MXFP4 ``_blocks`` + ``_scales`` (the released checkpoints) dequantized on load exactly as transformers does."""

from __future__ import annotations

import re

from paddle_scorer.errors import CheckpointError
from paddle_scorer.model.families.spec import ATTENTION, Family, MoeSpec, attention_biases
from paddle_scorer.model.tensor_layout import Part, RuntimeTensor

_EXPERTS = re.compile(r"^(?P<mlp>.*)\.experts\.(?P<proj>gate_up_proj|down_proj)(?P<kind>_bias|_blocks|_scales)?$")


def _moe(c, experts: int, top_k: int, inter: int) -> MoeSpec:
    limit = c.num("swiglu_limit", 7.0)
    if limit != 7.0:  # transformers' GptOssExperts clamps at 7.0 whatever config.json says
        c.refuse(f"swiglu_limit {limit:g} (transformers computes GPT-OSS's experts with 7.0)")
    return MoeSpec(experts, top_k, c.int("intermediate_size"), "topk_softmax", "none", router_bias=True,
                   expert_bias=True, activation="clamped_swiglu", swiglu_limit=limit)


def expert_tensors(fc, shapes: dict, rename) -> dict[str, RuntimeTensor]:
    """One runtime tensor per expert and projection from the stacked sources (float ``[E, in, out]`` or MXFP4
    ``[E, out, in/32, 16]`` + ``[E, out, in/32]``), gate and up de-interleaved into the decoder's ``[gate | up]``."""
    E, H, inter = fc.moe.experts, fc.hidden, fc.moe.intermediate
    deint = tuple(range(0, 2 * inter, 2)) + tuple(range(1, 2 * inter, 2))
    dims = {"gate_up_proj": (H, 2 * inter, "up_gate_proj", deint), "down_proj": (inter, H, "down_proj", None)}
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in shapes:
        m = _EXPERTS.match(name)
        if m:
            found.setdefault((m.group("mlp"), m.group("proj")), {})[m.group("kind") or ""] = name
    out = {}
    for (mlp, proj), kinds in found.items():
        n_in, n_out, runtime, perm = dims[proj]
        base = rename(mlp)

        def want(kind: str, shape: tuple) -> str:
            name = kinds[kind]
            if tuple(shapes[name]) != shape:
                raise CheckpointError(f"{name}: shape {tuple(shapes[name])}, but config.json's GPT-OSS has {shape} "
                                      "(experts, then the projection's dims); check that config.json belongs to it.")
            return name

        for e in range(E):
            stem = f"{base}.experts.{e}.{runtime}"
            if "" in kinds:
                src = want("", (E, n_in, n_out))
                out[f"{stem}.weight"] = RuntimeTensor(f"{stem}.weight", (n_in, n_out),
                                                      (Part(src, (E, n_in, n_out), False, 0, n_out, (e, 0, n_in)),), perm)
            elif "_blocks" in kinds and "_scales" in kinds:
                groups = n_in // 32
                blocks, scales = want("_blocks", (E, n_out, groups, 16)), want("_scales", (E, n_out, groups))
                out[f"{stem}.weight"] = RuntimeTensor(
                    f"{stem}.weight", (n_in, n_out),
                    (Part(blocks, (E, n_out, groups, 16), False, 0, n_out, (e, 0, n_out)),
                     Part(scales, (E, n_out, groups), False, 0, n_out, (e, 0, n_out))), perm, decode="mxfp4")
            if "_bias" in kinds:
                src = want("_bias", (E, n_out))
                out[f"{stem}.bias"] = RuntimeTensor(f"{stem}.bias", (n_out,),
                                                    (Part(src, (E, n_out), False, 0, n_out, (e, 0, n_out)),), perm)
    return out



FAMILY = Family(
    name="gpt_oss", title="GPT-OSS", architectures=("GptOssForCausalLM",), default_theta=150000.0, default_eps=1e-5,
    renames=((".mlp.router.", ".mlp.gate."),),
    default_layer_types=lambda c, layers: frozenset(i for i in range(layers) if (i + 1) % 2),
    biases=lambda c: attention_biases(c, default=True, modules=ATTENTION), moe=_moe,
    extras=lambda c, layers, rot_dim, max_pos: {"sinks": True}, expert_tensors=expert_tensors,
)
