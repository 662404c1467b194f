"""Load a base model (+ LoRA adapter, attached or merged) strictly, with an explicit dtype policy.

The recipe, each step a small function:

1. resolve paths: ``--model`` may be omitted when the adapter's ``lora_config.json`` names a base
   that exists locally;
2. describe both folders (shared with ``inspect``) and refuse traps before reading any tensor;
3. decide device and compute dtype (:mod:`paddle_scorer.dtype_policy`), check memory;
4. read the weights with the safe reader, cast to the compute dtype, refuse NaN/inf;
5. validate the adapter against the base (every tensor lands on a module, shapes, rank, prefix
   mapping ``model.`` <-> ``llama.``), merge in float32 if asked;
6. build the model from its config and set *every* parameter from the checkpoint (nothing is left
   randomly initialised), attach the adapter with PaddleNLP's ``LoRAModel`` if asked;
7. load the tokenizer from files.

Stricter than PaddleNLP's ``from_pretrained``, which random-initialises missing weights, creates a
zero adapter when the adapter file is missing and skips prefix-mismatched adapter keys.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from paddle_scorer import checkpoint as ckpt
from paddle_scorer.dtype_policy import GpuInfo, Policy, normalise_dtype, probe_gpu, resolve_device, resolve_policy
from paddle_scorer.errors import CheckpointError, UsageError, WeightMismatchError
from paddle_scorer.lora import LoraSettings, lora_delta, read_lora_config
from paddle_scorer.weights import BFLOAT16, dtype_name, iter_tensors, read_files, read_files_meta

MODES = ("attach", "merge")


@dataclass
class LoadFacts:
    """What was loaded and how: goes into every output's provenance."""

    model_path: str
    adapter_path: str | None
    adapter_sha256: str | None
    mode: str | None
    scaling: float | None
    lora_r: int | None
    lora_alpha: float | None
    rslora: bool | None
    adapter_key_mapping: str | None
    architecture: str | None
    num_params: int
    stored_dtypes: dict[str, int]
    adapter_stored_dtypes: dict[str, int] | None
    policy: dict
    tokenizer_path: str
    chat_template: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    facts: LoadFacts
    config: Any = None

    @property
    def device(self) -> str:
        return self.facts.policy["device"]

    @property
    def dtype(self) -> str:
        return self.facts.policy["dtype"]


# --------------------------------------------------------------------------------------------------
# 1-2. Paths and folder checks (no paddle)
# --------------------------------------------------------------------------------------------------


def resolve_paths(model: str | Path | None, lora: str | Path | None) -> tuple[Path, Path | None]:
    lora_path = Path(lora) if lora else None
    if lora_path is not None:
        if not lora_path.is_dir():
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
    return Path(model), lora_path


def check_model_folder(info: ckpt.CheckpointInfo) -> None:
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
    if not info.architecture and not info.model_type:
        raise CheckpointError(f"{info.path}/config.json names no architecture or model_type; it cannot be built.")


def check_adapter_folder(info: ckpt.CheckpointInfo) -> LoraSettings:
    folder = Path(info.path)
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
        raise CheckpointError(
            f"{info.path} has lora_config.json but no adapter weights (lora_model_state.pdparams or "
            "peft_model*.safetensors); PaddleNLP would silently create an empty adapter here: copy the "
            "weights file from the training output."
        )
    if settings.variants:
        names = ", ".join(settings.variants)
        raise CheckpointError(
            f"{info.path} is a {names} adapter ({'; '.join(ckpt_variant_desc(v) for v in settings.variants)}), "
            "which paddle-scorer does not support: merge it with the tool that trained it and pass the merged model as --model."
        )
    if ckpt.is_tensor_parallel(info.adapter_weights):
        raise CheckpointError(
            f"{info.path} holds tensor-parallel adapter shards (lora_model_state.tpNN.pdparams); save the adapter "
            "with merge_tensor_parallel=True (LoRAModel.save_pretrained) before scoring."
        )
    return settings


def ckpt_variant_desc(name: str) -> str:
    from paddle_scorer.lora import UNSUPPORTED_VARIANTS

    return UNSUPPORTED_VARIANTS.get(name, name)


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


# --------------------------------------------------------------------------------------------------
# 3. Memory
# --------------------------------------------------------------------------------------------------


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(num_params: int, dtype: str, device: str, limit: int | None = None) -> None:
    if device != "cpu":
        return  # GPU memory is checked by paddle; `smoke --gpu-memory` projects it before the job
    need = num_params * (4 if dtype == "float32" else 2)
    have = available_memory() if limit is None else limit
    if need * 1.1 > have:
        gb = 1024**3
        raise CheckpointError(
            f"loading this model on CPU needs about {need / gb:.1f} GB as {dtype} (CPU cannot use float16) but only "
            f"{have / gb:.1f} GB of RAM is available; use a GPU (float16 needs {num_params * 2 / gb:.1f} GB) or run "
            "`paddle-scorer smoke` for a partial pipeline check."
        )


# --------------------------------------------------------------------------------------------------
# 4. Reading and casting weights
# --------------------------------------------------------------------------------------------------


def to_dtype(arr: np.ndarray, dtype: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != BFLOAT16:
        return arr
    target = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    return arr if arr.dtype == target else arr.astype(target)


def nonfinite(tensors: dict[str, np.ndarray]) -> list[str]:
    bad = []
    for name, arr in tensors.items():
        if arr.dtype == BFLOAT16 or np.issubdtype(arr.dtype, np.floating):
            a = arr.astype(np.float32) if arr.dtype == BFLOAT16 else arr
            n = int(np.count_nonzero(~np.isfinite(a)))
            if n:
                bad.append(f"{name}: {n} NaN/inf value(s)")
    return bad


def read_weights(ws: ckpt.WeightSet, what: str, where: str, keep=None) -> dict[str, np.ndarray]:
    """All tensors, or (``keep``: a name predicate) only those, from only the shards that hold them."""
    if keep is None:
        tensors = read_files([Path(f) for f in ws.files])
    else:
        tensors = {n: a for n, a in iter_tensors(_shards_holding(ws, keep)) if keep(n)}
    bad = nonfinite(tensors)
    if bad:
        raise WeightMismatchError(
            f"{where}: the {what} weights contain NaN/inf, so every score would be meaningless:", bad,
            "Re-export the checkpoint from a healthy training step.",
        )
    return tensors


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def first_layers(layers: int):
    """Name predicate for a partial load: everything except decoder layers ``>= layers``."""

    def keep(name: str) -> bool:
        m = _LAYER_KEY.search(name)
        return m is None or int(m.group(1)) < layers

    return keep


def _shards_holding(ws: ckpt.WeightSet, keep) -> list[Path]:
    if ws.index is None:
        return [Path(f) for f in ws.files]
    weight_map = ckpt.read_json(Path(ws.index)).get("weight_map", {})
    wanted = {name for key, name in weight_map.items() if keep(key)}
    return [Path(f) for f in ws.files if Path(f).name in wanted]


# --------------------------------------------------------------------------------------------------
# 5. Adapter validation, key mapping and merge
# --------------------------------------------------------------------------------------------------


def map_adapter_keys(adapter_keys: list[str], base_modules: set[str]) -> tuple[dict[str, str], str | None]:
    """Map adapter tensor names onto base module names.

    PaddleNLP adapters use the model's own prefix (``llama.layers.0...``); PaddleFormers uses
    ``model.layers.0...``; PEFT-style exports may add ``base_model.model.``. We try the names as
    they are, then with the leading component(s) replaced by the base's prefix. One transform must
    fit every key; nothing is skipped silently.
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
    adapter: dict[str, np.ndarray], base_shapes: dict[str, tuple[int, ...]], settings: LoraSettings, where: str
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str | None]:
    """Check every adapter tensor against the base; return ``{module: (A, B)}`` or raise listing all problems."""
    problems: list[str] = []
    non_lora = [k for k in adapter if not (k.endswith(".lora_A") or k.endswith(".lora_B"))]
    for k in non_lora:
        problems.append(f"{k}: not a lora_A/lora_B tensor (trainable modules or biases are not supported)")
    keys = [k for k in adapter if k not in non_lora]
    if not keys:
        raise WeightMismatchError(f"{where}: the adapter file holds no lora_A/lora_B tensors:", problems or ["(empty)"],
                                  "Check that this is the adapter saved by LoRAModel.save_pretrained.")
    base_modules = {k[: -len(".weight")] for k in base_shapes if k.endswith(".weight")}
    mapping, mapping_note = map_adapter_keys(keys, base_modules)
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
        # Only Linear weights get adapters
        expected = {m for m in expected if len(base_shapes.get(m + ".weight", ())) == 2}
        for m in sorted(expected - set(pairs)):
            problems.append(f"{m}: matches target_modules but the adapter has no weights for it (would stay a zero adapter)")
    bad = nonfinite({f"{m}.lora_A": ab[0] for m, ab in result.items()} | {f"{m}.lora_B": ab[1] for m, ab in result.items()})
    problems += bad
    if problems:
        raise WeightMismatchError(
            f"{where}: the adapter does not fit the base model ({len(problems)} problem(s)):", problems,
            "Pass the base model this adapter was trained on (see `paddle-scorer inspect` on the adapter).",
        )
    return result, mapping_note


def merge_lora(base: dict[str, np.ndarray], pairs: dict[str, tuple[np.ndarray, np.ndarray]], scaling: float,
               where: str, out_dtype: str | None = None) -> None:
    """``W += A @ B * scaling`` in float32, cast back to ``out_dtype`` (default: W's dtype). In place."""
    bad = []
    for module, (a, b) in pairs.items():
        key = module + ".weight"
        w = base[key]
        merged = w.astype(np.float32) + lora_delta(a, b, scaling)
        if not np.isfinite(merged).all():
            bad.append(f"{key}: merged weight has NaN/inf")
            continue
        base[key] = to_dtype(merged, out_dtype or dtype_name(w.dtype))
        if not np.isfinite(base[key].astype(np.float32)).all():
            bad.append(f"{key}: merged weight overflows {out_dtype or dtype_name(w.dtype)}")
    if bad:
        raise WeightMismatchError(f"{where}: merging the adapter produced non-finite weights:", bad,
                                  "The adapter is unusable with this base; check its training run.")


# --------------------------------------------------------------------------------------------------
# 6. Building the model
# --------------------------------------------------------------------------------------------------


def build_model(model_dir: Path, state: dict[str, np.ndarray], dtype: str, num_layers: int | None = None):
    """Build from config and set every parameter from ``state``; refuse missing/unexpected/mis-shaped."""
    _paddle()
    from paddlenlp.transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    config.dtype = dtype
    if num_layers is not None:
        config.num_hidden_layers = num_layers  # partial load: only the first decoder layers
    # Built normally (Qwen2's weight init fails under paddle.LazyGuard); every parameter is then
    # overwritten from the checkpoint, and any that would keep its random init is refused below.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in params.items()}
    mapping = _map_base_keys(list(state), set(expected))
    problems = []
    provided = set()
    for src, dst in mapping.items():
        if dst not in expected:
            problems.append(f"{src}: unexpected tensor (the model has no such parameter)")
            continue
        if tuple(state[src].shape) != expected[dst]:
            problems.append(f"{dst}: checkpoint shape {tuple(state[src].shape)} != model shape {expected[dst]}")
            continue
        provided.add(dst)
    for k in sorted(set(expected) - provided - {mapping.get(s) for s in mapping}):
        problems.append(f"{k}: missing from the checkpoint (PaddleNLP would initialise it randomly)")
    if problems:
        raise WeightMismatchError(
            f"{model_dir}: the weights do not match {type(model).__name__} built from config.json "
            f"({len(problems)} problem(s)):", problems,
            "Check that config.json and the weights come from the same model.",
        )
    for src, dst in mapping.items():
        arr = state.pop(src)
        params[dst].set_value(_to_paddle_array(arr, dtype))
    model.eval()
    return model, config


def _to_paddle_array(arr: np.ndarray, dtype: str) -> np.ndarray:
    """numpy value for ``param.set_value``: paddle takes bfloat16 as uint16 bits."""
    arr = to_dtype(arr, dtype)
    return arr.view(np.uint16) if arr.dtype == BFLOAT16 else arr


def _map_base_keys(src: list[str], expected: set[str]) -> dict[str, str]:
    if set(src) <= expected or not src:
        return {k: k for k in src}
    prefix = ckpt.key_prefix(expected)
    for fn in (lambda k: f"{prefix}.{k}", lambda k: k.split(".", 1)[-1], lambda k: f"{prefix}." + k.split(".", 1)[-1]):
        mapped = {k: (k if k in expected else fn(k)) for k in src}
        if set(mapped.values()) <= expected:
            return mapped
    return {k: k for k in src}


def attach_lora(model, pairs: dict[str, tuple[np.ndarray, np.ndarray]], settings: LoraSettings, dtype: str, where: str):
    """Wrap ``model`` with PaddleNLP's LoRAModel and set every lora_A/lora_B explicitly."""
    from paddlenlp.peft import LoRAConfig, LoRAModel

    config = LoRAConfig(
        r=settings.r, lora_alpha=settings.lora_alpha, rslora=settings.rslora,
        target_modules=[re.escape(m) for m in sorted(pairs)], dtype=dtype, lora_dropout=0.0,
        merge_weights=False,
    )
    lora_model = LoRAModel(model, config)
    params = lora_model.model.state_dict()
    created = {k.rsplit(".", 1)[0] for k in params if k.endswith(".lora_A")}
    problems = [f"{m}: LoRAModel created no LoRA layer here" for m in sorted(set(pairs) - created)]
    problems += [f"{m}: LoRA layer created without adapter weights" for m in sorted(created - set(pairs))]
    if problems:
        raise WeightMismatchError(f"{where}: attaching the adapter failed:", problems)
    for module, (a, b) in pairs.items():
        params[module + ".lora_A"].set_value(_to_paddle_array(a, dtype))
        params[module + ".lora_B"].set_value(_to_paddle_array(b, dtype))
    lora_model.eval()
    lora_model.model.eval()
    return lora_model


# --------------------------------------------------------------------------------------------------
# 7. Tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_folder(model_dir: Path, lora_dir: Path | None, explicit: str | Path | None) -> Path:
    candidates = [Path(explicit)] if explicit else [model_dir] + ([lora_dir] if lora_dir else [])
    for c in candidates:
        if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file():
            return c
    where = " or ".join(str(c) for c in candidates)
    raise CheckpointError(f"no tokenizer files (tokenizer_config.json) in {where}; pass --tokenizer FOLDER.")


def load_tokenizer(folder: Path, vocab_size: int | None):
    from paddlenlp.transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # PaddleNLP raises many types here
        raise CheckpointError(f"the tokenizer in {folder} could not be loaded ({type(exc).__name__}: {exc}).") from exc
    if vocab_size is not None and len(tok) > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {folder} has {len(tok)} tokens but the model's vocab_size is {vocab_size}; "
            "they do not belong together: pass the matching --tokenizer."
        )
    return tok


# --------------------------------------------------------------------------------------------------
# load()
# --------------------------------------------------------------------------------------------------


def _paddle():
    from paddle_scorer.runtime import paddle

    return paddle()


def plan_policy(device: str, dtype: str, stored: str, config_dtype: str | None, gpu: GpuInfo | None = None) -> Policy:
    """Decide device and dtype; refuses impossible requests before any weights are read."""
    dtype = normalise_dtype(dtype)
    if gpu is None:
        gpu = GpuInfo(False, 0) if device == "cpu" else probe_gpu()
    from paddle_scorer.sharding import worker_from_env

    selected = worker_from_env().selected_gpu
    return resolve_policy(resolve_device(device, gpu, selected), dtype, stored, gpu, config_dtype)


def load(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    mode: str = "attach",
    tokenizer: str | Path | None = None,
    memory_limit: int | None = None,
    layers: int | None = None,
) -> Loaded:
    """Load a model (and adapter) for scoring. See the module docstring for the steps.

    ``layers``: build the model with only its first N decoder layers (plus embeddings, final norm and
    LM head) and read only those tensors: a pipeline check for models that do not fit in RAM
    (``paddle-scorer smoke``), never a quality check. The adapter is validated in full, attached for
    those layers only.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; use attach or merge.")
    model_dir, lora_dir = resolve_paths(model, lora)
    gpu = GpuInfo(False, 0) if device == "cpu" else probe_gpu()
    plan_policy(device, dtype, "float32", None, gpu)  # impossible device/dtype: refuse before reading anything
    info = ckpt.describe(model_dir)
    check_model_folder(info)
    lora_info = settings = None
    if lora_dir is not None:
        lora_info = ckpt.describe(lora_dir)
        settings = check_adapter_folder(lora_info)
    tok_dir = tokenizer_folder(model_dir, lora_dir, tokenizer)

    stored = dominant_dtype(info.weights.dtypes)
    policy = plan_policy(device, dtype, stored, info.config_dtype, gpu)
    keep = metas = None
    num_params = info.weights.num_params
    if layers is not None:
        total = info.config.get("num_hidden_layers")
        if not isinstance(total, int) or not 1 <= layers <= total:
            raise UsageError(f"layers={layers} is not between 1 and the model's num_hidden_layers ({total}).")
        keep = first_layers(layers)
        metas = read_files_meta([Path(f) for f in info.weights.files])
        num_params = sum(m.numel for k, m in metas.items() if keep(k))
    check_memory(num_params, policy.dtype, policy.device, memory_limit)

    pd = _paddle()
    pd.set_device(policy.device)

    state = read_weights(info.weights, "model", str(model_dir), keep=keep)
    for k in list(state):
        state[k] = to_dtype(state[k], policy.dtype)
    notes = []
    sha = mapping_note = None
    if lora_dir is not None:
        adapter = read_weights(lora_info.adapter_weights, "adapter", str(lora_dir))
        if metas is None:
            base_shapes = {k: tuple(v.shape) for k, v in state.items()}
        else:
            base_shapes = {k: tuple(m.shape) for k, m in metas.items()}  # the whole adapter is validated
        pairs, mapping_note = validate_adapter(adapter, base_shapes, settings, str(lora_dir))
        if keep is not None:
            pairs = {m: ab for m, ab in pairs.items() if keep(m + ".weight")}
        if mapping_note:
            notes.append(mapping_note)
        sha = adapter_sha256(lora_info)
        if mode == "merge":
            merge_lora(state, pairs, settings.scaling, str(lora_dir), out_dtype=policy.dtype)
    if layers is not None:
        notes.append(f"partial load: embeddings, the first {layers} of {info.config['num_hidden_layers']} decoder "
                     "layers, final norm and LM head (a pipeline check, not a quality check)")
    net, config = build_model(model_dir, state, policy.dtype, num_layers=layers)
    if lora_dir is not None and mode == "attach":
        net = attach_lora(net, pairs, settings, policy.dtype, str(lora_dir))
    tok = load_tokenizer(tok_dir, getattr(config, "vocab_size", None))
    facts = LoadFacts(
        model_path=str(model_dir),
        adapter_path=str(lora_dir) if lora_dir else None,
        adapter_sha256=sha,
        mode=mode if lora_dir else None,
        scaling=settings.scaling if settings else None,
        lora_r=settings.r if settings else None,
        lora_alpha=settings.lora_alpha if settings else None,
        rslora=settings.rslora if settings else None,
        adapter_key_mapping=mapping_note,
        architecture=info.architecture,
        num_params=info.weights.num_params,
        stored_dtypes=info.weights.dtypes,
        adapter_stored_dtypes=lora_info.adapter_weights.dtypes if lora_info else None,
        policy=policy.to_dict(),
        tokenizer_path=str(tok_dir),
        chat_template=bool(getattr(tok, "chat_template", None)),
        notes=notes,
    )
    return Loaded(net, tok, facts, config)
