"""A family checkpoint's tensors as the decoder's runtime tensors (pure, no paddle): the recipes of
:mod:`paddle_scorer.model.tensor_layout` (prefix, ``[out, in]`` -> ``[in, out]``, PaddleFormers' fused projections),
plus what only these families have:

* experts stacked in one 3-D tensor (transformers 5's ``mlp.experts.gate_up_proj [E, 2I, H]`` and ``down_proj
  [E, H, I]``, written with ``save_original_format=False``): one runtime tensor per expert, each a slice;
* names transformers 5 holds in memory: Mixtral's ``mlp.`` for ``block_sparse_moe.``, ERNIE's
  ``mlp.gate.moe_statics.`` for ``mlp.moe_statics.``;
* next-n (MTP) layers, never run when scoring: left out (nothing of them is read).
"""

from __future__ import annotations

import re

from paddle_scorer.model import family_tensors
from paddle_scorer.model.families import FUSED, STORED_FUSED, FamilyConfig
from paddle_scorer.model.tensor_layout import (
    HF,
    Conversion,
    Layout,
    Part,
    RuntimeTensor,
    qkv_permutation,
    runtime_tensors,
)

_STACKED = re.compile(r"^(?P<mlp>.*)\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def runtime_name(fc: FamilyConfig, name: str) -> str:
    """A checkpoint's (or an adapter's) tensor name as the decoder names it (module renames only; prefixes are
    mapped elsewhere)."""
    return _renamed(fc, name)


def _renamed(fc: FamilyConfig, name: str) -> str:
    if fc.family == "gpt_oss":
        name = name.replace(".mlp.router.", ".mlp.gate.")
    if fc.family in STORED_FUSED:
        name = name.replace(".mlp.gate_up_proj.", ".mlp.up_gate_proj.")  # [gate | up], the runtime's order
    if fc.family == "mixtral":
        name = re.sub(r"\.mlp\.(gate\.|experts\.)", r".block_sparse_moe.\1", name)
    if fc.family == "ernie4_5_moe":
        name = name.replace(".mlp.gate.moe_statics.", ".mlp.moe_statics.")
    return name


def _stacked_recipes(fc: FamilyConfig, name: str, shape: tuple[int, ...], layout: Layout, rename) -> list[RuntimeTensor]:
    """One runtime tensor per expert from a stacked ``[E, out, in]`` (HF) or ``[E, in, out]`` (Paddle) source."""
    m = _STACKED.match(name)
    hf = layout.kind == HF
    experts, a, b = shape
    n_out = a if hf else b
    n_in = b if hf else a
    mlp = rename(m.group("mlp"))
    gate, up, down = fc.expert_names
    out = []
    for e in range(experts):
        base = f"{mlp}.experts.{e}"
        if m.group("kind") == "down_proj":
            out.append(RuntimeTensor(f"{base}.{down}.weight", (n_in, n_out),
                                     (Part(name, shape, hf, 0, n_out, (e, 0, a)),)))
        elif "up_gate_proj" in FUSED[fc.family]:
            out.append(RuntimeTensor(f"{base}.up_gate_proj.weight", (n_in, n_out),
                                     (Part(name, shape, hf, 0, n_out, (e, 0, a)),)))
        else:
            if not hf:  # [E, in, 2I]: columns, not rows, hold gate and up
                raise _paddle_stacked(name)
            half = n_out // 2
            for proj, lo in ((gate, 0), (up, half)):
                out.append(RuntimeTensor(f"{base}.{proj}.weight", (n_in, half),
                                         (Part(name, shape, True, 0, half, (e, lo, lo + half)),)))
    return out


def _paddle_stacked(name: str) -> Exception:
    from paddle_scorer.errors import UnsupportedModelError

    return UnsupportedModelError(f"{name} stacks the experts' gate and up projections in Paddle's [E, in, 2I] layout; "
                                 "save the checkpoint with one tensor per expert (PaddleFormers' save_pretrained does).")


_GPT_OSS = re.compile(r"^(?P<mlp>.*)\.experts\.(?P<proj>gate_up_proj|down_proj)(?P<kind>_bias|_blocks|_scales)?$")


def _gpt_oss_experts(fc: FamilyConfig, shapes: dict, rename) -> dict[str, RuntimeTensor]:
    """GPT-OSS's experts, stacked ``[E, in, out]`` (``gate_up_proj`` with gate and up interleaved, column 2j gate j,
    2j+1 up j) with stacked biases, or quantized as MXFP4 ``_blocks`` + ``_scales`` (``[E, out, in/32, 16]`` and
    ``[E, out, in/32]``, as the released checkpoints hold them): one runtime tensor per expert and projection, gate and
    up de-interleaved into the decoder's ``[gate | up]``, MXFP4 dequantized on load (exactly)."""
    from paddle_scorer.errors import CheckpointError

    E, H, inter = fc.moe.experts, fc.hidden, fc.moe.intermediate
    deint = tuple(range(0, 2 * inter, 2)) + tuple(range(1, 2 * inter, 2))
    dims = {"gate_up_proj": (H, 2 * inter, "up_gate_proj", deint), "down_proj": (inter, H, "down_proj", None)}
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in shapes:
        m = _GPT_OSS.match(name)
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
            if "" in kinds:
                src = want("", (E, n_in, n_out))
                out[f"{base}.experts.{e}.{runtime}.weight"] = RuntimeTensor(
                    f"{base}.experts.{e}.{runtime}.weight", (n_in, n_out),
                    (Part(src, (E, n_in, n_out), False, 0, n_out, (e, 0, n_in)),), perm)
            elif "_blocks" in kinds and "_scales" in kinds:
                groups = n_in // 32
                blocks, scales = want("_blocks", (E, n_out, groups, 16)), want("_scales", (E, n_out, groups))
                out[f"{base}.experts.{e}.{runtime}.weight"] = RuntimeTensor(
                    f"{base}.experts.{e}.{runtime}.weight", (n_in, n_out),
                    (Part(blocks, (E, n_out, groups, 16), False, 0, n_out, (e, 0, n_out)),
                     Part(scales, (E, n_out, groups), False, 0, n_out, (e, 0, n_out))), perm, decode="mxfp4")
            if "_bias" in kinds:
                src = want("_bias", (E, n_out))
                out[f"{base}.experts.{e}.{runtime}.bias"] = RuntimeTensor(
                    f"{base}.experts.{e}.{runtime}.bias", (n_out,),
                    (Part(src, (E, n_out), False, 0, n_out, (e, 0, n_out)),), perm)
    return out


def conversion(fc: FamilyConfig, shapes: dict[str, tuple[int, ...]], layout: Layout, src_prefix: str | None) -> Conversion:
    """Recipes for every runtime tensor the decoder reads (next-n layers left out)."""
    orig_shapes = shapes
    experts = {n for n in shapes if _GPT_OSS.match(n)} if fc.family == "gpt_oss" else set()
    shapes = {n: s for n, s in shapes.items() if n not in experts} if experts else shapes
    stacked = {n: tuple(s) for n, s in shapes.items() if len(s) == 3 and _STACKED.match(n)}
    plain = {n: s for n, s in shapes.items() if n not in stacked and not family_tensors.unused(n, fc)}
    dims = {"num_attention_heads": fc.heads, "num_key_value_heads": fc.kv_heads, "head_dim": fc.head_dim,
            "hidden_size": fc.hidden}
    conv = runtime_tensors(plain, layout, src_prefix, family_tensors.PREFIX, FUSED[fc.family], lm_head_out_in=True,
                           config=dims)

    def rename(n: str) -> str:
        if src_prefix and src_prefix != family_tensors.PREFIX and n.startswith(src_prefix + "."):
            n = family_tensors.PREFIX + n[len(src_prefix):]
        return _renamed(fc, n)

    tensors = {}
    for t in conv.tensors.values():
        new = _renamed(fc, t.name)
        tensors[new] = RuntimeTensor(new, t.shape, t.parts, t.perm) if new != t.name else t
    for name, shape in stacked.items():
        if family_tensors.unused(name, fc):
            continue
        for t in _stacked_recipes(fc, name, shape, layout, rename):
            tensors[t.name] = t
    if experts:
        all_shapes = dict(shapes)
        all_shapes.update({n: tuple(orig_shapes[n]) for n in experts})
        tensors.update(_gpt_oss_experts(fc, all_shapes, rename))
    if fc.family in STORED_FUSED:  # one stored [q | k | v] tensor: columns grouped per KV head, as the decoder's qkv_proj
        perm = qkv_permutation(fc.heads, fc.kv_heads, fc.head_dim)
        for n, t in list(tensors.items()):
            if re.search(r"\.self_attn\.qkv_proj\.(weight|bias)$", n) and len(t.parts) == 1 and t.shape[-1] == len(perm):
                tensors[n] = RuntimeTensor(t.name, t.shape, t.parts, perm)
    return Conversion(conv.layout, tensors, conv.prefix_note, conv.fused)
