"""LoRA settings and math, independent of paddle.

PaddleNLP stores, per adapted ``Linear`` (weight ``[in, out]``), ``<module>.lora_A`` ``[in, r]`` and
``<module>.lora_B`` ``[r, out]``. The effective weight is ``W + A @ B * scaling`` where
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rslora).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paddle_scorer.checkpoint import peft_config
from paddle_scorer.checkpoint.peft_config import PeftSettings
from paddle_scorer.checkpoint.sidecars import read_json
from paddle_scorer.errors import CheckpointError

# Fields of lora_config.json that change the math in ways we do not implement: refusing by name is
# better than a silently wrong merge.
UNSUPPORTED_VARIANTS = {
    "pissa": "PiSSA (the base weights were rewritten during training)",
    "use_mora": "MoRA (a different low-rank update)",
    "lora_use_mixer": "LoRA with a mixer matrix",
    "loraga": "LoRA-GA",
    "do_qat": "quantisation-aware LoRA",
}


@dataclass(frozen=True)
class LoraSettings:
    r: int
    lora_alpha: float
    rslora: bool
    target_modules: list[str]
    base_model_name_or_path: str | None
    dtype: str | None
    variants: list[str] = field(default_factory=list)  # unsupported variants switched on
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    notes: list[str] = field(default_factory=list, compare=False)
    peft: PeftSettings | None = None  # a peft adapter (adapter_config.json): per-module scaling folded into B
    rank: int | None = None  # the rank every pair has once read (a peft adapter's largest rank; else r)

    @property
    def saver(self) -> str:
        return "peft" if self.peft is not None else "PaddleNLP's LoRAModel"

    @property
    def pair_rank(self) -> int:
        return self.rank if self.rank is not None else self.r

    @property
    def scaling(self) -> float:
        """The scaling the pairs are applied with: 1 for a peft adapter, whose pairs carry their module's own."""
        if self.peft is not None:
            return 1.0
        return lora_scaling(self.r, self.lora_alpha, self.rslora)

    def targets(self, module: str) -> bool:
        """Would the library that saved the adapter adapt ``module``? PaddleNLP/PaddleFormers: a regex of
        ``target_modules`` fully matches its name; peft: its own rules (:meth:`PeftSettings.targets`)."""
        if self.peft is not None:
            return self.peft.targets(module)
        return any(re.fullmatch(t, module) for t in self.target_modules)

    def describe(self) -> str:
        """One line for smoke and notes: rank, alpha, scaling and what the adapter is."""
        if self.peft is not None:
            p = self.peft
            extra = (", DoRA" if p.use_dora else "") + \
                (f", modules_to_save {p.modules_to_save}" if p.modules_to_save else "")
            return f"peft LoRA r={p.r}, lora_alpha={p.lora_alpha:g} (scaling {self.scaling_formula}){extra}"
        return f"LoRA r={self.r}, lora_alpha={self.lora_alpha:g}, scaling {self.scaling:g} ({self.scaling_formula})"

    @property
    def scaling_formula(self) -> str:
        if self.peft is not None:
            p = self.peft
            base = f"lora_alpha / {'sqrt(r)' if p.use_rslora else 'r'} = {p.lora_alpha:g} / " + \
                (f"sqrt({p.r})" if p.use_rslora else f"{p.r}")
            if p.rank_pattern or p.alpha_pattern:
                base += " (rank_pattern/alpha_pattern give some modules their own)"
            return base
        if self.rslora:
            return f"lora_alpha / sqrt(r) = {self.lora_alpha:g} / sqrt({self.r})"
        return f"lora_alpha / r = {self.lora_alpha:g} / {self.r}"


def lora_scaling(r: int, lora_alpha: float, rslora: bool = False) -> float:
    if r <= 0:
        raise CheckpointError(f"LoRA rank r must be positive, got {r}; the lora_config.json is broken.")
    return float(lora_alpha) / (math.sqrt(r) if rslora else r)


PADDLENLP_DEFAULT_ALPHA = 8  # paddlenlp.peft.LoRAConfig.lora_alpha's default (3.0.0b4), used when the field is absent


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_lora_config(data: dict, source: str = "lora_config.json") -> LoraSettings:
    """Typed, range-checked LoRA settings. Wrong types are refused (never coerced); a missing
    ``lora_alpha`` takes PaddleNLP's own default (8) and says so in ``notes``."""
    problems = []
    r = data.get("r")
    if not _is_int(r) or r <= 0:
        raise CheckpointError(f"{source}: `r` must be a positive integer (the LoRA rank), found {r!r}; fix lora_config.json.")
    notes = []
    if "lora_alpha" not in data or data["lora_alpha"] is None:
        alpha = float(PADDLENLP_DEFAULT_ALPHA)
        notes.append(f"lora_config.json has no lora_alpha: PaddleNLP's default {PADDLENLP_DEFAULT_ALPHA} is used "
                     "(as LoRAModel.from_pretrained would)")
    elif not _is_number(data["lora_alpha"]):
        raise CheckpointError(f"{source}: `lora_alpha` must be a number, found {data['lora_alpha']!r}; fix lora_config.json.")
    else:
        alpha = float(data["lora_alpha"])
    for flag in ("rslora", *UNSUPPORTED_VARIANTS):
        if flag in data and data[flag] is not None and not isinstance(data[flag], bool):
            problems.append(f"`{flag}` must be true or false, found {data[flag]!r}")
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        problems.append(f"`target_modules` must be a list of regular expressions, found {data.get('target_modules')!r}")
    else:
        for t in targets:
            try:
                re.compile(t)
            except re.error as exc:
                problems.append(f"target_modules entry {t!r} is not a regular expression ({exc})")
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"`base_model_name_or_path` must be a string, found {base!r}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems) + "; fix lora_config.json.")
    rslora = bool(data.get("rslora") or False)
    variants = [name for name in UNSUPPORTED_VARIANTS if data.get(name)]
    settings = LoraSettings(
        r=r,
        lora_alpha=alpha,
        rslora=rslora,
        target_modules=list(targets),
        base_model_name_or_path=base,
        dtype=data.get("dtype") if isinstance(data.get("dtype"), str) else None,
        variants=variants,
        raw=dict(data),
        notes=notes,
    )
    saved = data.get("scaling")
    if saved is not None and not variants:
        if not _is_number(saved) or not math.isclose(float(saved), settings.scaling, rel_tol=1e-6, abs_tol=1e-9):
            raise CheckpointError(
                f"{source}: the saved `scaling` {saved!r} disagrees with {settings.scaling_formula} = "
                f"{settings.scaling:g}; the file was edited by hand: make lora_alpha, r and rslora match the training run."
            )
    return settings


PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def config_file(folder: Path) -> Path | None:
    """The adapter's config: ``lora_config.json`` (PaddleNLP, PaddleFormers) or peft's ``adapter_config.json``. With
    both, the one that goes with the weights file (peft's ``adapter_model.*``, or Paddle's files)."""
    folder = Path(folder)
    paddle, peft = folder / "lora_config.json", folder / peft_config.CONFIG_NAME
    if paddle.is_file() and peft.is_file():
        return peft if any((folder / n).is_file() for n in PEFT_WEIGHTS) else paddle
    return paddle if paddle.is_file() else peft if peft.is_file() else None


def read_lora_config(folder: Path) -> LoraSettings:
    path = config_file(folder)
    if path is None:
        raise FileNotFoundError(Path(folder) / "lora_config.json")
    data = read_json(path)
    if path.name == peft_config.CONFIG_NAME:
        return from_peft(peft_config.parse_peft_config(data, str(path)), data)
    return parse_lora_config(data, str(path))


def from_peft(p: PeftSettings, raw: dict) -> LoraSettings:
    targets = [p.target_modules] if isinstance(p.target_modules, str) else list(p.target_modules or [])
    return LoraSettings(r=p.r, lora_alpha=p.lora_alpha, rslora=p.use_rslora, target_modules=targets,
                        base_model_name_or_path=raw.get("base_model_name_or_path"), dtype=None, raw=dict(raw),
                        notes=list(p.notes), peft=p)


def is_lora_key(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def lora_delta(a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """``A @ B * scaling`` computed in float32 (the weight's dtype is applied by the caller).

    Overflow gives inf rather than a warning: callers check the merged result and refuse it.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return (a.astype(np.float32) @ b.astype(np.float32)) * np.float32(scaling)
