"""One load plan: every path resolved, every check made and every decision taken before paddle sees
a tensor. Built once per command and consumed by in-RAM loading (:mod:`paddle_scorer.loader`),
layer-streamed scoring (:mod:`paddle_scorer.stream`), ``merge`` and ``smoke``. No paddle import.

The recipe (in the spirit of mlx-lm's ``load = load_model + load_adapters + load_tokenizer``, with our
validation in front):

1. :func:`resolve_paths` — ``--model`` may be omitted when the adapter names a local base;
2. :func:`ckpt.describe` both folders once — file discovery, per-tensor metadata (kept as
   :class:`~paddle_scorer.weights.TensorRef`, so nothing re-reads a header), traps and ambiguities;
3. :func:`check_model_folder` / :func:`check_adapter_folder` refuse what cannot be loaded honestly;
4. the runtime library and the layout conversion (:mod:`paddle_scorer.layout`,
   :mod:`paddle_scorer.libraries`): source tensors -> the runtime model's parameter names and shapes;
5. the adapter is read (it is small) and validated against those runtime shapes: every tensor lands
   on a module, shapes and rank fit, nothing is NaN/inf, it is not a no-op;
6. device and dtype policy (:mod:`paddle_scorer.dtype_policy`) and the one memory rule
   (:mod:`paddle_scorer.memory`): in RAM, streamed layer by layer, or refused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from paddle_scorer import checkpoint as ckpt
from paddle_scorer import libraries, memory
from paddle_scorer.dtype_policy import GpuInfo, Policy, normalise_dtype, resolve_device, resolve_policy
from paddle_scorer.errors import CheckpointError, UsageError, WeightMismatchError
from paddle_scorer.layout import Conversion, Layout, layer_index, resolve_layout, runtime_tensors
from paddle_scorer.lora import UNSUPPORTED_VARIANTS, LoraSettings, read_lora_config
from paddle_scorer.weights import TensorRef, read_tensors

MODES = ("attach", "merge")


# --------------------------------------------------------------------------------------------------
# Paths and folders
# --------------------------------------------------------------------------------------------------


def resolve_paths(model: str | Path | None, lora: str | Path | None) -> tuple[Path, Path | None]:
    lora_path = Path(lora) if lora else None
    if lora_path is not None and not lora_path.is_dir():
        raise UsageError(f"--lora {lora} is not a folder; pass the adapter folder (with lora_config.json).")
    if model is None:
        if lora_path is None:
            raise UsageError("no model given; pass --model BASE_FOLDER (and --lora ADAPTER_FOLDER for a fine-tune).")
        if not (lora_path / "lora_config.json").is_file():
            raise UsageError(f"no --model given and {lora} has no lora_config.json naming its base; pass --model BASE_FOLDER.")
        settings = read_lora_config(lora_path)
        base = ckpt.resolve_base(lora_path, settings.base_model_name_or_path)
        if base is None:
            raise UsageError(
                f"the adapter's base model {settings.base_model_name_or_path!r} (from lora_config.json) is not on "
                "this machine; copy it here and pass --model /path/to/it."
            )
        return base, lora_path
    model_path = Path(model)
    if not model_path.exists():
        raise UsageError(f"--model {model} does not exist; pass the folder with config.json and the weights.")
    return model_path, lora_path


def check_model_folder(info: ckpt.CheckpointInfo) -> None:
    """Refuse a folder that cannot be loaded as a model, with the one sentence ``inspect`` also shows."""
    if info.model_ambiguity:
        raise CheckpointError(f"{info.path}: {info.model_ambiguity}")
    if info.kind == ckpt.RENAMED_ADAPTER:
        raise CheckpointError(
            f"{info.path}: {Path(info.weights.files[0]).name} is a renamed LoRA adapter (all its keys end in "
            "lora_A/lora_B), not model weights; rename it back to lora_model_state.pdparams, pass that folder "
            "as --lora and the real base model as --model."
        )
    if info.kind == ckpt.LORA_ADAPTER:
        base = info.adapter.base_model_name_or_path if info.adapter else None
        raise UsageError(
            f"{info.path} is a LoRA adapter, not a model; pass it as --lora and its base model"
            + (f" ({base})" if base else "") + " as --model."
        )
    if info.kind == ckpt.NOT_A_CHECKPOINT:
        raise CheckpointError(f"{info.path}: {info.summary}")
    if ckpt.is_tensor_parallel(info.weights):
        raise CheckpointError(
            f"{info.path} holds tensor-parallel shards (model_state.tpNN.pdparams); merge them into one "
            "checkpoint with PaddleNLP before scoring."
        )
    if not (info.config_path_exists):
        raise CheckpointError(f"{info.path} has weights but no config.json; copy config.json from the training output.")
    if info.config_problem:
        raise CheckpointError(f"{info.path}/config.json: {info.config_problem}")
    if not info.architecture and not info.model_type:
        raise CheckpointError(f"{info.path}/config.json names no architecture or model_type; it cannot be built.")
    libraries.check_buildable(info)


def check_adapter_folder(info: ckpt.CheckpointInfo) -> LoraSettings:
    folder = Path(info.path)
    if info.adapter_ambiguity:
        raise CheckpointError(f"{info.path}: {info.adapter_ambiguity}")
    if not (folder / "lora_config.json").is_file():
        if info.kind == ckpt.RENAMED_ADAPTER:
            raise CheckpointError(
                f"{info.path}: the adapter file was renamed to {Path(info.weights.files[0]).name} and "
                "lora_config.json is missing; rename it back to lora_model_state.pdparams and restore lora_config.json."
            )
        raise CheckpointError(
            f"{info.path} has no lora_config.json, so the adapter's rank, alpha and targets are unknown; "
            "copy lora_config.json from the training output."
        )
    settings = read_lora_config(folder)
    if info.adapter_weights is None:
        if info.kind == ckpt.RENAMED_ADAPTER:
            raise CheckpointError(
                f"{info.path}: the adapter weights were renamed to {Path(info.weights.files[0]).name}; rename "
                "the file back to lora_model_state.pdparams."
            )
        if info.kind in (ckpt.FULL_MODEL, ckpt.MERGED_MODEL):
            raise UsageError(
                f"{info.path} is a model, not a LoRA adapter (it has model weights and no adapter weights); "
                "pass it as --model, or pass the adapter folder as --lora."
            )
        raise CheckpointError(
            f"{info.path} has lora_config.json but no adapter weights (lora_model_state.pdparams or "
            "peft_model*.safetensors); PaddleNLP would silently create an empty adapter here: copy the "
            "weights file from the training output."
        )
    if settings.variants:
        names = ", ".join(settings.variants)
        raise CheckpointError(
            f"{info.path} is a {names} adapter ({'; '.join(UNSUPPORTED_VARIANTS.get(v, v) for v in settings.variants)}), "
            "which paddle-scorer does not support: merge it with the tool that trained it and pass the merged model as --model."
        )
    if ckpt.is_tensor_parallel(info.adapter_weights):
        raise CheckpointError(
            f"{info.path} holds tensor-parallel adapter shards (lora_model_state.tpNN.pdparams); save the adapter "
            "with merge_tensor_parallel=True (LoRAModel.save_pretrained) before scoring."
        )
    return settings


def check_base_matches_adapter(model_dir: Path, lora_dir: Path, settings: LoraSettings) -> str | None:
    """The adapter names its base (``base_model_name_or_path``). If that name is a local model of a *different
    architecture* than ``--model``, refuse with both names (the pair cannot be what the user meant). A
    different folder of the same architecture (an fp16 copy, a moved base) is allowed and noted."""
    ref = settings.base_model_name_or_path
    if not ref:
        return None
    named = ckpt.resolve_base(lora_dir, ref)
    if named is None:
        return f"the adapter names its base {ref!r}, which is not a folder here; --model {model_dir} was used as given"
    try:
        same = named.resolve() == model_dir.resolve() or named.samefile(model_dir)
    except OSError:
        same = False
    if same:
        return None
    diff = ckpt.architecture_difference(named, model_dir)
    if diff:
        raise CheckpointError(
            f"the adapter {lora_dir} was trained on {ref!r} (lora_config.json), which is {named} here, but --model "
            f"{model_dir} is a different model ({diff}); pass --model {named}, or fix base_model_name_or_path in "
            "lora_config.json."
        )
    return (f"the adapter names its base {ref!r} ({named}); --model {model_dir} is another folder with the same "
            "architecture and was used")


def tokenizer_folder(model_dir: Path, lora_dir: Path | None, explicit: str | Path | None) -> Path:
    candidates = [Path(explicit)] if explicit else [model_dir] + ([lora_dir] if lora_dir else [])
    for c in candidates:
        if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file():
            return c
    where = " or ".join(str(c) for c in candidates)
    raise CheckpointError(f"no tokenizer files (tokenizer_config.json) in {where}; pass --tokenizer FOLDER.")


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer's files parse (the same sentence the loader gives when the library fails on them)."""
    problem = ckpt.tokenizer_problem(folder)
    if problem:
        raise CheckpointError(f"the tokenizer in {folder} could not be loaded ({problem}); fix or re-copy it, or "
                              "pass --tokenizer FOLDER.")


def dominant_dtype(dtypes: dict[str, int]) -> str:
    return max(dtypes.items(), key=lambda kv: kv[1])[0] if dtypes else "float32"


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def adapter_sha256(info: ckpt.CheckpointInfo) -> str:
    files = [Path(f) for f in info.adapter_weights.files] + [Path(info.path) / "lora_config.json"]
    return sha256_files(files)


def model_fingerprint(info: ckpt.CheckpointInfo) -> str:
    """A cheap identity of a model's weights (config + per-tensor names/shapes/dtypes + file sizes and
    mtimes): enough for ``--resume`` to notice a different model without hashing gigabytes."""
    h = hashlib.sha256()
    cfg = Path(info.path) / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(info.weights.files):
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------------


def plan_policy(device: str, dtype: str, stored: str, config_dtype: str | None, gpu: GpuInfo | None = None) -> Policy:
    """Decide device and dtype; refuses impossible requests before any weights are read."""
    dtype = normalise_dtype(dtype)
    if gpu is None:
        from paddle_scorer.dtype_policy import probe_gpu

        gpu = GpuInfo(False, 0) if device == "cpu" else probe_gpu()
    from paddle_scorer.sharding import worker_from_env

    selected = worker_from_env().selected_gpu
    return resolve_policy(resolve_device(device, gpu, selected), dtype, stored, gpu, config_dtype)


# --------------------------------------------------------------------------------------------------
# Adapter validation
# --------------------------------------------------------------------------------------------------


_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}  # all-ones exponent: inf or NaN


def count_nonfinite(arr: np.ndarray) -> int:
    """NaN/inf values in a floating array. Half types are checked on their bits (numpy's float16
    ``isfinite`` is ~4x slower than the integer test; measured on 100M values); float32/64 with one
    vectorised ``isfinite(...).all()`` and counted only when something is wrong."""
    from paddle_scorer.weights import dtype_name

    name = dtype_name(arr.dtype)
    if name in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[name]
        bits = arr.view(np.uint16)
        bad = (bits & mask) == mask
        return int(np.count_nonzero(bad)) if bad.any() else 0
    if np.issubdtype(arr.dtype, np.floating):
        if np.isfinite(arr).all():
            return 0
        return int(np.count_nonzero(~np.isfinite(arr)))
    return 0


def nonfinite(tensors: dict[str, np.ndarray]) -> list[str]:
    bad = []
    for name, arr in tensors.items():
        n = count_nonfinite(arr)
        if n:
            bad.append(f"{name}: {n} NaN/inf value(s)")
    return bad


def map_adapter_keys(adapter_keys: list[str], base_modules: set[str],
                     aliases: tuple[str, ...] = ()) -> tuple[dict[str, str], str | None]:
    """Map adapter tensor names onto the runtime model's module names.

    PaddleNLP adapters use the model's own prefix (``llama.layers.0...``); PaddleFormers uses
    ``model.layers.0...``; PEFT-style exports may add ``base_model.model.``. We try the names as
    they are, then with the leading component(s) replaced by the base's prefix. ``aliases`` are the
    other prefixes *the same architecture* has in another library (a PaddleNLP Llama adapter's
    ``llama.`` on a PaddleFormers Llama, whose body is ``model.``). One transform must fit every
    key; nothing is skipped silently.
    """
    base_prefix = ckpt.key_prefix(base_modules)

    def module_of(k: str) -> str:
        return k.rsplit(".", 1)[0]

    transforms: list[tuple[str | None, Any]] = [(None, lambda m: m)]
    src_prefix = ckpt.key_prefix(adapter_keys)
    # Only the generic wrappers are rewritten; another architecture's prefix (qwen2 vs llama) is a
    # real mismatch and must not be mapped away.
    for wrapper in ("base_model.model.model", "base_model.model", "model.model", "model"):
        if all(k.startswith(wrapper + ".") for k in adapter_keys):
            transforms.append((f"`{wrapper}.` -> `{base_prefix}.`",
                               lambda m, w=wrapper: f"{base_prefix}." + m[len(w) + 1:]))
            transforms.append((f"`{wrapper}.` stripped", lambda m, w=wrapper: m[len(w) + 1:]))
    for alias in aliases:
        if alias != base_prefix and all(k.startswith(alias + ".") for k in adapter_keys):
            transforms.append((f"`{alias}.` -> `{base_prefix}.`", lambda m, a=alias: f"{base_prefix}." + m[len(a) + 1:]))
    if src_prefix != base_prefix:
        transforms.append((f"`{base_prefix}.` added", lambda m: f"{base_prefix}.{m}"))
    for label, fn in transforms:
        mapped = {k: fn(module_of(k)) + "." + k.rsplit(".", 1)[1] for k in adapter_keys}
        if all(module_of(v) in base_modules for v in mapped.values()):
            if label is not None:
                label = f"adapter keys mapped onto the base's names: {label}"
            return mapped, label
    return {k: k for k in adapter_keys}, None


def validate_adapter(
    adapter: dict[str, np.ndarray], base_shapes: dict[str, tuple[int, ...]], settings: LoraSettings, where: str,
    *, allow_noop: bool = False, aliases: tuple[str, ...] = (),
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str | None]:
    """Check every adapter tensor against the runtime model's shapes; return ``{module: (A, B)}`` or raise
    listing every problem. A no-op adapter (every B zero, or scaling 0) is refused unless ``allow_noop``."""
    problems: list[str] = []
    non_lora = [k for k in adapter if not (k.endswith(".lora_A") or k.endswith(".lora_B"))]
    for k in non_lora:
        problems.append(f"{k}: not a lora_A/lora_B tensor (trainable modules or biases are not supported)")
    keys = [k for k in adapter if k not in non_lora]
    if not keys:
        raise WeightMismatchError(f"{where}: the adapter file holds no lora_A/lora_B tensors:", problems or ["(empty)"],
                                  "Check that this is the adapter saved by LoRAModel.save_pretrained.")
    base_modules = {k[: -len(".weight")] for k in base_shapes if k.endswith(".weight")}
    mapping, mapping_note = map_adapter_keys(keys, base_modules, aliases)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for k in keys:
        target = mapping[k]
        module, part = target.rsplit(".", 1)
        if module not in base_modules:
            problems.append(f"{k}: no module `{module}` in the base model (adapter for another architecture or prefix?)")
            continue
        pairs.setdefault(module, {})[part] = adapter[k]
    result = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            problems.append(f"{module}: {missing} is missing")
            continue
        a, b = parts["lora_A"], parts["lora_B"]
        w = base_shapes[module + ".weight"]
        if len(w) != 2:
            problems.append(f"{module}: base weight has shape {tuple(w)}, not a Linear")
            continue
        want_a, want_b = (w[0], settings.r), (settings.r, w[1])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{module}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base weight "
                f"{tuple(w)} with r={settings.r} (expected A{want_a} B{want_b})"
            )
            continue
        result[module] = (a, b)
    targets = [re.compile(t) for t in settings.target_modules]
    if targets:
        expected = {m for m in base_modules if any(t.fullmatch(m) for t in targets)}
        expected = {m for m in expected if len(base_shapes.get(m + ".weight", ())) == 2}  # only Linear weights
        for m in sorted(expected - set(pairs)):
            problems.append(f"{m}: matches target_modules but the adapter has no weights for it (would stay a zero adapter)")
    problems += nonfinite({f"{m}.lora_A": ab[0] for m, ab in result.items()}
                          | {f"{m}.lora_B": ab[1] for m, ab in result.items()})
    if problems:
        raise WeightMismatchError(
            f"{where}: the adapter does not fit the base model ({len(problems)} problem(s)):", problems,
            "Pass the base model this adapter was trained on (see `paddle-scorer inspect` on the adapter).",
        )
    if not allow_noop:
        check_not_noop(result, settings, where)
    return result, mapping_note


def check_not_noop(pairs: dict[str, tuple[np.ndarray, np.ndarray]], settings: LoraSettings, where: str) -> None:
    """An adapter that changes nothing is almost always a mistake (saved before the first step,
    ``lora_alpha: 0``): it would score the bare base model under the adapter's name."""
    if settings.scaling == 0:
        raise CheckpointError(
            f"{where}: lora_alpha is 0, so the adapter's scaling is 0 and it changes nothing (scores would be the bare "
            "base model's); fix lora_alpha in lora_config.json, or pass --allow-noop-adapter to score it anyway."
        )
    if all(not np.any(b.astype(np.float32) != 0) for _, b in pairs.values()):
        raise CheckpointError(
            f"{where}: every lora_B matrix is all zeros, so the adapter changes nothing (it was probably saved before "
            "the first training step); use a later checkpoint, or pass --allow-noop-adapter to score it anyway."
        )


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    folder: Path
    info: ckpt.CheckpointInfo
    refs: dict[str, TensorRef]  # source tensor name -> where its bytes are
    layout: Layout
    library: libraries.LibrarySpec
    conversion: Conversion  # runtime parameter name -> recipe from the source tensors

    @property
    def num_params(self) -> int:
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

    def read(self, names: list[str], where: str | None = None) -> dict[str, np.ndarray]:
        """The runtime arrays ``names`` (converted to the runtime layout, stored dtype), NaN/inf refused."""
        recipes = [self.conversion.tensors[n] for n in names]
        sources = [self.refs[s] for r in recipes for s in r.sources]
        arrays = read_tensors(sources)
        bad = nonfinite(arrays)
        if bad:
            raise WeightMismatchError(
                f"{where or self.folder}: the model weights contain NaN/inf, so every score would be meaningless:", bad,
                "Re-export the checkpoint from a healthy training step.",
            )
        out = {}
        for r in recipes:
            out[r.name] = r.build({s: arrays.pop(s) for s in r.sources})
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

    @property
    def scaling(self) -> float:
        return self.settings.scaling

    def pairs_in_layer(self, layer: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {m: ab for m, ab in self.pairs.items() if layer_index(m + ".") == layer}


@dataclass
class LoadPlan:
    model: ModelPlan
    adapter: AdapterPlan | None
    mode: str  # attach | merge
    policy: Policy
    tokenizer_dir: Path
    memory: memory.MemoryPlan
    notes: list[str] = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.model.folder

    @property
    def lora_dir(self) -> Path | None:
        return self.adapter.folder if self.adapter else None

    @property
    def streamed(self) -> bool:
        return self.memory.execution == memory.STREAMED


def plan_model(model_dir: Path, info: ckpt.CheckpointInfo | None = None, *, library: str | None = None) -> ModelPlan:
    """Describe and check a model folder, pick the runtime library and the layout conversion."""
    info = info or ckpt.describe(model_dir)
    check_model_folder(info)
    refs = info.tensors
    shapes = {n: r.shape for n, r in refs.items()}
    src_prefix = ckpt.key_prefix(shapes)
    layout = resolve_layout(info.raw_config, shapes, info.weights.metadata, info.merged_from, str(model_dir),
                            src_prefix, libraries.paddle_layout_prefixes())
    lib = libraries.choose(info, layout, requested=library)
    arch = lib.arch_for(info)
    conversion = runtime_tensors(shapes, layout, src_prefix, arch.prefix, arch.fused,
                                 lm_head_out_in=arch.lm_head_out_in, config=info.raw_config)
    return ModelPlan(Path(model_dir), info, refs, layout, lib, conversion)


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
    pairs, note = validate_adapter(arrays, model.runtime_shapes(), settings, str(lora_dir), allow_noop=allow_noop,
                                   aliases=model.prefix_aliases)
    return AdapterPlan(Path(lora_dir), info, settings, pairs, note, adapter_sha256(info), base_note, allow_noop)


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
        from paddle_scorer.dtype_policy import probe_gpu

        gpu = GpuInfo(False, 0) if device == "cpu" else probe_gpu()
    plan_policy(device, dtype, "float32", None, gpu)  # impossible device/dtype: refuse before reading anything
    mp = plan_model(model_dir, library=library)
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
    tok_dir = tokenizer_folder(mp.folder, ap.folder if ap else None, tokenizer)
    check_tokenizer_files(tok_dir)
    policy = plan_policy(device, dtype, mp.stored_dtype, mp.info.config_dtype, gpu)
    if check_device:
        libraries.check_device(mp.library, mp.info, policy.device)
    size = memory.dtype_bytes(policy.dtype)
    mem = memory.plan_memory(mp.layer_bytes(size), mp.largest_outside(size), policy.device, memory_limit, execution)
    notes = []
    if ap is not None and ap.mapping_note:
        notes.append(ap.mapping_note)
    if mp.conversion.prefix_note or mp.layout.kind != "paddle":
        notes.append(f"model weights: {mp.layout.description}" + (f"; names {mp.conversion.prefix_note}"
                                                                   if mp.conversion.prefix_note else ""))
    if ap is not None and ap.base_note:
        notes.append(ap.base_note)
    return LoadPlan(mp, ap, mode, policy, tok_dir, mem, notes)


# --------------------------------------------------------------------------------------------------
# What `inspect` adds to describe(): the loader's verdict, layout, library, memory (no paddle)
# --------------------------------------------------------------------------------------------------

INSPECT_TOKENS = 64  # the prompt length inspect assumes when it says how many records a streamed block holds


@dataclass
class Assessment:
    """The loader's verdict on a folder, as ``inspect`` reports it: the same sentence and exit code."""

    usable: bool
    role: str | None  # "model" | "adapter" | None
    refusal: str | None = None
    exit_code: int = 0
    layout: dict | None = None
    library: str | None = None
    library_installed: bool | None = None
    memory: dict | None = None  # execution on this machine, budget, records per streamed block
    gpu_only: str | None = None  # why the model cannot run on CPU (ERNIE 4.5 MoE), if it cannot

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def assess(info: ckpt.CheckpointInfo, memory_limit: int | None = None) -> Assessment:
    """Run the loader's checks for the folder's role, without loading anything."""
    from paddle_scorer.errors import NotACheckpointError, ScorerError

    if info.kind == ckpt.NOT_A_CHECKPOINT:
        return Assessment(False, None, info.summary, NotACheckpointError.exit_code)
    if info.kind == ckpt.LORA_ADAPTER or (info.kind == ckpt.RENAMED_ADAPTER and info.adapter_weights is not None
                                           and (Path(info.path) / "lora_config.json").is_file()):
        lib = libraries.likely(info)  # from the adapter's config.json (model_type)
        lib_name, lib_installed = (lib.name, lib.installed) if lib else (None, None)
        try:
            check_adapter_folder(info)
        except ScorerError as exc:
            return Assessment(False, "adapter", str(exc), exc.exit_code, library=lib_name,
                              library_installed=lib_installed)
        return Assessment(True, "adapter", None, 0, library=lib_name, library_installed=lib_installed)
    try:
        mp = plan_model(Path(info.path), info)
    except ScorerError as exc:
        a = Assessment(False, "model", str(exc), exc.exit_code)
        lib = libraries.likely(info)
        if lib is not None:
            a.library, a.library_installed = lib.name, lib.installed
        return a
    if info.tokenizer_files:
        try:
            check_tokenizer_files(Path(info.path))
        except ScorerError as exc:
            return Assessment(False, "model", str(exc), exc.exit_code, layout=mp.layout.to_dict(),
                              library=mp.library.name, library_installed=True)
    a = Assessment(True, "model", layout=mp.layout.to_dict(), library=mp.library.name, library_installed=True)
    arch = mp.library.arch_for(info)
    if arch.gpu_only:
        a.gpu_only = f"{arch.architecture} cannot run on CPU: {arch.gpu_only}; classify, generate and smoke refuse it " \
                     "there before loading (run them with --device gpu)"
    try:
        mem = memory.plan_memory(mp.layer_bytes(4), mp.largest_outside(4), "cpu", memory_limit)
    except ScorerError as exc:
        a.memory = {"execution": None, "reason": str(exc)}
        return a
    a.memory = {"execution": mem.execution, "need": mem.in_ram_need, "budget": mem.budget,
                "budget_source": mem.budget_source}
    if mem.execution == memory.STREAMED:
        from paddle_scorer.stream import record_bytes

        cfg = info.config
        per = record_bytes(INSPECT_TOKENS, int(cfg.get("hidden_size") or 1), int(cfg.get("num_attention_heads") or 1))
        a.memory["records_per_block"] = max(1, mem.state_budget // per)
        a.memory["assumed_tokens"] = INSPECT_TOKENS
    return a
