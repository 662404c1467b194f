"""Is this folder what the command needs? Paths resolved and folders checked before anything is read into
memory: the model folder, the adapter folder (and that it fits the base it names), the tokenizer folder.
Each refusal is the one sentence ``inspect`` shows too. No paddle import.
"""

from __future__ import annotations

from pathlib import Path

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.model import libraries
from paddle_scorer.checkpoint import sidecars
from paddle_scorer.errors import CheckpointError, UsageError
from paddle_scorer.checkpoint.lora import UNSUPPORTED_VARIANTS, LoraSettings, config_file, read_lora_config


def resolve_paths(model: str | Path | None, lora: str | Path | None) -> tuple[Path, Path | None]:
    lora_path = Path(lora) if lora else None
    if lora_path is not None and not lora_path.is_dir():
        raise UsageError(f"--lora {lora} is not a folder; pass the adapter folder (with lora_config.json, or peft's "
                         "adapter_config.json).")
    if model is None:
        if lora_path is None:
            raise UsageError("no model given; pass --model BASE_FOLDER (and --lora ADAPTER_FOLDER for a fine-tune).")
        cfg = config_file(lora_path)
        if cfg is None:
            raise UsageError(f"no --model given and {lora} has no lora_config.json naming its base; pass --model BASE_FOLDER.")
        settings = read_lora_config(lora_path)
        base = ckpt.resolve_base(lora_path, settings.base_model_name_or_path)
        if base is None:
            raise UsageError(
                f"the adapter's base model {settings.base_model_name_or_path!r} (from {cfg.name}) is not on "
                "this machine; copy it here and pass --model /path/to/it."
            )
        return base, lora_path
    model_path = Path(model)
    if not model_path.exists():
        raise UsageError(f"--model {model} does not exist; pass the folder with config.json and the weights.")
    return model_path, lora_path


WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_INTEGER_BUFFERS = ("position_ids",)  # index buffers some exporters save next to the weights (never scored)
_MXFP4 = ("_blocks", "_scales")  # GPT-OSS's MXFP4 experts: dequantized exactly on load (model/family_layout.py)


def check_tensor_dtypes(refs: dict, folder, what: str) -> None:
    """Every weight is a float16/bfloat16/float32/float64 tensor: a quantised (int8, float8), boolean or complex
    tensor is refused by name and dtype before anything is built (the library would fail on it deep inside)."""
    bad = [(n, r.meta.dtype) for n, r in refs.items() if r.meta.dtype not in WEIGHT_DTYPES
           and not (n.endswith(_INTEGER_BUFFERS) and r.meta.dtype in ("int64", "int32"))
           and not (n.endswith(_MXFP4) and ".experts." in n and r.meta.dtype == "uint8")]
    if bad:
        name, dtype = bad[0]
        more = f" (and {len(bad) - 1} more non-float tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{folder}: the {what} tensor {name} is {dtype}{more}, and paddle-scorer scores float16, bfloat16, "
            "float32 or float64 weights only; export the checkpoint unquantised (e.g. save_pretrained with "
            "dtype float16 or bfloat16)."
        )


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
    check_tensor_dtypes(info.tensors, info.path, "model")
    libraries.check_buildable(info)


def check_adapter_folder(info: ckpt.CheckpointInfo) -> LoraSettings:
    folder = Path(info.path)
    if info.adapter_ambiguity:
        raise CheckpointError(f"{info.path}: {info.adapter_ambiguity}")
    if config_file(folder) is None:
        if any((folder / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
            raise CheckpointError(
                f"{info.path} has peft's adapter weights but no adapter_config.json, so the adapter's ranks, "
                "alphas and targets are unknown; copy adapter_config.json from the training output."
            )
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
    if info.adapter_weights is None and settings.peft is not None:
        raise CheckpointError(
            f"{info.path} has adapter_config.json but no adapter_model.safetensors (or .bin); copy the weights file "
            "from the training output."
        )
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
    check_tensor_dtypes(info.adapter_tensors, info.path, "adapter")
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
    diff = sidecars.architecture_difference(named, model_dir)
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
    problem = sidecars.tokenizer_problem(folder)
    if problem:
        raise CheckpointError(f"the tokenizer in {folder} could not be loaded ({problem}); fix or re-copy it, or "
                              "pass --tokenizer FOLDER.")
