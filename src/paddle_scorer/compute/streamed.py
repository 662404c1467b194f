"""Exact scoring of models bigger than RAM: the whole block of records goes through the network layer
by layer, and each layer is read once per block.

Disk-offload tools (AirLLM, accelerate) load every layer for every batch (per token, when
generating): for a 7B model, 1,000 prompts at batch 8 read ~3 TB. Here a *block* of records (as
many as the memory budget allows, usually the whole input) is processed as:

1. embeddings of every record of the block (the embedding table is read, looked up, freed);
2. for each decoder layer: read that layer's tensors (the next layer is read in a background thread
   while this one computes), merge or attach that layer's LoRA pairs, run every batch of the block
   through it, and keep the hidden states;
3. the final norm and the LM head, only at the rows whose next-token distribution is needed.

The layer math is :mod:`paddle_scorer.compute.decoder`'s CPU forward (the one the in-RAM runner uses, on the
same GEMM kernel), fed each layer's arrays as they are read. When that forward does not apply (another
architecture or dtype), the library's own decoder layer runs instead, on a one-layer "template" model
whose parameters are overwritten per layer, with the body's preprocessing (mask expansion, rotary
positions) captured once per batch from the template's first layer call. Either way a streamed score
is the in-RAM score computed in another order: equal within float32 noise (tests: 1e-5).

``StreamedBackend`` offers the backend's labelled-scoring interface (``score_many``/``score``,
``next_token_logprobs``); generation re-reads the model per token and is refused instead.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from paddle_scorer.compute.library_runner import log_softmax
from paddle_scorer.compute.packing import CALL_TOKENS, Packed, pack, padded, regroup, unpack
from paddle_scorer.errors import CheckpointError
from paddle_scorer.model.tensor_layout import layer_index
from paddle_scorer.compute import prefix_tree
from paddle_scorer.compute.layer_arena import LayerArena
from paddle_scorer.model.libraries import body_and_head
from paddle_scorer.model.loader import streaming_template, to_template
from paddle_scorer.model.memory_budget import records_per_block
from paddle_scorer.process.environment import paddle

class _Captured(Exception):
    pass


@dataclass
class StreamStats:
    blocks: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0  # in the background reader (overlapped with compute)
    wait_seconds: float = 0.0  # compute waiting for the reader
    prepare_seconds: float = 0.0  # laying out / widening / checking the read tensors (in the computing thread)
    experts_read: int = 0  # MoE layers read lazily: experts some token chose (read when first chosen)
    experts_skipped: int = 0  # ... and experts no token of the pass chose (never read)
    compute_seconds: float = 0.0
    records: int = 0
    layer_passes: int = 0
    block_records: list[int] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)  # each block's pass (the first pays fresh memory)

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "bytes_read": self.bytes_read, "read_seconds": round(self.read_seconds, 3),
                "wait_seconds": round(self.wait_seconds, 3), "prepare_seconds": round(self.prepare_seconds, 3),
                "experts_read": self.experts_read, "experts_skipped": self.experts_skipped,
                "compute_seconds": round(self.compute_seconds, 3),
                "records": self.records, "layer_passes": self.layer_passes,
                "block_seconds": [round(x, 3) for x in self.block_seconds]}


class StreamedBackend:
    """Labelled scoring of a model that is never fully in memory (see the module docstring)."""

    def __init__(self, loaded, pad_id: int = 0, prefix_reuse: bool = True):
        from paddle_scorer.process.environment import keep_freed_memory

        self.pass_tokens: int | None = None  # tokens the next pass computes (set by its caller: lazy experts)
        self.expert_names = {}
        self.pd = paddle()
        # each layer's arrays take the memory the previous layer's freed (no page faults): up to a layer's tensor size
        keep_freed_memory(min(max(32 << 20, loaded.plan.memory.largest_layer), 1 << 30))
        self._arenas = (LayerArena(), LayerArena())  # layer i lays out its widened tensors in arena i % 2
        self.loaded = loaded
        self.plan = plan = loaded.plan
        self.pad_id = pad_id
        self.stats = StreamStats()
        self.savings = prefix_tree.Savings()
        self.reuse = prefix_reuse
        self.no_reuse_reason = None if prefix_reuse else "--no-prefix-reuse"
        self.compute = {"forward": "library", "why": "streamed"}
        self.dtype = plan.policy.dtype
        self.attach = bool(plan.attached_pairs)  # pairs run beside the weights (DoRA's are merged as layers are read)
        self.family = plan.model.family
        if self.family is not None:
            self._init_family()
        else:
            self._init_library()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paddle-scorer-read")
        self._lock = threading.Lock()
        # the final norm is tiny: keep it resident
        norms = self._read(self.norm_names)
        self.norm_array = next(iter(norms.values())) if norms else None
        if self.family is None:
            self._set(norms)
        elif self.norm_array is not None:
            from paddle_scorer.compute import decoder

            self.norm_array = decoder.norm_weight(self.family, self.norm_array)

    def _init_library(self) -> None:
        """The library's one-layer template model (checked by the loader), and the decoder's forward when it applies."""
        plan = self.plan
        t = streaming_template(plan)  # every weight check the loader makes, and the one-layer template model
        self.num_layers, self.layer_names, self.outside, self.config = t.num_layers, t.layer_names, t.outside, t.config
        self.norm_names, self.embed_name, self.head_names = t.norm_names, t.embed_name, t.head_names
        self.tied_head = not self.head_names or any("lm_head.weight" in g for g in t.tied.values())
        self.tied = t.tied
        model = t.model
        self.fast = self._fast_forward(model)
        if self.attach and self.fast is None:
            # LoRA layers on the template layer's modules that any layer adapts (the same projections in each)
            modules = sorted({to_template(m + ".", layer_index(m + ".")).rstrip(".") for m in plan.attached_pairs
                              if layer_index(m + ".") is not None})
            model = plan.model.library.attach_lora(model, modules, plan.adapter.settings, self.dtype)
        self.net, self.body, self.head = body_and_head(model)
        self.params = (model.model if self.attach and self.fast is None else model).state_dict()
        self.layer0 = self.body.layers[0]
        self.final_norm = getattr(self.body, "norm", None) or getattr(self.body, "final_layernorm", None)
        if self.final_norm is None:
            raise CheckpointError(f"{type(self.body).__name__} has no final norm (`norm`); it cannot be streamed.")

    def _init_family(self) -> None:
        """A family model (no library model class): the loader checked every tensor already; the decoder runs it."""
        from paddle_scorer.compute import decoder, gemm

        fc, mp = self.family, self.plan.model
        groups = mp.conversion.layer_groups()
        self.num_layers = fc.layers
        self.layer_names = {i: groups[i] for i in range(fc.layers)}
        self.outside = groups.get(None, [])
        self.norm_names = ["model.norm.weight"]
        self.embed_name = "model.embed_tokens.weight"
        self.head_names = [n for n in self.outside if n.startswith("lm_head.") and not (fc.tie and n == "lm_head.weight")]
        if fc.tie:
            self.head_names.append(self.embed_name)  # the embedding is the head (a saved lm_head.weight is not used)
        self.tied_head, self.tied, self.config = fc.tie, {}, None
        kernel, choice = gemm.gemm(fc.hidden, fc.moe.intermediate if fc.moe else fc.intermediate)
        self.compute = {"forward": "paddle-scorer decoder", "family": fc.family, "gemm": choice.to_dict()}
        self.layer_prefix = "model.layers.0."
        arch = mp.library.arch_for(mp.info).architecture
        self.fast = decoder.Forward(decoder.spec_for_family(fc, arch), kernel, decoder.native_rope(fc))
        # a MoE layer's routed experts by index (read only when a token of a small pass chooses them: _lazy)
        self.expert_names: dict[int, dict[int, list[str]]] = {}
        if fc.moe is not None:
            import re

            for i in fc.moe_layers:
                pat = re.compile(rf"^model\.layers\.{i}\.{re.escape(fc.mlp_name)}\.experts\.(\d+)\.")
                for n in self.layer_names[i]:
                    m = pat.match(n)
                    if m:
                        self.expert_names.setdefault(i, {}).setdefault(int(m.group(1)), []).append(n)

    def _fast_forward(self, model):
        """The CPU decoder forward for this model (None, with ``compute`` saying why, when it does not apply)."""
        from paddle_scorer.compute import decoder
        from paddle_scorer.compute import gemm
        from paddle_scorer.model.libraries import body_and_head

        mp = self.plan.model
        net, body, _ = body_and_head(model)
        arch = mp.library.arch_for(mp.info).architecture
        prefix = getattr(net, "base_model_prefix", None) or "model"
        if self.dtype != "float32":
            spec, why = None, f"compute dtype {self.dtype}"
        elif gemm.library_forward_forced():
            spec, why = None, f"{gemm.FORWARD_ENV}=library"
        else:
            spec, why = decoder.spec_for(mp.library.name, arch, prefix, self.config)
        rotary = decoder.find_rotary(body) if spec is not None else None
        if spec is not None and rotary is None:
            spec, why = None, "no rotary-embedding module found"
        if spec is None:
            self.compute = {"forward": "library", "why": why}
            self.reuse = False  # the library's template layer cannot continue a prefix
            self.no_reuse_reason = "the library's forward (streamed) cannot continue a computed prefix"
            return None
        inter = int(getattr(self.config, "intermediate_size", 4 * spec.hidden))
        kernel, choice = gemm.gemm(spec.hidden, inter)
        self.compute = {"forward": "paddle-scorer decoder", "gemm": choice.to_dict()}
        self.layer_prefix = f"{prefix}.layers.0."
        rope = decoder.Rope(mp.library.name, rotary)
        if rope.dynamic and self.reuse:
            self.reuse, self.no_reuse_reason = False, "dynamic RoPE scaling (a position's rotation depends on the length of each call)"
        return decoder.Forward(spec, kernel, rope)

    # ------------------------------------------------------------------ reading

    def _read(self, names: list[str], layer: int | None = None) -> dict[str, np.ndarray]:
        """Runtime arrays ``names`` in the compute dtype (adapter merged in when mode is merge); template names."""
        return self._prepare(self._fetch(names), layer)

    def _fetch(self, names: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
        """The background reader's part: the stored bytes only (I/O releases the GIL and takes little CPU), so
        the layer computing on every core is not slowed by work running beside it (a GEMM kernel's threads that
        wait for a core collapse: measured 24.9 s against 17.0 s for the MoE benchmark with widening done here)."""
        t0 = time.perf_counter()
        arrays = self.plan.model.read_sources(names)
        nbytes = sum(a.nbytes for a in arrays.values())
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.read_seconds += time.perf_counter() - t0
        return names, arrays

    def _prepare(self, fetched: tuple[list[str], dict[str, np.ndarray]], layer: int | None, fresh: bool = True,
                 only=None) -> dict[str, np.ndarray]:
        """Lay out the stored tensors in the compute dtype (half precision widened as it is laid out: a shift of
        bfloat16's bits, the transposition folded in, on every core), check, merge the adapter (mode merge), add its
        pairs (attach); in the computing thread, between layers."""
        from paddle_scorer.model.arrays import cast_or_refuse, merge_lora, to_paddle_array

        t0 = time.perf_counter()
        names, stored = fetched
        arena = None
        if layer is not None:  # a decoder layer's arrays: in the ring's memory of two layers ago (no fresh pages)
            arena = self._arenas[layer % 2]
            if fresh:  # (not for an expert read later into the same layer)
                arena.reset()
        arrays = self.plan.model.lay_out(names, stored, "float32" if self.dtype == "float32" else None,
                                         arena.take if arena is not None else None)
        del stored
        where = str(self.plan.model_dir)
        for n in list(arrays):
            arrays[n] = cast_or_refuse(n, arrays[n], self.dtype, where)
        if self.plan.merged_pairs:
            pairs = {m: ab for m, ab in self.plan.merged_pairs.items() if m + ".weight" in arrays}
            merge_lora(arrays, pairs, self.plan.adapter.scaling, str(self.plan.lora_dir), out_dtype=self.dtype,
                       magnitudes=self.plan.magnitudes)
        out = {}
        for n in list(arrays):
            key = n if layer is None else to_template(n, layer)
            out[key] = to_paddle_array(arrays.pop(n), self.dtype)
        if self.attach and layer is not None:
            for m, (a, b) in self.plan.attached_pairs.items():
                if layer_index(m + ".") == layer and (only is None or only(m)):
                    t = to_template(m + ".", layer).rstrip(".")
                    out[t + ".lora_A"] = to_paddle_array(a, self.dtype)
                    out[t + ".lora_B"] = to_paddle_array(b, self.dtype)
        self.stats.prepare_seconds += time.perf_counter() - t0
        return out

    def _set(self, arrays: dict[str, np.ndarray]) -> None:
        from paddle_scorer.model.loader import materialise

        for name, arr in arrays.items():
            materialise(self.params[name], arr, on_cpu=True)  # takes the array's memory: no copy per layer

    def _free(self, names) -> None:
        for n in names:
            p = self.params.get(n)
            if p is not None and p._is_initialized():
                p._clear_data()

    # ------------------------------------------------------------------ the block

    def _layer_inputs(self, packed: Packed, embed: np.ndarray):
        """Embeddings of one batch and the body's preprocessed arguments of layer 0 (mask, positions...)."""
        pd = self.pd
        captured = {}
        original = self.layer0.forward

        def capture(*args, **kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Captured

        self.layer0.forward = capture
        try:
            embeds = pd.to_tensor(embed[packed.ids])
            self.body(inputs_embeds=embeds, attention_mask=pd.to_tensor(packed.mask),
                      position_ids=pd.to_tensor(packed.positions), use_cache=False, return_dict=True)
        except _Captured:
            pass
        finally:
            self.layer0.forward = original
        if "args" not in captured:
            raise CheckpointError("the model body did not call its first decoder layer; this architecture cannot be "
                                  "streamed.")
        return captured["args"], captured["kwargs"]

    @staticmethod
    def _with_hidden(args, kwargs, hidden):
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=hidden)
            return args, kwargs
        return (hidden, *args[1:]), kwargs

    @staticmethod
    def _hidden_of(args, kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _run_block(self, packs: list[Packed], rows_fn, nodes=None, node_of=None) -> list[np.ndarray]:
        """Every batch of the block through every layer; returns, per batch, log-probs at ``rows_fn(packed)``.
        ``nodes``: shared prefixes (parents first) computed once per layer; ``node_of[k]``: pack k's prefix."""
        if self.fast is not None:
            return self._run_block_fast(packs, rows_fn, nodes or [], node_of or [None] * len(packs))
        return self._run_block_library(packs, rows_fn)

    def _lazy(self, i: int) -> bool:
        """Whether layer ``i``'s routed experts are read only when chosen: a MoE layer in a pass of few tokens (fewer
        expert choices than experts: most experts are chosen by no token; a big block chooses nearly all, and is
        better read ahead whole)."""
        fc = self.family
        return (i in self.expert_names and self.pass_tokens is not None
                and self.pass_tokens * fc.moe.top_k < fc.moe.experts)

    def _names(self, i: int) -> list[str]:
        if not self._lazy(i):
            return self.layer_names[i]
        experts = {n for names in self.expert_names[i].values() for n in names}
        return [n for n in self.layer_names[i] if n not in experts]

    def _layers(self):
        """Each layer's arrays in turn, the next one read in the background while this one computes."""
        future = self._pool.submit(self._fetch, self._names(0))
        for i in range(self.num_layers):
            t0 = time.perf_counter()
            raw = future.result()
            self.stats.wait_seconds += time.perf_counter() - t0
            if i + 1 < self.num_layers:
                future = self._pool.submit(self._fetch, self._names(i + 1))
            arrays = self._prepare(raw, i, only=self._not_expert(i) if self._lazy(i) else None)
            del raw
            yield i, arrays
            self.stats.layer_passes += 1

    def _run_block_fast(self, packs: list[Packed], rows_fn, nodes: list, node_of: list) -> list[np.ndarray]:
        """The block through the CPU decoder forward: hidden states as numpy, each layer built from its arrays.
        A shared prefix (``nodes``) goes through each layer once, before the records that continue it: its keys
        and values for that layer are what those records attend to, and are freed with the layer."""
        from paddle_scorer.compute import decoder

        f = self.fast
        t_start = time.perf_counter()
        # the pass computes every real token of the block once (and each shared prefix's once)
        self.pass_tokens = int(sum(p.ids.size for p in packs)) + sum(n.depth - n.parent.depth for n in nodes)
        embed = self._read([self.embed_name])[self.embed_name]
        table = decoder.Outside(embed, None, None, False)
        states = []
        for p in packs:
            batch = decoder.Batch.from_mask(p.mask, p.ids.shape[1])
            batch.set_positions(p.positions)
            cos, sin = f.rope(batch.pick(p.positions), f.rope.span(p.positions))
            states.append([f.embed(table, batch.pick(p.ids)), batch, cos, sin])
        node_states = {}
        for node in nodes:  # each prefix's own tokens: one row, causal, continuing its parent's positions
            own = np.asarray(node.tokens[node.parent.depth:], dtype=np.int64)[None]
            batch = decoder.Batch.from_mask(np.ones_like(own), own.shape[1])
            batch.set_positions(np.arange(node.parent.depth, node.depth)[None])
            cos, sin = f.rope(np.arange(node.parent.depth, node.depth))
            node_states[id(node)] = [f.embed(table, own), batch, cos, sin]
        del embed, table
        for i, layer in self._decoder_layers():
            kv = {}
            for node in nodes:
                st = node_states[id(node)]
                parent = kv.get(id(node.parent))
                st[0], (k, v) = f.layer(layer, st[0], st[1], st[2], st[3], keep_kv=True, prefix=parent)
                k, v = k[0], v[0]  # [kv, own tokens, d]
                if parent is not None:
                    k, v = np.concatenate([parent[0], k], axis=1), np.concatenate([parent[1], v], axis=1)
                kv[id(node)] = (k, v)
            for st, node in zip(states, node_of):
                st[0], _ = f.layer(layer, st[0], st[1], st[2], st[3], prefix=kv.get(id(node)) if node else None)
            del layer, kv
        outside = self._head(None)
        results = []
        for p, st in zip(packs, states):
            idx = np.asarray(rows_fn(p), dtype=np.int64).reshape(-1, 2)
            rows = st[1].spread(st[0])[idx[:, 0], idx[:, 1]]
            results.append(f.logprobs(outside, rows))
        self.stats.blocks += 1
        self.stats.compute_seconds += time.perf_counter() - t_start
        self.stats.block_seconds.append(time.perf_counter() - t_start)
        return results

    def _decoder_layers(self):
        """The CPU decoder's layers in turn, each built from its arrays as they are read (the next read meanwhile),
        its LoRA pairs attached (DoRA's and merge mode's were merged as it was read)."""
        from paddle_scorer.compute import decoder

        scaling = self.plan.adapter.scaling if self.attach else 1.0
        for i, arrays in self._layers():
            tensors, lora = self._by_suffix(arrays)
            experts = decoder.LazyExperts(self.family, self.family.moe.experts, self._expert_loader(i, scaling)) \
                if self._lazy(i) else None
            layer = decoder.make_family_layer(self.family, i, tensors, lora, scaling, experts) \
                if self.family is not None else decoder.make_layer(tensors, lora, scaling)
            del arrays, tensors, lora
            yield i, layer
            if experts is not None:
                self.stats.experts_read += experts.loaded
                self.stats.experts_skipped += len(experts) - experts.loaded
            del layer, experts

    def _by_suffix(self, arrays: dict) -> tuple[dict, dict]:
        """A layer's arrays by suffix (``self_attn.q_proj.weight``) and its LoRA pairs by module suffix."""
        n = len(self.layer_prefix)
        tensors = {name[n:]: arr for name, arr in arrays.items()}
        lora = {}
        for suffix in [x for x in tensors if x.endswith(".lora_A")]:
            module = suffix[: -len(".lora_A")]
            lora[module] = (tensors.pop(suffix), tensors.pop(module + ".lora_B"))
        return tensors, lora

    def _not_expert(self, i: int):
        head = f"model.layers.{i}.{self.family.mlp_name}.experts."
        return lambda module: not module.startswith(head)

    def _expert_loader(self, i: int, scaling: float):
        """Expert ``e`` of layer ``i``: read, laid out (into the layer's arena), checked, its adapter merged or its
        pairs attached, when a token first chooses it (in the computing thread: a few experts' bytes)."""
        def load(e: int):
            names = self.expert_names[i][e]
            head = f"model.layers.{i}.{self.family.mlp_name}.experts.{e}."
            arrays = self._prepare(self._fetch(names), i, fresh=False, only=lambda m: (m + ".").startswith(head))
            tensors, lora = self._by_suffix(arrays)
            return tensors, lora, scaling
        return load

    def _head(self, embed):
        """What lies outside the layers for the decoder: the final norm (resident), the LM head (read now), and
        ``embed`` (the embedding table, or None when the caller has already embedded)."""
        from paddle_scorer.compute import decoder
        from paddle_scorer.compute.gemm import Mat

        head = self._read(self.head_names or [self.embed_name])
        weight = head.get("lm_head.weight", head.get(self.embed_name))
        # a tied head (no lm_head tensor, or one the model shares with the embedding) is laid out [vocab, hidden]
        return decoder.Outside(embed, self.norm_array, Mat(weight), self.fast.spec.head_out_in or self.tied_head,
                               head.get("lm_head.bias"))

    # ------------------------------------------------------------------ generation past RAM

    def decoding_runner(self):
        """A :class:`~paddle_scorer.compute.numpy_runner.NumpyRunner` whose layers are read as they are iterated: each
        call of its ``hidden`` is one pass over the weights for every row of the call, with the KV caches in RAM and the
        embedding table and LM head resident. ``Backend.decode_start`` / ``decode_step`` on it generate for a block of
        prompts with one pass per step: the in-RAM runner's math, layer by layer."""
        from paddle_scorer.compute.numpy_runner import NumpyRunner
        from paddle_scorer.errors import UsageError

        if self.fast is None:
            raise UsageError(f"generate past RAM runs on paddle-scorer's CPU decoder, which does not compute this model "
                             f"({self.compute.get('why')}); run it in RAM (a bigger machine or a GPU).")
        embed = self._read([self.embed_name])[self.embed_name]
        return NumpyRunner(self.fast, _StreamedLayers(self), self._head(embed))

    def kv_bytes_per_token(self) -> int:
        """float32 keys and values one token keeps in every layer's cache (DeepSeek's MLA: the expanded heads)."""
        sp = self.fast.spec
        return 4 * self.num_layers * sp.kv_heads * (sp.head_dim + sp.value_dim)

    def _run_block_library(self, packs: list[Packed], rows_fn) -> list[np.ndarray]:
        """The block through the library's own decoder layer (a template layer whose weights are swapped)."""
        pd = self.pd
        t_start = time.perf_counter()
        embed = self._read([self.embed_name])[self.embed_name]
        if embed.dtype == np.uint16:  # bf16 bits: look up in float32
            from paddle_scorer.checkpoint.weights import BFLOAT16

            embed = embed.view(BFLOAT16).astype(np.float32)
        inputs = [self._layer_inputs(p, embed) for p in packs]
        del embed
        states = [self._hidden_of(a, k) for a, k in inputs]
        for i, arrays in self._layers():
            self._set(arrays)
            del arrays
            with pd.no_grad():
                for b, (args, kwargs) in enumerate(inputs):
                    a, k = self._with_hidden(args, kwargs, states[b])
                    out = self.layer0(*a, **k)
                    states[b] = out[0] if isinstance(out, (tuple, list)) else out
        self._free([n for n in self.params if layer_index(n) == 0])  # the last layer's weights
        head = self._read(self.head_names or [self.embed_name])
        if not self.head_names:  # tied: the head is the embedding table
            tied_head = next(g for g in self.tied.values() if self.embed_name in g)
            head = {n: head[self.embed_name] for n in tied_head}
        self._set(head)
        del head
        results = []
        with pd.no_grad():
            for p, h in zip(packs, states):
                rows = rows_fn(p)
                sel = pd.gather_nd(h, pd.to_tensor(np.asarray(rows, dtype=np.int64).reshape(-1, 2)))
                normed = self.final_norm(sel.unsqueeze(0)).squeeze(0)
                logits = self.head(normed.unsqueeze(0)).squeeze(0)
                results.append(log_softmax(pd, logits).numpy())
        self._free(self.head_names or [n for g in self.tied.values() for n in g])
        self.stats.blocks += 1
        self.stats.compute_seconds += time.perf_counter() - t_start
        self.stats.block_seconds.append(time.perf_counter() - t_start)
        return results

    # ------------------------------------------------------------------ block sizing

    def block_size_for(self, width: int, total: int) -> int:
        """Records per block for packed rows of ``width`` tokens (:func:`paddle_scorer.model.memory_budget.records_per_block`)."""
        return records_per_block(self.plan.memory, width, total)

    def block_size(self, preps: list) -> int:
        """Records per block for prepared classify records (their widest packed row decides)."""
        width = max(len(p.context) + sum(len(x) - 1 for x in p.label_ids) for p in preps)
        return self.block_size_for(width, len(preps))

    # ------------------------------------------------------------------ the backend interface

    def score_many(self, batches: list[tuple[list[list[int]], list[list[list[int]]]]]):
        """Score every batch of a block in one streamed pass; per batch, what :meth:`Backend.score` returns.
        The block's records are re-cut into layer calls of about ``CALL_TOKENS`` tokens (see there), around the
        prefixes they share (:mod:`paddle_scorer.compute.prefix_tree`, computed once per layer); the results do not depend
        on how records are grouped (each row attends only to its own record and its prefix)."""
        items = [(p, c) for prompts, conts in batches for p, c in zip(prompts, conts, strict=True)]
        root = prefix_tree.plan([p for p, _ in items]) if self.reuse else prefix_tree.Node(0, members=list(range(len(items))))
        if self.reuse:
            self.savings.add(root, [p for p, _ in items])
        packs, order, node_of = [], [], []
        for node in root.walk():
            if not node.members:
                continue
            idx = sorted(node.members, key=lambda i: -len(items[i][0]))
            sub = [(items[i][0][node.depth:], items[i][1]) for i in idx]
            for g in regroup(sub, CALL_TOKENS):
                packs.append(pack([sub[k][0] for k in g], [sub[k][1] for k in g], self.pad_id, offset=node.depth))
                order.append([idx[k] for k in g])
                node_of.append(None if node.is_root else node)
        nodes = [n for n in root.walk() if not n.is_root]
        lps = self._run_block(packs, lambda p: p.rows, nodes, node_of)
        flat: list = [None] * len(items)
        for p, lp, idx in zip(packs, lps, order):
            for i, score in zip(idx, unpack(p, lp)):
                flat[i] = score
        self.stats.records += len(items)
        self.stats.block_records.append(len(items))
        out, start = [], 0
        for prompts, _ in batches:
            out.append(flat[start:start + len(prompts)])
            start += len(prompts)
        return out

    def score(self, prompts, continuations):
        return self.score_many([(prompts, continuations)])[0]

    def next_token_logprobs(self, prompts: list[list[int]]) -> np.ndarray:
        ids, mask, pos = padded(prompts, self.pad_id)
        p = Packed(ids, pos, mask, [(i, len(x) - 1) for i, x in enumerate(prompts)], [], [])
        return self._run_block([p], lambda q: q.rows)[0]

    def reuse_stats(self) -> dict:
        """What prefix reuse did (provenance): every shared prefix is computed once per block."""
        if not self.reuse:
            return {"enabled": False, "why": self.no_reuse_reason}
        return {"enabled": True, **self.savings.to_dict()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _StreamedLayers:
    """The decoder layers of a streamed model as a sequence the runner iterates: every iteration reads them again,
    one at a time (two held: one computing, the next read ahead)."""

    def __init__(self, backend: StreamedBackend):
        self.backend = backend

    def __len__(self) -> int:
        return self.backend.num_layers

    def __iter__(self):
        for _, layer in self.backend._decoder_layers():
            yield layer
