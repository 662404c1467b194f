"""The CPU runner: :mod:`paddle_scorer.compute.decoder`'s forward over a model loaded in RAM, behind the same seam as
:class:`~paddle_scorer.compute.library_runner.ModelRunner` (``hidden`` / ``logprobs`` / ``gather`` / ``select_cache``), so the
:class:`~paddle_scorer.compute.in_ram.Backend` algorithms (packed labels, echo, batched decoding) run on it unchanged.

The weights are the loaded model's own parameters, viewed as numpy without a copy (an attached LoRA's
``lora_A``/``lora_B`` too, with the scaling its layers hold). :func:`runner_for` returns ``None`` with the reason
when the model is not one the CPU forward computes; the library's forward is used then.
"""

from __future__ import annotations

import numpy as np

from paddle_scorer.compute import decoder
from paddle_scorer.compute import gemm
from paddle_scorer.compute.decoder import KV, Batch, Forward, Outside, Rope, UnsupportedWeights, make_layer
from paddle_scorer.model.tensor_layout import layer_index
from paddle_scorer.compute.prefix_tree import Prefix


def _outside(spec, named: dict, tied: bool) -> Outside:
    p = spec.prefix
    embed = named[f"{p}.embed_tokens.weight"]
    head = named.get("lm_head.weight", embed)
    # PaddleNLP's untied head is [hidden, vocab]; PaddleFormers' (and any tied head) is [vocab, hidden]
    transposed = spec.head_out_in or tied or head is embed
    bias = named.get("lm_head.bias")
    return Outside(embed.np, named[f"{p}.norm.weight"].np, head, transposed, bias.np if bias is not None else None)


def split_named(spec, named: dict) -> tuple[dict[int, dict], dict]:
    """Runtime tensor names -> per-layer dicts keyed by suffix (``self_attn.q_proj.weight``) and the rest."""
    layers: dict[int, dict] = {}
    rest = {}
    for name, value in named.items():
        i = layer_index(name)
        if i is None:
            rest[name] = value
            continue
        suffix = name.split(f".layers.{i}.", 1)[1]
        layers.setdefault(i, {})[suffix] = value
    return layers, rest


class NumpyRunner:
    """A loaded in-RAM model run by the CPU forward (see the module docstring)."""

    def __init__(self, forward: Forward, layers: list, outside: Outside, family_tensors: dict | None = None):
        self.f = forward
        self.layers = layers
        self.outside = outside
        self.family_tensors = family_tensors  # a family model's per-layer tensors: adapters rebuild layers from them

    # the ModelRunner seam ------------------------------------------------------------------------

    @property
    def supports_prefix(self) -> bool:
        """Whether a computed prefix can be continued (not with a dynamic rotary module: see ``decoder.Rope``)."""
        return not self.f.rope.dynamic

    @property
    def no_prefix_reason(self) -> str | None:
        return "dynamic RoPE scaling (a position's rotation depends on the length of each call)" \
            if self.f.rope.dynamic else None

    def hidden(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: KV | None = None,
               use_cache: bool = False, lengths=None, prefix: Prefix | None = None):
        """Final-normed hidden states ``[B, T, H]`` (the body's output, as the library returns it; padding slots
        zero) and the cache extended by these tokens when ``use_cache``. ``prefix``: a computed prefix every row
        continues (positions count from its end; a cache made here keeps it for the next steps)."""
        call = self._begin(ids, mask, positions, cache, use_cache, lengths, prefix)
        for i, layer in enumerate(self.layers):
            self._through(call, i, layer)
        return self._end(call)

    def hidden_each(self, calls: list[tuple]) -> list[tuple]:
        """:meth:`hidden` of several independent calls ``(ids, mask, positions, cache)`` (``use_cache``) in one pass
        over the layers: each call computed alone, exactly as :meth:`hidden` computes it (its own shapes), but every
        layer visited once for all of them (a streamed model reads its weights once)."""
        started = [self._begin(ids, mask, pos, cache, True, None, None) for ids, mask, pos, cache in calls]
        for i, layer in enumerate(self.layers):
            for call in started:
                self._through(call, i, layer)
        return [self._end(call) for call in started]

    def _begin(self, ids, mask, positions, cache, use_cache, lengths, prefix) -> dict:
        B, T = ids.shape
        if cache is not None and cache.prefix is not None:
            prefix = cache.prefix
        past = cache.length if cache is not None else 0
        mask = np.asarray(mask)
        batch = Batch.from_mask(mask, T, past, lengths)
        positions = np.asarray(positions)
        if self.f.window is not None:  # a sliding window counts positions: the cache's real slots continue the prefix
            start = prefix.length if prefix is not None else 0
            past_pos = (np.cumsum(cache.keep, axis=1) - 1 + start) if past else None
            batch.set_positions(positions, past_pos)
        cos, sin = self.f.rope(batch.pick(positions), self.f.rope.span(positions, past))
        h = self.f.embed(self.outside, batch.pick(ids))
        return {"h": h, "batch": batch, "cos": cos, "sin": sin, "cache": cache, "past": past, "prefix": prefix,
                "new": KV(prefix=prefix) if use_cache else None}

    def _through(self, call: dict, i: int, layer) -> None:
        cache, past, prefix, new = call["cache"], call["past"], call["prefix"], call["new"]
        pk = (cache.keys[i], cache.values[i]) if past else None
        call["h"], kv = self.f.layer(layer, call["h"], call["batch"], call["cos"], call["sin"], pk,
                                     keep_kv=new is not None, prefix=prefix.layer(i) if prefix is not None else None)
        if new is not None:
            k, v = kv
            if past:
                k = np.concatenate([cache.keys[i], k], axis=2)
                v = np.concatenate([cache.values[i], v], axis=2)
            new.keys.append(k)
            new.values.append(v)

    def _end(self, call: dict):
        batch, cache, new = call["batch"], call["cache"], call["new"]
        if new is not None:
            tail = batch.spread(np.ones(batch.size, dtype=bool))
            new.keep = tail if not call["past"] else np.concatenate([cache.keep, tail], axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            normed = decoder.rms_norm(call["h"], self.outside.norm, self.f.spec.eps)
        return batch.spread(normed), new

    def extend(self, prefix: Prefix | None, tokens) -> Prefix:
        """``prefix`` (None: nothing) followed by ``tokens`` (the whole sequence, the prefix's tokens first)."""
        return self.extend_many(prefix, [tokens])[0]

    def extend_many(self, prefix: Prefix | None, sequences: list) -> list[Prefix]:
        """Several continuations of one prefix (siblings in a radix plan), computed as rows of one batch."""
        from paddle_scorer.compute.packing import padded

        start = prefix.length if prefix is not None else 0
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        ids, mask, pos = padded([s[start:].tolist() for s in seqs], 0, start)
        hidden, kv = self.hidden(ids, mask, pos, use_cache=True, prefix=prefix)
        out = []
        for b, s in enumerate(seqs):
            n = len(s) - start
            keys = [k[b, :, :n] for k in kv.keys]
            values = [v[b, :, :n] for v in kv.values]
            rows = hidden[b, :n]
            if prefix is not None:
                keys = [np.concatenate([pk, k], axis=1) for pk, k in zip(prefix.keys, keys)]
                values = [np.concatenate([pv, v], axis=1) for pv, v in zip(prefix.values, values)]
                rows = np.concatenate([prefix.hidden, rows]) if prefix.hidden is not None else None
            else:
                keys, values, rows = [k.copy() for k in keys], [v.copy() for v in values], rows.copy()
            out.append(Prefix(s, keys, values, rows))
        return out

    def with_adapter(self, pairs: dict, scaling: float) -> "NumpyRunner":
        """The same base weights (shared, not copied) with another LoRA adapter attached: ``pairs`` maps runtime
        module names (``llama.layers.0.self_attn.q_proj``) to ``(A, B)``. For serving several adapters on one base."""
        import copy

        spec = self.f.spec
        if self.family_tensors is not None:
            return NumpyRunner(self.f, _family_layers(spec.family, self.family_tensors, pairs, scaling), self.outside,
                               self.family_tensors)
        layers = []
        for layer in self.layers:
            c = copy.copy(layer)
            for role in ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"):
                lin = getattr(layer, role)
                if lin is not None:
                    setattr(c, role, decoder.Linear(lin.w, lin.b))
            layers.append(c)
        for module, (a, b) in pairs.items():
            i = layer_index(module + ".")
            suffix = module.split(f".layers.{i}.", 1)[1] if i is not None else None
            role = decoder.LINEARS.get(suffix) if suffix else None
            if role is None or not module.startswith(f"{spec.prefix}.layers."):
                raise UnsupportedWeights(f"a LoRA pair on {module!r} (outside the decoder layers' projections)")
            getattr(layers[i], role).set_lora(a.astype(np.float32), b.astype(np.float32), scaling)
        return NumpyRunner(self.f, layers, self.outside)

    def logprobs(self, rows: np.ndarray) -> np.ndarray:
        return self.f.logprobs(self.outside, np.ascontiguousarray(rows, dtype=np.float32), normed=True)

    def gather(self, hidden: np.ndarray, rows: list[tuple[int, int]]) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        return hidden[idx[:, 0], idx[:, 1]]

    def select_cache(self, cache: KV, index: list[int]) -> KV:
        return cache.rows(index)  # the shared prefix, if any, stays with it


def gemm_for(spec, intermediate: int):
    return gemm.gemm(spec.hidden, intermediate)


def runner_for(model, library: str, architecture: str, config) -> tuple[NumpyRunner | None, str | None]:
    """A CPU runner over a loaded (float32, CPU) model, or ``(None, why not)``."""
    from paddle_scorer.model.libraries import body_and_head

    net, body, head = body_and_head(model)
    prefix = getattr(net, "base_model_prefix", None) or "model"
    spec, why = decoder.spec_for(library, architecture, prefix, config)
    if spec is None:
        return None, why
    rotary = decoder.find_rotary(body)
    if rotary is None:
        return None, "no rotary-embedding module found"
    state = net.state_dict()
    if any(str(t.dtype) not in ("paddle.float32",) for t in state.values()):
        return None, "weights are not float32"
    named = {}
    seen: dict[int, gemm.Mat] = {}
    for name, t in state.items():
        key = id(t)
        if key not in seen:
            seen[key] = gemm.Mat.of_tensor(t)
        named[name] = seen[key]
    tied = "lm_head.weight" in named and named["lm_head.weight"] is named.get(f"{prefix}.embed_tokens.weight")
    scalings = {name: float(sub.scaling) for name, sub in net.named_sublayers() if hasattr(sub, "lora_A")}
    per_layer, rest = split_named(spec, named)
    try:
        layers = []
        for i in range(len(per_layer)):
            tensors = dict(per_layer[i])
            lora = {}
            for suffix in [s for s in tensors if s.endswith(".lora_A")]:
                module = suffix[: -len(".lora_A")]
                full = f"{prefix}.layers.{i}.{module}"
                lora[module] = (tensors.pop(suffix), tensors.pop(module + ".lora_B"), scalings.get(full, 1.0))
            layer = make_layer(tensors)
            for module, (a, b, s) in lora.items():
                role = decoder.LINEARS.get(module)
                if role is None:
                    raise UnsupportedWeights(f"a LoRA pair on {module!r}")
                getattr(layer, role).set_lora(a, b, s)
            layers.append(layer)
        unknown = set(rest) - {f"{prefix}.embed_tokens.weight", f"{prefix}.norm.weight", "lm_head.weight", "lm_head.bias"}
        if unknown:
            raise UnsupportedWeights(f"the tensor {sorted(unknown)[0]!r}")
        outside = _outside(spec, rest, tied)
    except (UnsupportedWeights, KeyError) as exc:
        return None, f"unsupported weights ({exc})"
    kernel, _ = gemm_for(spec, int(getattr(config, "intermediate_size", None) or 4 * spec.hidden))
    return NumpyRunner(Forward(spec, kernel, Rope(library, rotary)), layers, outside), None


def _family_layers(fc, per_layer: dict[int, dict], pairs: dict, scaling: float) -> list:
    """A family model's layers from their tensors by suffix and LoRA pairs keyed by runtime module name."""
    by_layer: dict[int, dict] = {}
    for module, (a, b) in pairs.items():
        i = layer_index(module + ".")
        if i is None or i not in per_layer:
            raise UnsupportedWeights(f"a LoRA pair on {module!r} (outside the decoder layers' projections)")
        suffix = module.split(f".layers.{i}.", 1)[1]
        by_layer.setdefault(i, {})[suffix] = (np.asarray(a, np.float32), np.asarray(b, np.float32))
    return [decoder.make_family_layer(fc, i, per_layer[i], by_layer.get(i), scaling) for i in range(fc.layers)]


def family_runner(fc, architecture: str, arrays: dict[str, np.ndarray], pairs: dict | None = None,
                  scaling: float = 1.0) -> NumpyRunner:
    """The decoder over a family model's runtime tensors (:func:`paddle_scorer.model.loader.read_family`), with LoRA
    ``pairs`` attached (``{runtime module: (A, B)}``)."""
    spec = decoder.spec_for_family(fc, architecture)
    per_layer, rest = split_named(spec, arrays)
    layers = _family_layers(fc, per_layer, pairs or {}, scaling)
    embed = rest["model.embed_tokens.weight"]
    head = embed if fc.tie else rest["lm_head.weight"]
    outside = Outside(embed, decoder.norm_weight(fc, rest["model.norm.weight"]), gemm.Mat(head), True, rest.get("lm_head.bias"))
    inter = fc.moe.intermediate if fc.moe else fc.intermediate
    kernel, _ = gemm.gemm(fc.hidden, inter)
    return NumpyRunner(Forward(spec, kernel, decoder.native_rope(fc)), layers, outside, per_layer)
