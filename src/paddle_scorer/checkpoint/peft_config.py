"""A LoRA adapter saved by Hugging Face ``peft`` (``adapter_config.json`` + ``adapter_model.safetensors``): its config
read as peft 0.22 reads it, and its tensors turned into the form every other adapter has here. No paddle import.

peft stores, per adapted ``nn.Linear`` (weight ``[out, in]``), ``base_model.model.<module>.lora_A.weight`` ``[r, in]``
and ``lora_B.weight`` ``[out, r]``; the update is ``scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``), where ``rank_pattern`` / ``alpha_pattern`` give a module its own r and alpha (keys are regexes,
matched as ``(.*\\.)?(KEY)$`` against the module's name, first key wins). A module is adapted when ``target_modules``
(a list: a name equal to the module's or a suffix after a dot; a string: a regex that fully matches) says so, within
``layers_to_transform`` (the first number after ``layers_pattern``, or after any name), and not by ``exclude_modules``.

Here a pair becomes Paddle's ``A [in, r]``, ``B [r, out]`` with its module's scaling folded into ``B`` and every pair
padded with zero rows/columns to the largest rank (exact: zeros add nothing), so one rank and a scaling of 1 describe
the whole adapter to the library's ``LoRAModel`` and to paddle-scorer's decoder alike. DoRA's magnitude vectors,
``modules_to_save`` tensors and trained biases are kept beside the pairs (the load plan applies them to the base).

Every field of peft's ``LoraConfig`` is read or known to change nothing at inference; a field that changes the forward
in a way not computed here (aLoRA, trainable tokens, layer replication, LoRA on parameters, ...) is refused naming it,
and so is any field this release of paddle-scorer does not know with a value other than its default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
import numpy as np

from paddle_scorer.errors import CheckpointError, WeightMismatchError

CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"

# Fields peft writes that change nothing in an inference forward (training, bookkeeping, how A was initialised).
INERT = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "lora_dropout",
    "megatron_config", "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying", "eva_config",
    "loftq_config", "lora_ga_config", "corda_config", "init_lora_weights", "base_model_name_or_path",
}
# Fields read here.
READ = {
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "modules_to_save", "use_dora",
    "target_parameters", "lora_bias",
}
# Fields that change the forward in ways not computed here: refused when set (what each is, for the sentence).
REFUSED = {
    "target_parameters": "LoRA on raw parameters (e.g. MoE expert tensors)",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter switches on after invocation tokens)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "astra_config": "ASTRA",
}
# init_lora_weights that rewrite the base weights when training starts (the adapter only fits the rewritten base).
BASE_REWRITING_INIT = ("pissa", "olora", "loftq", "corda", "lora_ga")


@dataclass(frozen=True)
class PeftSettings:
    """peft's LoraConfig as read from adapter_config.json."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | int | None
    layers_pattern: list[str] | None
    bias: str
    modules_to_save: list[str]
    use_dora: bool
    fan_in_fan_out: bool
    version: str | None
    notes: list[str] = field(default_factory=list, compare=False)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The rank and alpha peft gives ``module`` (its name without ``base_model.model.``)."""
        r_key = _pattern_key(self.rank_pattern, module)
        a_key = _pattern_key(self.alpha_pattern, module)
        return (self.rank_pattern[r_key] if r_key is not None else self.r,
                float(self.alpha_pattern[a_key]) if a_key is not None else self.lora_alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """Would peft adapt ``module`` (``tuners_utils.check_target_module_exists``)?"""
        if _matches(self.exclude_modules, module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        t = self.target_modules
        if t is None:
            return False
        if isinstance(t, str):
            if t == ALL_LINEAR:  # expanded by peft to every Linear but the output layer
                return not module.split(".")[-1] == "lm_head"
            return re.fullmatch(t, module) is not None
        if module in t:
            return True
        if not any(module.endswith("." + k) for k in t):
            return False
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            m = None
            for pattern in self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if m is not None:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers

    def describe_targets(self) -> str:
        t = self.target_modules
        out = (f"regex {t!r}" if isinstance(t, str) else ", ".join(t)) if t else "none"
        if self.layers_to_transform not in (None, []):
            out += f" in layers {self.layers_to_transform}"
        if self.exclude_modules:
            out += f", excluding {self.exclude_modules}"
        return out


def _pattern_key(patterns: dict, module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _matches(spec, module: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith("." + k) for k in spec)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v, what: str, problems: list[str]) -> list[str] | str | None:
    if v is None or isinstance(v, str):
        if isinstance(v, str) and v != ALL_LINEAR:
            try:
                re.compile(v)
            except re.error as exc:
                problems.append(f"`{what}` {v!r} is not a regular expression ({exc})")
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    problems.append(f"`{what}` must be a list of module names or a regex string, found {v!r}")
    return None


def parse_peft_config(data: dict, source: str) -> PeftSettings:
    """Typed, range-checked peft LoRA settings; other peft types, variants not computed here and unknown fields with a
    value are refused by name."""
    fix = "re-save the adapter with peft, or merge it with peft and pass the merged model as --model"
    kind = data.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{source}: this is a peft {kind or 'adapter with no peft_type'} adapter, and paddle-scorer takes peft's LORA "
            f"adapters (plain, rsLoRA, DoRA, rank/alpha patterns, modules_to_save) only; merge it into the base with "
            f"peft (merge_and_unload) and pass the merged model as --model.")
    problems = []
    for name, what in REFUSED.items():
        if data.get(name) not in (None, False, [], {}, ""):
            problems.append(f"`{name}` is set ({what}), which paddle-scorer does not compute")
    unknown = sorted(k for k in data if k not in INERT | READ | set(REFUSED)
                     and data[k] not in (None, False, [], {}, "", 0))
    for k in unknown:
        problems.append(f"`{k}` ({data[k]!r}) is a field this paddle-scorer does not know")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INIT):
        problems.append(f"`init_lora_weights` is {init!r}, which rewrote the base weights when training started (the "
                        "adapter only fits that rewritten base): convert it to a plain LoRA with peft "
                        "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    r = data.get("r")
    if not _is_int(r) or r <= 0:
        problems.append(f"`r` must be a positive integer, found {r!r}")
    alpha = data.get("lora_alpha", 8)
    if not _is_number(alpha):
        problems.append(f"`lora_alpha` must be a number, found {alpha!r}")
    for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if data.get(name) is not None and not isinstance(data.get(name), bool):
            problems.append(f"`{name}` must be true or false, found {data[name]!r}")
    ranks = data.get("rank_pattern") or {}
    alphas = data.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not all(_is_int(v) and v > 0 for v in ranks.values()):
        problems.append(f"`rank_pattern` must map module patterns to positive ranks, found {ranks!r}")
        ranks = {}
    if not isinstance(alphas, dict) or not all(_is_number(v) for v in alphas.values()):
        problems.append(f"`alpha_pattern` must map module patterns to numbers, found {alphas!r}")
        alphas = {}
    for key in list(ranks) + list(alphas):
        try:
            re.compile(key)
        except re.error as exc:
            problems.append(f"pattern {key!r} is not a regular expression ({exc})")
    targets = _names(data.get("target_modules"), "target_modules", problems)
    exclude = _names(data.get("exclude_modules"), "exclude_modules", problems)
    layers = data.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(_is_int(x) for x in layers))):
        problems.append(f"`layers_to_transform` must be a layer index or a list of them, found {layers!r}")
    pattern = data.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = [pattern] if pattern else None
    elif pattern is not None and not (isinstance(pattern, list) and all(isinstance(x, str) for x in pattern)):
        problems.append(f"`layers_pattern` must be a name or a list of names, found {pattern!r}")
        pattern = None
    bias = data.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        problems.append(f"`bias` must be none, all or lora_only, found {bias!r}")
    saved = data.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(x, str) for x in saved):
        problems.append(f"`modules_to_save` must be a list of module names, found {saved!r}")
        saved = []
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"`base_model_name_or_path` must be a string, found {base!r}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems) + f"; {fix}.")
    notes = []
    if data.get("fan_in_fan_out"):
        notes.append("adapter_config.json has fan_in_fan_out true, which peft turns off for nn.Linear modules (every "
                     "module of these families): read as false, as peft does")
    return PeftSettings(
        r=r, lora_alpha=float(alpha), use_rslora=bool(data.get("use_rslora")), rank_pattern=dict(ranks),
        alpha_pattern={k: float(v) for k, v in alphas.items()}, target_modules=targets, exclude_modules=exclude,
        layers_to_transform=layers, layers_pattern=pattern, bias=bias, modules_to_save=list(saved),
        use_dora=bool(data.get("use_dora")), fan_in_fan_out=bool(data.get("fan_in_fan_out")),
        version=data.get("peft_version") if isinstance(data.get("peft_version"), str) else None, notes=notes)


# --------------------------------------------------------------------------------------------------
# The tensors: peft's names and layout -> Paddle's pairs (scaling folded, one rank), plus what else it saved
# --------------------------------------------------------------------------------------------------

_A, _B, _MAG = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
_REFUSED_TENSORS = {
    ".lora_embedding_A": "LoRA on an embedding", ".lora_embedding_B": "LoRA on an embedding",
    ".lora_B.bias": "a bias on lora_B (lora_bias)", ".trainable_tokens_delta": "trainable tokens",
}


@dataclass
class PeftTensors:
    """A peft adapter's tensors in the form the load plan takes (names without ``base_model.model.``)."""

    pairs: dict[str, np.ndarray]  # "<module>.lora_A" [in, rank], "<module>.lora_B" [rank, out] (scaling folded)
    rank: int  # the padded rank every pair has
    magnitudes: dict[str, np.ndarray]  # DoRA: module -> [out]
    whole: dict[str, np.ndarray]  # modules_to_save / trained biases: base tensor name -> replacement
    ranks: dict[str, tuple[int, float]]  # module -> (r, alpha) as peft gives it


def is_peft_key(name: str) -> bool:
    return name.startswith(PREFIX)


def to_paddle_form(arrays: dict[str, np.ndarray], peft: PeftSettings, where: str) -> PeftTensors:
    """peft's tensors as Paddle's LoRA pairs (A ``[in, rank]``, ``B * scaling`` ``[rank, out]``, float32, zero-padded to
    the largest rank), DoRA magnitudes, and the whole tensors it saved (modules_to_save, trained biases). Every tensor
    is placed or refused by name."""
    problems, a_of, b_of, mags, whole = [], {}, {}, {}, {}
    for key, arr in arrays.items():
        if not key.startswith(PREFIX):
            problems.append(f"{key}: not a peft adapter tensor (peft saves every name under `{PREFIX}`)")
            continue
        name = key[len(PREFIX):]
        refused = next((what for suffix, what in _REFUSED_TENSORS.items() if suffix in name), None)
        if refused:
            problems.append(f"{key}: {refused}, which paddle-scorer does not compute")
        elif name.endswith(_A):
            a_of[name[: -len(_A)]] = arr
        elif name.endswith(_B):
            b_of[name[: -len(_B)]] = arr
        elif name.endswith(_MAG):
            mags[name[: -len(_MAG)]] = arr
        elif _whole_tensor(name, peft):
            whole[name] = arr
        else:
            problems.append(f"{key}: neither a lora_A/lora_B pair, a DoRA magnitude, a modules_to_save tensor nor a "
                            f"trained bias (bias={peft.bias!r})")
    for module in sorted(set(a_of) ^ set(b_of)):
        problems.append(f"{module}: {'lora_B' if module in a_of else 'lora_A'} is missing")
    if mags and not peft.use_dora:
        problems.append(f"{sorted(mags)[0]}: a DoRA magnitude vector, but adapter_config.json has use_dora false")
    modules = sorted(set(a_of) & set(b_of))
    ranks = {}
    for m in modules:
        a, b = a_of[m], b_of[m]
        r, alpha = peft.rank_alpha(m)
        ranks[m] = (r, alpha)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not have rank {r} (what "
                            "r and rank_pattern give this module)")
        if peft.use_dora and m not in mags:
            problems.append(f"{m}: use_dora is true but the file has no lora_magnitude_vector for it")
        if m in mags and (mags[m].ndim != 1 or b.ndim != 2 or mags[m].shape[0] != b.shape[0]):
            problems.append(f"{m}: its DoRA magnitude {tuple(mags[m].shape)} does not have one value per output "
                            f"({b.shape[0] if b.ndim == 2 else '?'})")
    for m in sorted(set(mags) - set(modules)):
        problems.append(f"{m}: a DoRA magnitude vector without a lora_A/lora_B pair")
    if problems:
        raise AdapterTensorError(where, problems)
    rank = max((ranks[m][0] for m in modules), default=0)
    pairs = {}
    for m in modules:
        r = ranks[m][0]
        s = np.float32(peft.scaling(m))
        a = np.zeros((a_of[m].shape[1], rank), np.float32)
        b = np.zeros((rank, b_of[m].shape[0]), np.float32)
        a[:, :r] = a_of[m].astype(np.float32).T
        b[:r, :] = b_of[m].astype(np.float32).T * s
        pairs[f"{m}.lora_A"], pairs[f"{m}.lora_B"] = a, b
    return PeftTensors(pairs, rank, {m: v.astype(np.float32) for m, v in mags.items()}, whole, ranks)


def _whole_tensor(name: str, peft: PeftSettings) -> bool:
    """A whole tensor peft saves beside the pairs: a module of ``modules_to_save`` (its weight/bias), or a bias when
    ``bias`` is ``all`` / ``lora_only``."""
    module = name.rsplit(".", 1)[0]
    if any(re.match(rf"(^|.*\.){m}$", module) for m in peft.modules_to_save):
        return True
    return peft.bias != "none" and name.endswith(".bias")


def AdapterTensorError(where: str, problems: list[str]) -> WeightMismatchError:
    return WeightMismatchError(f"{where}: the peft adapter's tensors cannot be read as peft's LoRA ({len(problems)} "
                               "problem(s)):", problems, "Re-save the adapter with peft (save_pretrained).")
