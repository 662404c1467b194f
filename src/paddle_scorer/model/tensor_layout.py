"""How the tensors in a checkpoint's files become the parameters of the model we build (no paddle).

Two layouts exist in the wild:

* **Paddle layout** (PaddleNLP's ``save_pretrained``, paddle-scorer's ``merge``): names carry the
  architecture's prefix (``llama.layers.0.self_attn.q_proj.weight``) and a ``Linear`` weight is
  stored as Paddle holds it, ``[in, out]``.
* **HF layout** (PaddleFormers 1.x ``save_pretrained``, Hugging Face exports): names start with
  ``model.`` and every 2-D linear weight, ``lm_head`` included, is stored transposed, ``[out, in]``;
  embeddings are not transposed. PaddleFormers' ERNIE 4.5 runs *fused* ``qkv_proj`` and
  ``up_gate_proj`` modules but saves them split into ``q/k/v_proj`` and ``gate/up_proj``.

The layout is read from what the folder *says* (``paddleformers_version`` / ``paddlenlp_version`` in
``config.json``, the safetensors ``format`` metadata, ``torch_dtype`` without ``dtype``), never guessed
from shapes: a model whose matrices are all square would be silently wrong. Shapes only
cross-check the declared layout (a ``[hidden, intermediate]`` MLP weight cannot be ``[out, in]``),
and when nothing is declared and the shapes cannot tell, the checkpoint is refused.

:func:`runtime_tensors` turns the source tensors into :class:`RuntimeTensor` recipes named and shaped
as the runtime model's parameters: each is one source tensor (maybe transposed) or several
concatenated along the output axis (fused modules). The recipe is invertible, so ``merge`` can write
merged weights back in the source layout (:meth:`RuntimeTensor.split`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from paddle_scorer.errors import CheckpointError

PADDLE = "paddle"
HF = "hf"

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Layout:
    kind: str  # PADDLE | HF
    saved_by: str | None  # "PaddleNLP 3.0.0b4", "PaddleFormers 1.2.0", "paddle-scorer merge", None
    evidence: str  # why we believe it: shown by inspect, recorded in provenance

    @property
    def description(self) -> str:
        if self.kind == HF:
            return "PaddleFormers / HF layout ([out, in] linear weights, `model.` names), converted on load"
        return "Paddle layout ([in, out] linear weights)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "saved_by": self.saved_by, "evidence": self.evidence,
                "description": self.description}


def _embedding(name: str) -> bool:
    return "embed_tokens" in name or name.endswith("word_embeddings.weight") or "embed_positions" in name


def _transposable(name: str, shape: tuple[int, ...]) -> bool:
    """2-D linear weights (lm_head included), not embeddings, not norms."""
    return len(shape) == 2 and name.endswith(".weight") and not _embedding(name)


# Linear weights whose orientation is unambiguous from the config: (name suffix, in_field, out_field).
_ORIENTATION_PROBES = (
    ("mlp.gate_proj.weight", "hidden_size", "intermediate_size"),
    ("mlp.up_proj.weight", "hidden_size", "intermediate_size"),
    ("mlp.down_proj.weight", "intermediate_size", "hidden_size"),
    ("lm_head.weight", "hidden_size", "vocab_size"),
)


def orientation_from_shapes(shapes: dict[str, tuple[int, ...]], config: dict) -> tuple[str | None, str]:
    """``(PADDLE | HF | None, evidence)`` from shapes that cannot be square. ``None``: cannot tell."""
    for suffix, in_f, out_f in _ORIENTATION_PROBES:
        a, b = config.get(in_f), config.get(out_f)
        if not isinstance(a, int) or not isinstance(b, int) or a == b:
            continue
        for name, shape in shapes.items():
            if name.endswith(suffix) and len(shape) == 2:
                if tuple(shape) == (a, b):
                    return PADDLE, f"{name} is [{in_f}, {out_f}] = {list(shape)}"
                if tuple(shape) == (b, a):
                    return HF, f"{name} is [{out_f}, {in_f}] = {list(shape)}"
    return None, "no linear weight whose orientation the config pins down (all square?)"


def declared_layout(config: dict, st_metadata: dict | None, merge_record: dict | None, prefix: str | None = None,
                    paddle_prefixes: frozenset[str] = frozenset()) -> Layout | None:
    """What the folder says about its layout, or None when it says nothing.

    A model loaded by one library and re-saved by the other keeps both ``paddlenlp_version`` and
    ``paddleformers_version`` (each library copies unknown config keys). Then the tensor names say who wrote
    the weights: an architecture prefix only PaddleNLP uses (``llama.``, in ``paddle_prefixes``) or
    PaddleFormers' ``model.``; anything else is undeclared (shapes decide, or the folder is refused).
    """
    if merge_record and merge_record.get("layout") in (PADDLE, HF):
        return Layout(merge_record["layout"], "paddle-scorer merge", "paddle_scorer_merge.json records the layout")
    pf = config.get("paddleformers_version")
    nlp = config.get("paddlenlp_version")
    if pf and nlp:
        both = f"config.json has both paddlenlp_version {nlp} and paddleformers_version {pf} (re-saved by the other library)"
        if prefix in paddle_prefixes:
            return Layout(PADDLE, f"PaddleNLP {nlp}", f"{both}; the tensor names start with `{prefix}.` (PaddleNLP's)")
        if prefix == "model":
            return Layout(HF, f"PaddleFormers {pf}", f"{both}; the tensor names start with `model.` (PaddleFormers')")
        return None
    if pf:
        return Layout(HF, f"PaddleFormers {pf}", f"config.json has paddleformers_version {pf} (it saves [out, in])")
    if nlp:
        return Layout(PADDLE, f"PaddleNLP {nlp}", f"config.json has paddlenlp_version {nlp}")
    fmt = (st_metadata or {}).get("format")
    if fmt == "pt":
        return Layout(HF, None, "safetensors metadata says format \"pt\" (a PyTorch/HF export: [out, in])")
    if fmt in ("np", "pd", "paddle"):
        return Layout(PADDLE, None, f"safetensors metadata says format \"{fmt}\" (Paddle)")
    if config.get("torch_dtype") and not config.get("dtype"):
        return Layout(HF, None, "config.json has torch_dtype and no dtype (an HF-style config)")
    return None


def resolve_layout(config: dict, shapes: dict[str, tuple[int, ...]], st_metadata: dict | None,
                   merge_record: dict | None, where: str, prefix: str | None = None,
                   paddle_prefixes: frozenset[str] = frozenset()) -> Layout:
    """The declared layout, cross-checked against shapes; refuse when undeclared and undecidable."""
    declared = declared_layout(config, st_metadata, merge_record, prefix, paddle_prefixes)
    by_shape, shape_evidence = orientation_from_shapes(shapes, config)
    if declared is not None:
        if by_shape is not None and by_shape != declared.kind:
            raise CheckpointError(
                f"{where}: {declared.evidence}, but {shape_evidence}, which is the other orientation; the folder "
                "mixes files from different exports: re-save the model with one library."
            )
        return declared
    if by_shape is None:
        raise CheckpointError(
            f"{where}: cannot tell whether the linear weights are stored [in, out] (Paddle) or [out, in] (HF): "
            "config.json has no paddlenlp_version/paddleformers_version and " + shape_evidence
            + "; add \"paddlenlp_version\" (Paddle layout) or \"paddleformers_version\" (HF layout) to config.json."
        )
    return Layout(by_shape, None, "shapes: " + shape_evidence)


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    source: str  # name in the checkpoint files
    source_shape: tuple[int, ...]
    transpose: bool
    start: int  # slice of the runtime tensor along its last axis
    stop: int
    select: tuple[int, int, int] | None = None  # (index, first row, end row) of a stacked source: source[i, r0:r1]

    def take(self, a: np.ndarray) -> np.ndarray:
        """This part's array from its source array: the selected slice of a stacked (3-D) source, transposed or not."""
        if self.select is not None:
            i, r0, r1 = self.select
            a = a[i, r0:r1]
        return a.T if self.transpose else a


@dataclass(frozen=True)
class RuntimeTensor:
    """One runtime parameter and how to make it from the checkpoint's tensors: the parts (each maybe
    transposed) concatenated along the last axis, then, for ERNIE 4.5's ``qkv_proj`` (and Phi-3's, stored as one
    tensor), the columns reordered (``perm[j]`` = the concatenated column that becomes runtime column ``j``)."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    perm: tuple[int, ...] | None = None
    decode: str | None = None  # "mxfp4": parts are (blocks, scales) of one [out, in] matrix, dequantized, then [in, out]

    @property
    def sources(self) -> list[str]:
        return [p.source for p in self.parts]

    @property
    def identity(self) -> bool:
        return len(self.parts) == 1 and not self.parts[0].transpose and self.perm is None and self.decode is None

    def build(self, arrays: dict[str, np.ndarray], dtype: str | None = None, alloc=None) -> np.ndarray:
        """The runtime array from the source arrays (``arrays`` keyed by source name). ``dtype`` "float32": half
        precision sources widened as they are laid out (:func:`~paddle_scorer.model.arrays.widen`: one pass, the
        transposition folded in), not transposed first and cast after, into ``alloc(shape)`` when given (memory the
        caller reuses)."""
        if dtype == "float32":
            from paddle_scorer.model.arrays import widen

            arrays = {p.source: arrays[p.source] for p in self.parts}
            if self.decode is None and any(a.dtype.itemsize == 2 for a in arrays.values()):
                new = alloc or (lambda shape: np.empty(shape, np.float32))
                if len(self.parts) == 1 and self.perm is None:
                    return widen(self.parts[0].take(arrays[self.parts[0].source]), new(self.shape))
                if len(self.parts) == 1:
                    a = widen(self.parts[0].take(arrays[self.parts[0].source]))
                    return np.ascontiguousarray(a[..., list(self.perm)])
                cat = new(self.shape) if self.perm is None else np.empty(self.shape, np.float32)  # parts into columns
                for p in self.parts:
                    widen(p.take(arrays[p.source]), cat[..., p.start:p.stop])
                return np.ascontiguousarray(cat[..., list(self.perm)]) if self.perm is not None else cat
        if self.decode == "mxfp4":
            from paddle_scorer.model.arrays import mxfp4_dequantize

            blocks, scales = (p.take(arrays[p.source]) for p in self.parts)
            a = mxfp4_dequantize(blocks, scales).T
            return np.ascontiguousarray(a[..., list(self.perm)] if self.perm is not None else a)
        if len(self.parts) == 1:
            p = self.parts[0]
            a = p.take(arrays[p.source])
            if self.perm is not None:  # one stored fused tensor whose columns the runtime reorders (Phi-3's qkv_proj)
                return np.ascontiguousarray(a[..., list(self.perm)])
            return np.ascontiguousarray(a) if (p.transpose or p.select is not None) else a
        cat = np.concatenate([p.take(arrays[p.source]) for p in self.parts], axis=-1)
        return np.ascontiguousarray(cat[..., list(self.perm)]) if self.perm is not None else cat

    def split(self, value: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of :meth:`build`: source-layout arrays from a runtime-layout array (a weight or a LoRA delta)."""
        if self.perm is not None:
            cat = np.empty_like(value)
            cat[..., list(self.perm)] = value
            value = cat
        if any(p.select is not None for p in self.parts) or self.decode is not None:
            raise CheckpointError(f"{self.name} is a slice of a stacked expert tensor ({self.parts[0].source}); a merged "
                                  "model cannot be written back into it: merge while loading (--mode merge) instead.")
        out = {}
        for p in self.parts:
            piece = value[..., p.start:p.stop] if len(self.parts) > 1 else value
            out[p.source] = np.ascontiguousarray(piece.T) if p.transpose else piece
        return out


@dataclass
class Conversion:
    """Source checkpoint -> runtime parameter names, for one layout and one runtime naming."""

    layout: Layout
    tensors: dict[str, RuntimeTensor]  # runtime name -> recipe
    prefix_note: str | None = None
    fused: list[str] = field(default_factory=list)  # runtime fused modules built from split files

    def by_source(self) -> dict[str, RuntimeTensor]:
        return {s: t for t in self.tensors.values() for s in t.sources}

    def layer_groups(self) -> dict[int | None, list[str]]:
        groups: dict[int | None, list[str]] = {}
        for name in self.tensors:
            groups.setdefault(layer_index(name), []).append(name)
        return groups


# A fused runtime module and the split modules it is saved as, in concatenation order.
FUSED_SPLITS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "up_gate_proj": ("gate_proj", "up_proj"),
}


def qkv_permutation(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """ERNIE 4.5's fused ``qkv_proj`` column order from ``[Q | K | V]``: grouped per KV head, each group the
    group's query heads, then its key head, then its value head (PaddleFormers 1.2.0, verified exactly)."""
    group = num_heads // num_kv_heads
    q, k = num_heads * head_dim, num_kv_heads * head_dim
    perm: list[int] = []
    for g in range(num_kv_heads):
        perm += range(g * group * head_dim, (g + 1) * group * head_dim)
        perm += range(q + g * head_dim, q + (g + 1) * head_dim)
        perm += range(q + k + g * head_dim, q + k + (g + 1) * head_dim)
    return tuple(perm)


def _is_lm_head(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def incomplete_fusions(shapes, fused: tuple[str, ...]) -> list[str]:
    """The parts of fused modules (``qkv_proj`` from q/k/v, ``up_gate_proj`` from gate/up) the checkpoint lacks while
    it has their siblings, in the file's own names: ``model.layers.0.self_attn.k_proj.bias: missing (its q_proj and
    v_proj are there)``, rather than calling the present parts unexpected."""
    out = []
    for fused_name in fused:
        splits = FUSED_SPLITS[fused_name]
        stems: dict[tuple[str, str], set[str]] = {}
        for n in shapes:
            m = re.match(rf"^(.*\.)({'|'.join(splits)})\.(weight|bias)$", n)
            if m:
                stems.setdefault((m.group(1), m.group(3)), set()).add(m.group(2))
        for (stem, leaf), have in sorted(stems.items()):
            for x in splits:
                if x not in have:
                    there = [f"{y}.{leaf}" for y in splits if y in have]
                    out.append(f"{stem}{x}.{leaf}: missing from the checkpoint (its {' and '.join(there)} "
                               f"{'is' if len(there) == 1 else 'are'} there)")
    return out


def runtime_tensors(shapes: dict[str, tuple[int, ...]], layout: Layout, src_prefix: str | None,
                    dst_prefix: str | None, fused: tuple[str, ...] = (), *, lm_head_out_in: bool = False,
                    config: dict | None = None) -> Conversion:
    """Recipes for every runtime parameter.

    * linear weights: stored ``[out, in]`` (HF layout) are transposed to the runtime's ``[in, out]``;
    * the LM head: transposed when its stored orientation differs from the runtime library's
      (PaddleNLP holds ``[hidden, vocab]``, PaddleFormers ``[vocab, hidden]``);
    * ``fused``: runtime modules (``qkv_proj``, ``up_gate_proj``) built by concatenating their split
      source modules along the output axis (``qkv_proj`` then reordered, see :func:`qkv_permutation`).
    """
    hf = layout.kind == HF
    config = config or {}

    def rename(name: str) -> str:
        if src_prefix and dst_prefix and src_prefix != dst_prefix and name.startswith(src_prefix + "."):
            return dst_prefix + name[len(src_prefix):]
        return name

    def transposed(name: str, shape: tuple[int, ...]) -> bool:
        if _is_lm_head(name) and len(shape) == 2:
            return hf != lm_head_out_in
        return hf and _transposable(name, shape)

    tensors: dict[str, RuntimeTensor] = {}
    used: set[str] = set()
    for fused_name in fused:
        splits = FUSED_SPLITS[fused_name]
        for n in sorted(x for x in shapes if re.search(rf"\.{splits[0]}\.(weight|bias)$", x)):
            leaf = n.rsplit(".", 1)[1]
            stem = n[: -len(f"{splits[0]}.{leaf}")]
            names = [f"{stem}{x}.{leaf}" for x in splits]
            if not all(x in shapes for x in names):
                continue
            parts, start = [], 0
            for x in names:
                shape = tuple(shapes[x])
                t = transposed(x, shape)
                width = shape[0] if t else shape[-1]
                parts.append(Part(x, shape, t, start, start + width))
                start += width
            first = parts[0]
            lead = ((first.source_shape[1] if first.transpose else first.source_shape[0]),) \
                if len(first.source_shape) == 2 else ()
            perm = None
            if fused_name == "qkv_proj":
                nh, nkv = config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get("num_attention_heads")
                hd = config.get("head_dim") or (config.get("hidden_size", 0) // nh if nh else None)
                if not all(isinstance(v, int) and v > 0 for v in (nh, nkv, hd)) or (nh + 2 * nkv) * hd != start:
                    raise CheckpointError(
                        f"{n}: cannot fuse q/k/v into qkv_proj: num_attention_heads={nh}, num_key_value_heads={nkv}, "
                        f"head_dim={hd} do not match the saved widths ({start} columns); fix config.json."
                    )
                perm = qkv_permutation(nh, nkv, hd)
            rt_name = rename(f"{stem}{fused_name}.{leaf}")
            tensors[rt_name] = RuntimeTensor(rt_name, lead + (start,), tuple(parts), perm)
            used.update(names)
    for name, shape in shapes.items():
        if name in used:
            continue
        shape = tuple(shape)
        t = transposed(name, shape)
        rt_shape = (shape[1], shape[0]) if t else shape
        rt_name = rename(name)
        if rt_name in tensors:
            raise CheckpointError(f"tensors {name!r} and {tensors[rt_name].sources[0]!r} both become {rt_name!r}; "
                                  "the checkpoint mixes two naming schemes.")
        tensors[rt_name] = RuntimeTensor(rt_name, rt_shape, (Part(name, shape, t, 0, rt_shape[-1] if rt_shape else 0),))
    note = None
    if src_prefix and dst_prefix and src_prefix != dst_prefix:
        note = f"`{src_prefix}.` -> `{dst_prefix}.`"
    return Conversion(layout, tensors, note, list(fused))
