"""A family checkpoint's tensors as the decoder's runtime tensors (pure, no paddle): the recipes of
:mod:`paddle_scorer.model.tensor_layout` (prefix, ``[out, in]`` -> ``[in, out]``, PaddleFormers' fused projections),
plus what only these families have:

* experts stacked in one 3-D tensor (transformers 5's ``mlp.experts.gate_up_proj [E, 2I, H]`` and ``down_proj
  [E, H, I]``, written with ``save_original_format=False``): one runtime tensor per expert, each a slice;
* each family's own names (its module's ``renames``: transformers 5's ``mlp.`` for Mixtral's ``block_sparse_moe.``,
  Phi-3's ``gate_up_proj``...), its stored fused ``qkv_proj`` reordered, the experts it lays out itself (GPT-OSS);
* next-n (MTP) layers, never run when scoring: left out (nothing of them is read).
"""

from __future__ import annotations

import re

from paddle_scorer.model import family_tensors
from paddle_scorer.model.families import FamilyConfig
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
    for old, new in fc.kind.renames:  # the family's own names (Mixtral's block_sparse_moe, Phi-3's gate_up_proj...)
        name = name.replace(old, new)
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
        elif "up_gate_proj" in fc.fused:
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


def _prefixed(name: str, src_prefix: str | None) -> str:
    if src_prefix and src_prefix != family_tensors.PREFIX and name.startswith(src_prefix + "."):
        return family_tensors.PREFIX + name[len(src_prefix):]
    return name


def conversion(fc: FamilyConfig, shapes: dict[str, tuple[int, ...]], layout: Layout, src_prefix: str | None) -> Conversion:
    """Recipes for every runtime tensor the decoder reads (next-n layers left out)."""
    def rename(n: str) -> str:
        return _renamed(fc, _prefixed(n, src_prefix))

    own = {}
    if fc.kind.expert_tensors is not None:  # experts the family lays out itself (GPT-OSS: stacked or MXFP4)
        own = fc.kind.expert_tensors(fc, shapes, rename)
        consumed = {s for t in own.values() for s in t.sources}
        shapes = {n: s for n, s in shapes.items() if n not in consumed}
    stacked = {n: tuple(s) for n, s in shapes.items() if len(s) == 3 and _STACKED.match(n)}
    plain = {n: s for n, s in shapes.items() if n not in stacked and not family_tensors.unused(n, fc)}
    dims = {"num_attention_heads": fc.heads, "num_key_value_heads": fc.kv_heads, "head_dim": fc.head_dim,
            "hidden_size": fc.hidden}
    conv = runtime_tensors(plain, layout, src_prefix, family_tensors.PREFIX, fc.fused, lm_head_out_in=True,
                           config=dims)

    tensors = {}
    for t in conv.tensors.values():
        new = _renamed(fc, t.name)
        tensors[new] = RuntimeTensor(new, t.shape, t.parts, t.perm) if new != t.name else t
    for name, shape in stacked.items():
        if family_tensors.unused(name, fc):
            continue
        for t in _stacked_recipes(fc, name, shape, layout, rename):
            tensors[t.name] = t
    tensors.update(own)
    if fc.kind.stored_fused:  # one stored [q | k | v] tensor: columns grouped per KV head, as the decoder's qkv_proj
        perm = qkv_permutation(fc.heads, fc.kv_heads, fc.head_dim)
        for n, t in list(tensors.items()):
            if re.search(r"\.self_attn\.qkv_proj\.(weight|bias)$", n) and len(t.parts) == 1 and t.shape[-1] == len(perm):
                tensors[n] = RuntimeTensor(t.name, t.shape, t.parts, perm)
    return Conversion(conv.layout, tensors, conv.prefix_note, conv.fused)
