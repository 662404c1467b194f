"""What is in a checkpoint folder: pure file reading, no paddle import, no pickle code executed.

``describe(path)`` returns a :class:`CheckpointInfo` with every fact ``inspect`` prints; the loader
and ``merge`` use the same file discovery (:func:`model_weight_files`, :func:`adapter_weight_files`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paddle_scorer.errors import NotACheckpointError
from paddle_scorer.checkpoint.lora import LoraSettings, config_file, is_lora_key, read_lora_config
from paddle_scorer.checkpoint.sidecars import _ARCH_FIELDS, MERGE_RECORD, config_problem, read_json, read_scorer_defaults
from paddle_scorer.checkpoint.weights import TensorMeta, TensorRef, index_files, shard_files

# Kinds of folder
FULL_MODEL = "model"
MERGED_MODEL = "merged-model"
LORA_ADAPTER = "lora-adapter"
RENAMED_ADAPTER = "renamed-lora-adapter"
NOT_A_CHECKPOINT = "not-a-checkpoint"


_MODEL_SINGLE = ["model_state.pdparams", "model.safetensors"]
_MODEL_INDEX = ["model_state.pdparams.index.json", "model.safetensors.index.json"]
# peft's adapter_model.safetensors / .bin (a torch zip, read by the restricted walker) beside PaddleNLP's and
# PaddleFormers' names
_ADAPTER_SINGLE = ["lora_model_state.pdparams", "peft_model.safetensors", "lora_model.safetensors",
                   "adapter_model.safetensors", "adapter_model.bin"]
_ADAPTER_INDEX = ["peft_model.safetensors.index.json", "lora_model_state.pdparams.index.json"]
_TP_MODEL = re.compile(r"model_state\.tp\d+(\.pp\d+)?\.pdparams$")
_TP_ADAPTER = re.compile(r"lora_model_state[._]tp\d+(\.pp\d+)?\.pdparams$")
_TOKENIZER_FILES = [
    "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "sentencepiece.bpe.model", "spiece.model", "special_tokens_map.json",
    "added_tokens.json",
]
_FOREIGN = {
    "pytorch_model.bin": "a PyTorch (Hugging Face) checkpoint",
}


@dataclass
class WeightSet:
    """The weight files of one role (model or adapter) and what they hold."""

    files: list[str]
    format: str  # pdparams | safetensors
    sharded: bool
    index: str | None
    num_tensors: int = 0
    num_params: int = 0
    nbytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> number of parameters
    metadata: dict | None = None  # safetensors header metadata (e.g. {"format": "np"}), first file


@dataclass
class AdapterInfo:
    r: int
    lora_alpha: float | None
    scaling: float | None
    scaling_formula: str
    rslora: bool
    target_modules: list[str]
    config_dtype: str | None
    base_model_name_or_path: str | None
    base_found: str | None  # resolved local folder, if any
    unsupported_variants: list[str]
    adapted_modules: int
    key_prefix: str | None
    saved_by: str | None = None  # "PaddleFormers 1.2.0", "PaddleNLP 3.0.0b4", ... (see adapter_saved_by)
    saved_by_evidence: str | None = None
    format: str = "paddle"  # paddle (lora_config.json, Paddle's [in, r] / [r, out]) | peft (adapter_config.json)
    ranks: dict[str, int] = field(default_factory=dict)  # peft: "r=4, alpha=8" -> number of modules with it
    dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    whole_tensors: list[str] = field(default_factory=list)  # peft: modules_to_save / trained biases stored whole


def adapter_saved_by(lora_config: dict, model_config: dict) -> tuple[str | None, str | None]:
    """Which library saved an adapter, and why we think so. PaddleNLP and PaddleFormers save LoRA matrices as Paddle
    holds them (A ``[in, r]``, B ``[r, out]``); only the names differ (``model.`` vs the architecture's prefix). peft
    writes adapter_config.json with its peft_type and version."""
    if lora_config.get("peft_type") is not None:
        v = lora_config.get("peft_version")
        return (f"peft {v}" if isinstance(v, str) else "peft"), "adapter_config.json (peft_type " \
            f"{lora_config.get('peft_type')})"
    for key, lib in (("paddleformers_version", "PaddleFormers"), ("paddlenlp_version", "PaddleNLP")):
        v = model_config.get(key)
        if isinstance(v, str):
            return f"{lib} {v}", f"its config.json has {key} {v}"
    if "tensor_model_parallel_size" in lora_config:
        return "PaddleFormers", "lora_config.json has tensor_model_parallel_size (PaddleNLP writes tensor_parallel_degree)"
    if "tensor_parallel_degree" in lora_config:
        return "PaddleNLP", "lora_config.json has tensor_parallel_degree (PaddleFormers writes tensor_model_parallel_size)"
    return None, None


@dataclass
class CheckpointInfo:
    path: str
    kind: str
    summary: str
    architecture: str | None = None
    model_type: str | None = None
    config: dict = field(default_factory=dict)  # the architecture facts from config.json
    config_dtype: str | None = None
    weights: WeightSet | None = None
    adapter_weights: WeightSet | None = None
    adapter: AdapterInfo | None = None
    memory: dict[str, int] = field(default_factory=dict)  # bytes to hold the weights per dtype
    tokenizer_files: list[str] = field(default_factory=list)
    tokenizer_class: str | None = None
    chat_template: bool = False
    merged_from: dict | None = None
    scorer_defaults: dict | None = None
    warnings: list[str] = field(default_factory=list)
    next_command: str | None = None
    # Refusals the loader would raise for this folder in each role (inspect reports them too).
    model_ambiguity: str | None = None
    adapter_ambiguity: str | None = None
    config_path_exists: bool = False
    config_problem: str | None = None
    raw_config: dict = field(default_factory=dict, repr=False)
    # Per-tensor metadata (where each tensor's bytes are), read once and handed to the load plan.
    tensors: dict[str, TensorRef] = field(default_factory=dict, repr=False)
    adapter_tensors: dict[str, TensorRef] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        keep = {k: v for k, v in self.__dict__.items() if k not in ("tensors", "adapter_tensors", "raw_config")}
        return asdict(CheckpointInfo(**keep))


# --------------------------------------------------------------------------------------------------
# File discovery (shared with the loader and merge)
# --------------------------------------------------------------------------------------------------


def _candidates(folder: Path, singles: list[str], indexes: list[str], tp: re.Pattern) -> list[WeightSet]:
    """Every weight set of one role in ``folder`` (an index and the shards it names are one set)."""
    found: list[WeightSet] = []
    in_index: set[str] = set()
    for name in indexes:
        idx = folder / name
        if idx.is_file():
            files = shard_files(idx)
            fmt = "safetensors" if name.endswith(".safetensors.index.json") else "pdparams"
            found.append(WeightSet([str(f) for f in files], fmt, True, str(idx)))
            in_index.update(f.name for f in files)
    for name in singles:
        f = folder / name
        if f.is_file() and name not in in_index:
            fmt = "safetensors" if name.endswith(".safetensors") else "pdparams"
            found.append(WeightSet([str(f)], fmt, False, None))
    tp_files = sorted(p for p in folder.iterdir() if tp.search(p.name)) if folder.is_dir() else []
    if tp_files:
        found.append(WeightSet([str(f) for f in tp_files], "pdparams", True, None))
    return found


def _st_metadata(ws: WeightSet) -> dict | None:
    if ws.format != "safetensors":
        return None
    try:
        with open(ws.files[0], "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < 100_000_000 else {}
    except (OSError, ValueError):
        return None  # the index already read this header; a broken one was refused there
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _same_bytes(a: Path, others: list[Path]) -> bool:
    if len(others) != 1 or a.stat().st_size != others[0].stat().st_size:
        return False
    with open(a, "rb") as fa, open(others[0], "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _label(ws: WeightSet) -> str:
    return Path(ws.index).name if ws.index else Path(ws.files[0]).name if len(ws.files) == 1 else \
        f"{Path(ws.files[0]).name} ... ({len(ws.files)} files)"


def _ambiguity(found: list[WeightSet], what: str) -> str | None:
    if len(found) < 2:
        return None
    names = [_label(ws) for ws in found]
    return (f"the folder holds {len(found)} sets of {what} weights ({' and '.join(names)}); which one is meant is "
            "ambiguous (PaddleNLP's from_pretrained and paddle-scorer could each pick another): move the stale one "
            "out of the folder.")


def _find(folder: Path, singles: list[str], indexes: list[str], tp: re.Pattern) -> WeightSet | None:
    found = _candidates(Path(folder), singles, indexes, tp)
    return found[0] if found else None


def model_weight_files(folder: Path) -> WeightSet | None:
    return _find(Path(folder), _MODEL_SINGLE, _MODEL_INDEX, _TP_MODEL)


def adapter_weight_files(folder: Path) -> WeightSet | None:
    return _find(Path(folder), _ADAPTER_SINGLE, _ADAPTER_INDEX, _TP_ADAPTER)


def is_tensor_parallel(ws: WeightSet) -> bool:
    return ws.index is None and ws.sharded


def _summarise(ws: WeightSet, metas: dict[str, TensorMeta]) -> None:
    ws.num_tensors = len(metas)
    ws.num_params = sum(m.numel for m in metas.values())
    ws.nbytes = sum(m.nbytes for m in metas.values())
    counts: Counter[str] = Counter()
    for m in metas.values():
        counts[m.dtype] += m.numel
    ws.dtypes = dict(counts.most_common())


def resolve_base(adapter_dir: Path, ref: str | None) -> Path | None:
    """Find the base model an adapter names: as given, relative to the adapter, or next to it."""
    if not ref:
        return None
    ref_path = Path(ref).expanduser()
    candidates = [ref_path] if ref_path.is_absolute() else [
        Path(adapter_dir) / ref_path,
        Path.cwd() / ref_path,
        Path(adapter_dir).parent / ref_path.name,
    ]
    for c in candidates:
        if (c / "config.json").is_file() and model_weight_files(c) is not None:
            return c.resolve()
    return None


def key_prefix(names) -> str | None:
    """The leading module name of the keys (``llama``, ``qwen2``, ``model``, ...)."""
    prefixes = Counter(n.split(".", 1)[0] for n in names if "." in n)
    return prefixes.most_common(1)[0][0] if prefixes else None


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# describe()
# --------------------------------------------------------------------------------------------------


def describe(path: str | Path) -> CheckpointInfo:
    """All we can tell about a folder without loading it into paddle."""
    folder = Path(path)
    if not folder.exists():
        raise NotACheckpointError(f"{path} does not exist; pass the folder that holds config.json and the weights.")
    if folder.is_file():
        raise NotACheckpointError(
            f"{path} is a file; pass the folder that contains it (checkpoints are folders with config.json)."
        )
    info = CheckpointInfo(path=str(path), kind=NOT_A_CHECKPOINT, summary="")
    _read_config(info, folder)
    _read_side_files(info, folder)
    found = _read_weights(info, folder)
    _classify(info, folder, found)
    _sizes_and_warnings(info, found.settings)
    info.next_command = _next_command(info)
    return info


@dataclass
class _Found:
    """The weight sets of a folder and what they say about its kind."""

    model: WeightSet | None
    adapter: WeightSet | None
    lora_in_model: list[str]
    settings: LoraSettings | None

    @property
    def renamed(self) -> bool:
        """The model weights hold only LoRA tensors: a renamed adapter file."""
        return self.model is not None and bool(self.lora_in_model) and len(self.lora_in_model) == self.model.num_tensors


def _read_config(info: CheckpointInfo, folder: Path) -> None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    info.config_path_exists = True
    cfg = read_json(config_path)
    info.raw_config = cfg
    archs = cfg.get("architectures") or []
    info.architecture = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    info.model_type = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None
    info.config = {k: cfg[k] for k in _ARCH_FIELDS if k in cfg}
    dt = cfg.get("dtype") or cfg.get("torch_dtype")
    info.config_dtype = dt if isinstance(dt, str) else None
    info.config_problem = config_problem(cfg)


def _read_side_files(info: CheckpointInfo, folder: Path) -> None:
    """Tokenizer files and chat template, scorer.json, the merge record."""
    info.tokenizer_files = [n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    tok_cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_cfg = read_json(folder / "tokenizer_config.json")
        info.tokenizer_class = tok_cfg.get("tokenizer_class") if isinstance(tok_cfg.get("tokenizer_class"), str) else None
    info.chat_template = bool(tok_cfg.get("chat_template")) or any(
        (folder / n).is_file() for n in ("chat_template.json", "chat_template.jinja")
    )
    info.scorer_defaults = read_scorer_defaults(folder)
    if (folder / MERGE_RECORD).is_file():
        info.merged_from = read_json(folder / MERGE_RECORD)


def _read_weights(info: CheckpointInfo, folder: Path) -> _Found:
    """Index both roles' weight files (no tensor bytes read), note ambiguities, describe the adapter."""
    model_found = _candidates(folder, _MODEL_SINGLE, _MODEL_INDEX, _TP_MODEL)
    adapter_found = _candidates(folder, _ADAPTER_SINGLE, _ADAPTER_INDEX, _TP_ADAPTER)
    info.model_ambiguity = _ambiguity(model_found, "model")
    info.adapter_ambiguity = _ambiguity(adapter_found, "adapter")
    model_ws = model_found[0] if model_found else None
    adapter_ws = adapter_found[0] if adapter_found else None
    model_metas: dict[str, TensorMeta] = {}
    if model_ws is not None:
        info.tensors = index_files([Path(f) for f in model_ws.files])
        model_metas = {n: r.meta for n, r in info.tensors.items()}
        _summarise(model_ws, model_metas)
        model_ws.metadata = _st_metadata(model_ws)
        info.weights = model_ws
    adapter_metas: dict[str, TensorMeta] = {}
    if adapter_ws is not None:
        info.adapter_tensors = index_files([Path(f) for f in adapter_ws.files])
        adapter_metas = {n: r.meta for n, r in info.adapter_tensors.items()}
        _summarise(adapter_ws, adapter_metas)
        adapter_ws.metadata = _st_metadata(adapter_ws)
        info.adapter_weights = adapter_ws
    settings = read_lora_config(folder) if config_file(folder) is not None else None
    found = _Found(model_ws, adapter_ws, [n for n in model_metas if is_lora_key(n)], settings)
    if found.renamed and adapter_ws is not None:
        same = _same_bytes(Path(model_ws.files[0]), [Path(f) for f in adapter_ws.files])
        info.adapter_ambiguity = (
            f"the folder holds both {_label(adapter_ws)} and {Path(model_ws.files[0]).name}, which also holds only LoRA "
            "tensors (a leftover of renaming the adapter)"
            + ("; they are identical copies: delete " if same else "; they DIFFER, so which adapter is meant is "
               "ambiguous: keep the right one and delete ")
            + f"{Path(model_ws.files[0]).name}."
        )
    if settings is not None or adapter_ws is not None or found.renamed:
        metas = adapter_metas or {n: model_metas[n] for n in found.lora_in_model}
        info.adapter = _adapter_info(folder, settings, metas)
        info.adapter.saved_by, info.adapter.saved_by_evidence = adapter_saved_by(
            settings.raw if settings is not None else {}, info.raw_config)
    return found


def _classify(info: CheckpointInfo, folder: Path, found: _Found) -> None:
    """The folder's kind and the one-paragraph summary ``inspect`` prints."""
    model_ws, adapter_ws, settings = found.model, found.adapter, found.settings
    if found.renamed and adapter_ws is not None:
        info.kind = LORA_ADAPTER
        info.weights = None  # the stale file holds adapter tensors, not model weights
        info.summary = "This is a LoRA adapter folder with a stale second copy of the adapter: " + info.adapter_ambiguity
    elif found.renamed:
        info.kind = RENAMED_ADAPTER
        name = Path(model_ws.files[0]).name
        info.summary = (
            f"TRAP: {name} holds only LoRA adapter tensors ({len(found.lora_in_model)} keys ending in "
            "lora_A/lora_B), not model weights: it is a renamed lora_model_state.pdparams. Loading it "
            "as a model would score with randomly initialised weights."
        )
        info.adapter_weights = info.weights
        info.adapter_tensors = info.tensors
    elif model_ws is not None:
        info.kind = MERGED_MODEL if info.merged_from else FULL_MODEL
        what = "a merged model (base + LoRA)" if info.merged_from else "a full model"
        fmt = f"{model_ws.format}, {'sharded into ' + str(len(model_ws.files)) + ' files' if model_ws.sharded else 'one file'}"
        info.summary = f"This is {what} ({info.architecture or 'unknown architecture'}; {fmt})."
        if found.lora_in_model:
            info.warnings.append(
                f"{len(found.lora_in_model)} tensors in the model weights are LoRA matrices (lora_A/lora_B): "
                "the adapter was saved inside the model instead of merged; merge it or save it separately."
            )
        if adapter_ws is not None:
            info.summary += " It also holds a LoRA adapter (see below)."
    elif adapter_ws is not None or settings is not None:
        info.kind = LORA_ADAPTER
        info.summary = _adapter_summary(info, adapter_ws, settings)
    else:
        info.summary = _not_a_checkpoint_summary(folder)


def _adapter_summary(info: CheckpointInfo, adapter_ws: WeightSet | None, settings: LoraSettings | None) -> str:
    if adapter_ws is None:
        if settings is not None and settings.peft is not None:
            return ("This is a peft adapter folder (adapter_config.json) but its weights file "
                    "(adapter_model.safetensors or adapter_model.bin) is missing: copy it from the training output.")
        return ("This is a LoRA adapter folder (lora_config.json) but its weights file "
                "(lora_model_state.pdparams or peft_model*.safetensors) is missing: copy it from the training output.")
    ref = settings.base_model_name_or_path if settings else None
    base = info.adapter.base_found if info.adapter else None
    return (
        f"This is a {'peft ' if settings is not None and settings.peft is not None else ''}LoRA adapter, not a model: "
        f"it has adapter weights ({_label(adapter_ws)}) "
        "but no model weights (no model_state.pdparams), so it must be loaded on top of its base model "
        f"({ref or 'not recorded in ' + (config_file(Path(info.path)) or Path('lora_config.json')).name}"
        + (f", found at {_rel(Path(base))}" if base else ", not found on this machine")
        + ")."
    )


def _not_a_checkpoint_summary(folder: Path) -> str:
    foreign = [desc for name, desc in _FOREIGN.items() if (folder / name).is_file()]
    if foreign:
        return (f"This looks like {foreign[0]}, not a PaddleNLP checkpoint; convert it to PaddleNLP "
                "format (model_state.pdparams or model.safetensors with Paddle key names) first.")
    if (folder / "config.json").is_file():
        return ("This folder has config.json but no weights (model_state.pdparams, model.safetensors "
                "or a shard index); copy the weights next to it.")
    return "This is not a checkpoint: no config.json, no model weights and no LoRA adapter files."


def _sizes_and_warnings(info: CheckpointInfo, settings: LoraSettings | None) -> None:
    if info.weights is not None and info.kind != RENAMED_ADAPTER:
        n = info.weights.num_params
        info.memory = {"float32": 4 * n, "float16": 2 * n, "bfloat16": 2 * n}
        if is_tensor_parallel(info.weights):
            info.warnings.append(
                "The weights are tensor-parallel shards (model_state.tpNN.pdparams); merge them into one "
                "checkpoint with PaddleNLP (e.g. its unified-checkpoint export) before scoring."
            )
    if info.adapter is not None and info.adapter.unsupported_variants:
        info.warnings.append(
            "This adapter uses " + ", ".join(info.adapter.unsupported_variants)
            + ", which paddle-scorer does not merge or attach; it will refuse to load it rather than "
            "compute wrong outputs."
        )
    if settings is not None:
        info.warnings += settings.notes
    if info.kind in (FULL_MODEL, MERGED_MODEL) and not info.tokenizer_files:
        info.warnings.append("No tokenizer files here: pass a folder that has them with --tokenizer.")


def _adapter_info(folder: Path, settings: LoraSettings | None, metas: dict[str, TensorMeta]) -> AdapterInfo:
    if settings is not None and settings.peft is not None:
        return _peft_info(folder, settings, metas)
    lora_a = {n: m for n, m in metas.items() if n.endswith(".lora_A")}
    ranks = {m.shape[-1] for m in lora_a.values() if len(m.shape) == 2}
    if settings is None:
        r = ranks.pop() if len(ranks) == 1 else 0
        return AdapterInfo(
            r=r, lora_alpha=None, scaling=None, scaling_formula="unknown (no lora_config.json)",
            rslora=False, target_modules=[], config_dtype=None, base_model_name_or_path=None, base_found=None,
            unsupported_variants=[], adapted_modules=len(lora_a), key_prefix=key_prefix(metas),
        )
    base = resolve_base(folder, settings.base_model_name_or_path)
    info = AdapterInfo(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        scaling=settings.scaling,
        scaling_formula=settings.scaling_formula,
        rslora=settings.rslora,
        target_modules=settings.target_modules,
        config_dtype=settings.dtype,
        base_model_name_or_path=settings.base_model_name_or_path,
        base_found=str(base) if base else None,
        unsupported_variants=[v for v in settings.variants],
        adapted_modules=len(lora_a),
        key_prefix=key_prefix(metas),
    )
    return info


def _peft_info(folder: Path, settings: LoraSettings, metas: dict[str, TensorMeta]) -> AdapterInfo:
    """A peft adapter as inspect shows it: rank and alpha per module (rank_pattern/alpha_pattern applied), DoRA,
    modules_to_save and the whole tensors stored, its targets."""
    from paddle_scorer.checkpoint.peft_config import PREFIX

    p = settings.peft
    modules = sorted(n[len(PREFIX):-len(".lora_A.weight")] for n in metas
                     if n.startswith(PREFIX) and n.endswith(".lora_A.weight"))
    counts: Counter[str] = Counter()
    for m in modules:
        r, alpha = p.rank_alpha(m)
        counts[f"r={r}, lora_alpha={alpha:g}, scaling={p.scaling(m):g}"] += 1
    whole = sorted(n[len(PREFIX):] for n in metas if n.startswith(PREFIX) and ".lora_" not in n)
    base = resolve_base(folder, settings.base_model_name_or_path)
    return AdapterInfo(
        r=p.r, lora_alpha=p.lora_alpha, scaling=p.lora_alpha / (p.r ** 0.5 if p.use_rslora else p.r),
        scaling_formula=settings.scaling_formula, rslora=p.use_rslora, target_modules=[p.describe_targets()],
        config_dtype=None, base_model_name_or_path=settings.base_model_name_or_path,
        base_found=str(base) if base else None, unsupported_variants=[], adapted_modules=len(modules),
        key_prefix=key_prefix(metas), format="peft", ranks=dict(counts.most_common()), dora=p.use_dora,
        modules_to_save=list(p.modules_to_save), whole_tensors=whole)


def _labels_hint(defaults: dict | None) -> str:
    if defaults and defaults.get("labels"):
        return ",".join(defaults["labels"])
    return "LABEL1,LABEL2"


def _next_command(info: CheckpointInfo) -> str | None:
    q = shlex.quote
    here = q(info.path)
    if info.model_ambiguity and info.kind in (FULL_MODEL, MERGED_MODEL):
        return None
    if info.kind == LORA_ADAPTER:
        if info.adapter_weights is None or info.adapter_ambiguity:
            return None
        if info.adapter and info.adapter.unsupported_variants:
            return None
        labels = _labels_hint(info.scorer_defaults)
        if info.adapter and info.adapter.base_found:
            base = q(_rel(Path(info.adapter.base_found)))
        else:
            base = "/path/to/" + q(Path(info.adapter.base_model_name_or_path or "base-model").name)
        return (
            f"paddle-scorer classify --model {base} --lora {here} --labels {labels} "
            f"--prompt \"your query\""
        )
    if info.kind == RENAMED_ADAPTER:
        return (
            f"mv {q(info.path + '/' + Path(info.weights.files[0]).name)} {q(info.path + '/lora_model_state.pdparams')}"
            f"  # then: paddle-scorer classify --model /path/to/base --lora {here} ..."
        )
    if info.kind in (FULL_MODEL, MERGED_MODEL):
        if info.weights is not None and is_tensor_parallel(info.weights):
            return None
        labels = _labels_hint(info.scorer_defaults)
        return f"paddle-scorer classify --model {here} --labels {labels} --prompt \"your query\""
    return None
