"""One load plan: every path resolved, every check made and every decision taken before paddle sees
a tensor. Built once per command and consumed by in-RAM loading (:mod:`paddle_scorer.model.loader`),
layer-streamed scoring (:mod:`paddle_scorer.compute.streamed`), ``merge`` and ``smoke``. No paddle import.

The recipe (in the spirit of mlx-lm's ``load = load_model + load_adapters + load_tokenizer``, with our
validation in front):

1. :func:`~paddle_scorer.model.folders.resolve_paths` — ``--model`` may be omitted when the adapter names a local base;
2. :func:`ckpt.describe` both folders once — file discovery, per-tensor metadata (kept as
   :class:`~paddle_scorer.checkpoint.weights.TensorRef`, so nothing re-reads a header), traps and ambiguities;
3. :mod:`paddle_scorer.model.folders` refuses what cannot be loaded honestly;
4. the runtime library and the layout conversion (:mod:`paddle_scorer.model.tensor_layout`,
   :mod:`paddle_scorer.model.libraries`): source tensors -> the runtime model's parameter names and shapes;
5. the adapter is read (it is small) and validated against those runtime shapes
   (:mod:`paddle_scorer.model.adapter_check`): every tensor lands on a module, shapes and rank fit, nothing is NaN/inf,
   it is not a no-op;
6. device and dtype policy (:mod:`paddle_scorer.model.dtype_policy`) and the one memory rule
   (:mod:`paddle_scorer.model.memory_budget`): in RAM, streamed layer by layer, or refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.checkpoint import peft_config
from paddle_scorer.model import families, family_layout, family_tensors, libraries, memory_budget, rope_config
from paddle_scorer.model.adapter_check import split_parts, validate_adapter
from paddle_scorer.model.arrays import nonfinite
from paddle_scorer.model.dtype_policy import GpuInfo, Policy, plan_policy
from paddle_scorer.errors import CheckpointError, UsageError, WeightMismatchError
from paddle_scorer.checkpoint.fingerprints import adapter_sha256
from paddle_scorer.checkpoint.sidecars import MERGE_RECORD
from paddle_scorer.model.folders import (
    check_adapter_folder,
    check_base_matches_adapter,
    check_model_folder,
    check_tokenizer_files,
    resolve_paths,
    tokenizer_folder,
)
from paddle_scorer.model.config_sizes import check_config_sizes, check_tied_head
from paddle_scorer.model.tensor_layout import (
    FUSED_SPLITS,
    Conversion,
    Layout,
    incomplete_fusions,
    layer_index,
    resolve_layout,
    runtime_tensors,
)
from paddle_scorer.checkpoint.lora import LoraSettings
from paddle_scorer.checkpoint.weights import TensorRef, read_tensors

MODES = ("attach", "merge")


def dominant_dtype(dtypes: dict[str, int]) -> str:
    return max(dtypes.items(), key=lambda kv: kv[1])[0] if dtypes else "float32"


@dataclass
class ModelPlan:
    folder: Path
    info: ckpt.CheckpointInfo
    refs: dict[str, TensorRef]  # source tensor name -> where its bytes are
    layout: Layout
    library: libraries.LibrarySpec
    conversion: Conversion  # runtime parameter name -> recipe from the source tensors
    family: families.FamilyConfig | None = None  # a model paddle-scorer's decoder computes without a model class

    @property
    def num_params(self) -> int:
        """Parameters of the model that runs (next-n / MTP layers a checkpoint carries are not run, nor counted)."""
        if self.family is not None:
            return int(sum(int(np.prod(t.shape)) for t in self.conversion.tensors.values()))
        return self.info.weights.num_params

    @property
    def num_layers(self) -> int:
        return int(self.info.config.get("num_hidden_layers") or 0)

    @property
    def stored_dtype(self) -> str:
        return dominant_dtype(self.info.weights.dtypes)

    @property
    def prefix_aliases(self) -> tuple[str, ...]:
        """Prefixes an adapter for this model may carry besides the runtime's: the checkpoint's own, and the
        body prefix other libraries give the same architecture (``llama.`` in PaddleNLP, ``model.`` here)."""
        runtime = self.library.arch_for(self.info).prefix
        names = {ckpt.key_prefix(self.refs)} | libraries.prefixes_of(self.library.arch_for(self.info).architecture)
        if self.family is not None:
            names |= {families.PADDLENLP_PREFIX.get(self.family.family)}
        return tuple(sorted(p for p in names if p and p != runtime))

    def runtime_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self.conversion.tensors.items()}

    def layer_bytes(self, dtype_size: int = 4) -> dict[int | None, int]:
        """Bytes per decoder layer (``None``: everything outside the layers) in a compute dtype."""
        out: dict[int | None, int] = {}
        for name, t in self.conversion.tensors.items():
            n = int(np.prod(t.shape)) if t.shape else 1
            out[layer_index(name)] = out.get(layer_index(name), 0) + n * dtype_size
        return out

    def largest_outside(self, dtype_size: int = 4) -> int:
        """Bytes of the largest runtime tensor outside the decoder layers (embeddings or LM head)."""
        sizes = [int(np.prod(t.shape)) * dtype_size for n, t in self.conversion.tensors.items() if layer_index(n) is None]
        return max(sizes, default=0)

    def read(self, names: list[str], where: str | None = None, check: bool = True,
             dtype: str | None = None) -> dict[str, np.ndarray]:
        """The runtime arrays ``names`` (converted to the runtime layout, stored dtype; ``dtype`` "float32": half
        precision widened while laid out), NaN/inf refused (unless ``check`` is False: the caller checks after its
        cast, see :func:`paddle_scorer.model.arrays.cast_or_refuse`)."""
        arrays = self.read_sources(names)
        bad = nonfinite(arrays) if check else []
        if bad:
            raise WeightMismatchError(
                f"{where or self.folder}: the model weights contain NaN/inf, so every score would be meaningless:", bad,
                "Re-export the checkpoint from a healthy training step.",
            )
        return self.lay_out(names, arrays, dtype)

    def read_sources(self, names: list[str]) -> dict[str, np.ndarray]:
        """The stored tensors the runtime arrays ``names`` are made of, as stored (a stacked tensor read once)."""
        recipes = [self.conversion.tensors[n] for n in names]
        return read_tensors([self.refs[s] for s in dict.fromkeys(s for r in recipes for s in r.sources)])

    def lay_out(self, names: list[str], arrays: dict[str, np.ndarray], dtype: str | None = None,
                alloc=None) -> dict[str, np.ndarray]:
        """The runtime arrays ``names`` from their stored tensors (:meth:`read_sources`; consumed), each source let go
        after its last user; ``dtype`` "float32": half precision widened while laid out (into ``alloc(shape)``)."""
        recipes = [self.conversion.tensors[n] for n in names]
        out = {}
        users = {}
        for r in recipes:
            for s in r.sources:
                users[s] = users.get(s, 0) + 1
        for r in recipes:
            out[r.name] = r.build({s: arrays[s] for s in r.sources}, dtype, alloc)
            for s in r.sources:  # a source no later recipe needs is let go (its bytes may be large)
                users[s] -= 1
                if not users[s]:
                    del arrays[s]
        return out


@dataclass
class AdapterPlan:
    folder: Path
    info: ckpt.CheckpointInfo
    settings: LoraSettings
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # runtime module name -> (A [in, r], B [r, out])
    mapping_note: str | None
    sha256: str
    base_note: str | None = None
    noop_allowed: bool = False
    # DoRA (peft's use_dora): runtime module -> magnitude per output column (NaN: a column DoRA does not scale). Such a
    # module's pair is merged into its weight in both modes: W' = m / ||W + s B A||_col * (W + s B A), as peft merges.
    magnitudes: dict[str, np.ndarray] = field(default_factory=dict)
    # Whole base tensors the adapter replaces (peft's modules_to_save, trained biases): base tensor name -> the
    # adapter file's tensor (same name after the prefix, same shape: read instead of the base's)
    whole: dict[str, TensorRef] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.settings.scaling

    @property
    def changes_base(self) -> bool:
        """DoRA magnitudes or replaced tensors: the base's own weights change, so this adapter cannot share a base."""
        return bool(self.magnitudes or self.whole)

    def attached_pairs(self, mode: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The pairs run beside the weights: every pair attached, but DoRA's (merged in both modes); none merged."""
        return {m: ab for m, ab in self.pairs.items() if m not in self.magnitudes} if mode == "attach" else {}

    def merged_pairs(self, mode: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The pairs merged into the weights as they are read: all with merge, DoRA's with attach."""
        return dict(self.pairs) if mode == "merge" else {m: ab for m, ab in self.pairs.items() if m in self.magnitudes}

    def pairs_in_layer(self, layer: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {m: ab for m, ab in self.pairs.items() if layer_index(m + ".") == layer}


@dataclass
class LoadPlan:
    model: ModelPlan
    adapter: AdapterPlan | None
    mode: str  # attach | merge
    policy: Policy
    tokenizer_dir: Path
    memory: memory_budget.MemoryPlan
    notes: list[str] = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.model.folder

    @property
    def lora_dir(self) -> Path | None:
        return self.adapter.folder if self.adapter else None

    @property
    def streamed(self) -> bool:
        return self.memory.execution == memory_budget.STREAMED

    @property
    def attached_pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.adapter.attached_pairs(self.mode) if self.adapter is not None else {}

    @property
    def merged_pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.adapter.merged_pairs(self.mode) if self.adapter is not None else {}

    @property
    def magnitudes(self) -> dict[str, np.ndarray]:
        return self.adapter.magnitudes if self.adapter is not None else {}


def plan_model(model_dir: Path, info: ckpt.CheckpointInfo | None = None, *, library: str | None = None,
               device: str | None = None) -> ModelPlan:
    """Describe and check a model folder, pick the runtime library (or paddle-scorer's own decoder) and the layout
    conversion. ``device``: where it will run, when known (a library that builds the model on a GPU is preferred
    there to the CPU decoder)."""
    info = info or ckpt.describe(model_dir)
    check_model_folder(info)
    check_config_sizes(info)
    refs = info.tensors
    shapes = {n: r.shape for n, r in refs.items()}
    src_prefix = ckpt.key_prefix(shapes)
    layout = resolve_layout(info.raw_config, shapes, info.weights.metadata, info.merged_from, str(model_dir),
                            src_prefix, libraries.paddle_layout_prefixes())
    lib = libraries.choose(info, layout, requested=library, device=device)
    arch = lib.arch_for(info)
    if not lib.native:
        rope_config.declared(info.raw_config, str(model_dir))  # two rotary dialects that disagree: refused for all
        check_tied_head(info, info.raw_config.get("tie_word_embeddings") is True)
        conversion = runtime_tensors(shapes, layout, src_prefix, arch.prefix, arch.fused,
                                     lm_head_out_in=arch.lm_head_out_in, config=info.raw_config)
        return ModelPlan(Path(model_dir), info, refs, layout, lib, conversion)
    fc = families.read(info.raw_config, str(model_dir))
    conversion = family_layout.conversion(fc, shapes, layout, src_prefix)
    problems = incomplete_fusions(shapes, fc.fused)
    covered = _fusion_names(problems, fc.fused)
    problems += [p for p in family_tensors.problems(fc, {n: t.shape for n, t in conversion.tensors.items()})
                 if _unprefixed(p.split(":")[0]) not in covered]
    if problems:
        raise WeightMismatchError(
            f"{model_dir}: the weights do not match the {fc.title} model config.json describes ({len(problems)} "
            "problem(s)):", problems,
            f"Check that config.json and the weights come from the same model (weights read as: {layout.description}).")
    check_tied_head(info, fc.tie)
    return ModelPlan(Path(model_dir), info, refs, layout, lib, conversion, fc)


def _unprefixed(name: str) -> str:
    return name.split(".", 1)[1] if "." in name else name


def _fusion_names(problems: list[str], fused: tuple[str, ...]) -> set[str]:
    """Every runtime or source name (without its prefix) of the fused groups :func:`incomplete_fusions` reported: the
    family check would otherwise call their present parts unexpected and the fused tensor missing."""
    out = set()
    for p in problems:
        name = _unprefixed(p.split(":")[0])
        stem, part, leaf = name.rsplit(".", 2)
        for f in fused:
            if part in FUSED_SPLITS[f]:
                out |= {f"{stem}.{x}.{leaf}" for x in FUSED_SPLITS[f]} | {f"{stem}.{f}.{leaf}"}
    return out


def plan_adapter(lora_dir: Path, model: ModelPlan, *, allow_noop: bool = False,
                 info: ckpt.CheckpointInfo | None = None) -> AdapterPlan:
    info = info or ckpt.describe(lora_dir)
    settings = check_adapter_folder(info)
    base_note = check_base_matches_adapter(model.folder, Path(lora_dir), settings)
    arrays = read_tensors(list(info.adapter_tensors.values()))
    bad = nonfinite(arrays)
    if bad:
        raise WeightMismatchError(f"{lora_dir}: the adapter weights contain NaN/inf, so every score would be meaningless:",
                                  bad, "Re-export the adapter from a healthy training step.")
    magnitudes, whole = {}, {}
    if settings.peft is not None:  # peft's names and layout as Paddle's pairs, its scaling per module folded into B
        pt = peft_config.to_paddle_form(arrays, settings.peft, str(lora_dir))
        arrays, magnitudes = pt.pairs, pt.magnitudes
        settings = replace(settings, rank=pt.rank)
        whole = _whole_tensors(pt.whole, info, model, Path(lora_dir))
    splits = split_parts(model.conversion) if model.family is not None else None
    file_names = {}
    if model.family is not None:  # the family's module renames (Phi-3's gate_up_proj, Mixtral's mlp.experts...)
        file_names = {family_layout.runtime_name(model.family, k): k for k in arrays}
        arrays = {new: arrays[old] for new, old in file_names.items()}
        magnitudes = {family_layout.runtime_name(model.family, m + ".lora_A")[: -len(".lora_A")]: v
                      for m, v in magnitudes.items()}
    pairs, note, magnitudes = validate_adapter(
        arrays, model.runtime_shapes(), settings, str(lora_dir), allow_noop=allow_noop or bool(magnitudes or whole),
        aliases=model.prefix_aliases, splits=splits, file_names=file_names, magnitudes=magnitudes)
    pairs, magnitudes = _columns_in_runtime_order(pairs, magnitudes, model)
    sha = adapter_sha256(info)
    check_not_merged_already(model, Path(lora_dir), sha)
    return AdapterPlan(Path(lora_dir), info, settings, pairs, note, sha, base_note, allow_noop, magnitudes, whole)


def _whole_tensors(tensors: dict[str, np.ndarray], info: ckpt.CheckpointInfo, model: ModelPlan,
                   lora_dir: Path) -> dict[str, TensorRef]:
    """peft's whole tensors (modules_to_save, trained biases) on the base's stored tensors they replace: the same name
    (or the base's prefix for peft's first component) and the same shape, or refused naming both."""
    from paddle_scorer.checkpoint.peft_config import PREFIX

    out, problems = {}, []
    base_prefix = ckpt.key_prefix(model.refs)
    for name, arr in sorted(tensors.items()):
        candidates = [name] + ([f"{base_prefix}.{name.split('.', 1)[1]}"] if "." in name and base_prefix else [])
        target = next((c for c in candidates if c in model.refs), None)
        if target is None:
            tied = " (the base ties its head to the embedding, so there is no head to replace)" \
                if name.endswith("lm_head.weight") else ""
            problems.append(f"{name}: the adapter stores it whole (modules_to_save, or a trained bias), but "
                            f"the base has no such tensor{tied}")
            continue
        if tuple(arr.shape) != tuple(model.refs[target].shape):
            problems.append(f"{name}: {tuple(arr.shape)} in the adapter, {tuple(model.refs[target].shape)} in the base "
                            f"({target}; a base saved in another layout?)")
            continue
        out[target] = replace(info.adapter_tensors[PREFIX + name], name=target)
    if problems:
        raise WeightMismatchError(f"{lora_dir}: the adapter's whole tensors do not fit the base model:", problems,
                                  "Pass the base model this adapter was trained on, saved by transformers.")
    return out


def _columns_in_runtime_order(pairs: dict, magnitudes: dict, model: ModelPlan) -> tuple[dict, dict]:
    """A pair on a module stored fused as one tensor whose columns the runtime reorders (Phi-3's ``qkv_proj``, stored
    ``[q | k | v]``, run grouped per KV head): its B (and DoRA magnitude) gets the same column order, as the weight
    does (a pair trained on the stored module has the stored order)."""
    out, mags = {}, dict(magnitudes)
    for module, (a, b) in pairs.items():
        t = model.conversion.tensors.get(module + ".weight")
        if t is not None and t.perm is not None and len(t.parts) == 1 and b.shape[-1] == len(t.perm):
            b = np.ascontiguousarray(b[:, list(t.perm)])
            if module in mags:
                mags[module] = np.ascontiguousarray(mags[module][list(t.perm)])
        out[module] = (a, b)
    return out, mags


def check_not_merged_already(model: ModelPlan, lora_dir: Path, sha: str) -> None:
    """A model that ``paddle-scorer merge`` made with this very adapter (its record, or the record of a base it
    was merged from, holds the adapter's sha256) would get the adapter's update twice: refuse."""
    record, depth = model.info.merged_from, 0
    while isinstance(record, dict) and depth < 32:
        if record.get("adapter_sha256") == sha:
            base = record.get("base")
            again = f"--model {base} --lora {lora_dir}" if base else "the original base with --lora"
            raise CheckpointError(
                f"--model {model.folder} is already merged with the adapter {lora_dir} (its {MERGE_RECORD} records "
                f"adapter sha256 {sha[:12]}...), so adding it again would apply its update twice: pass --model "
                f"{model.folder} without --lora, or {again}."
            )
        record, depth = record.get("base_merged_from"), depth + 1


def make_plan(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    mode: str = "attach",
    tokenizer: str | Path | None = None,
    memory_limit: int | None = None,
    allow_noop_adapter: bool = False,
    execution: str = "auto",
    gpu: GpuInfo | None = None,
    library: str | None = None,
) -> LoadPlan:
    """Everything checked and decided; nothing loaded into paddle. ``execution``: auto | in-ram | streamed."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; use attach or merge.")
    model_dir, lora_dir = resolve_paths(model, lora)
    if gpu is None:
        from paddle_scorer.model.dtype_policy import probe_gpu

        gpu = GpuInfo(False, 0) if device == "cpu" else probe_gpu()
    plan_policy(device, dtype, "float32", None, gpu)  # impossible device/dtype: refuse before reading anything
    wants_gpu = device.strip().lower().startswith("gpu") or (
        device.strip().lower() == "auto" and gpu.compiled_with_cuda and gpu.device_count > 0)
    mp = plan_model(model_dir, library=library, device="gpu" if wants_gpu else "cpu")
    ap = plan_adapter(lora_dir, mp, allow_noop=allow_noop_adapter) if lora_dir is not None else None
    return assemble(mp, ap, device=device, dtype=dtype, mode=mode, tokenizer=tokenizer, memory_limit=memory_limit,
                    execution=execution, gpu=gpu)


def assemble(mp: ModelPlan, ap: AdapterPlan | None, *, device: str = "auto", dtype: str = "auto",
             mode: str = "attach", tokenizer: str | Path | None = None, memory_limit: int | None = None,
             execution: str = "auto", gpu: GpuInfo | None = None, check_device: bool = True) -> LoadPlan:
    """A load plan from already checked model and adapter plans: tokenizer folder, policy, memory.
    ``check_device=False``: keep a plan for a model that cannot run on this device (smoke checks the rest)."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; use attach or merge.")
    if ap is not None and ap.whole:  # peft's modules_to_save / trained biases read instead of the base's
        mp = replace(mp, refs={**mp.refs, **ap.whole})
    tok_dir = tokenizer_folder(mp.folder, ap.folder if ap else None, tokenizer)
    check_tokenizer_files(tok_dir)
    if mp.library.native and device.strip().lower() == "auto":
        device = "cpu"  # paddle-scorer's decoder runs on the CPU (a GPU, if any, is not used)
    policy = plan_policy(device, dtype, mp.stored_dtype, mp.info.config_dtype, gpu)
    if check_device:
        mp.library.check_device(mp.info, policy.device)
    size = memory_budget.dtype_bytes(policy.dtype)
    mem = memory_budget.plan_memory(mp.layer_bytes(size), mp.largest_outside(size), policy.device, memory_limit, execution,
                             memory_budget.Dims.from_config(mp.info.config))
    notes = []
    if ap is not None and ap.mapping_note:
        notes.append(ap.mapping_note)
    if mp.conversion.prefix_note or mp.layout.kind != "paddle":
        notes.append(f"model weights: {mp.layout.description}" + (f"; names {mp.conversion.prefix_note}"
                                                                   if mp.conversion.prefix_note else ""))
    if ap is not None and ap.base_note:
        notes.append(ap.base_note)
    if mp.family is not None:
        fc = mp.family
        why = libraries.decoder_reason(mp.info) if fc.family in families.LIBRARY_FIRST else None
        notes.append(f"{fc.title}: computed by paddle-scorer's CPU decoder as config.json declares ({why})" if why else
                     f"{fc.title}: computed by paddle-scorer's CPU decoder (no model library runs it on a CPU)")
        notes += list(fc.notes)
    return LoadPlan(mp, ap, mode, policy, tok_dir, mem, notes)
