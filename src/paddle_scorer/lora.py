"""LoRA settings and math, independent of paddle.

PaddleNLP stores, per adapted ``Linear`` (weight ``[in, out]``), ``<module>.lora_A`` ``[in, r]`` and
``<module>.lora_B`` ``[r, out]``. The effective weight is ``W + A @ B * scaling`` where
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rslora).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.rslora)

    @property
    def scaling_formula(self) -> str:
        if self.rslora:
            return f"lora_alpha / sqrt(r) = {self.lora_alpha:g} / sqrt({self.r})"
        return f"lora_alpha / r = {self.lora_alpha:g} / {self.r}"


def lora_scaling(r: int, lora_alpha: float, rslora: bool = False) -> float:
    if r <= 0:
        raise CheckpointError(f"LoRA rank r must be positive, got {r}; the lora_config.json is broken.")
    return float(lora_alpha) / (math.sqrt(r) if rslora else r)


def parse_lora_config(data: dict, source: str = "lora_config.json") -> LoraSettings:
    try:
        r = int(data["r"])
        alpha = float(data.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has no valid rank `r` ({exc}); it is not a PaddleNLP LoRA config.") from exc
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    variants = [name for name in UNSUPPORTED_VARIANTS if data.get(name)]
    return LoraSettings(
        r=r,
        lora_alpha=alpha,
        rslora=bool(data.get("rslora", False)),
        target_modules=list(targets),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        dtype=data.get("dtype"),
        variants=variants,
        raw=dict(data),
    )


def read_lora_config(folder: Path) -> LoraSettings:
    path = Path(folder) / "lora_config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or re-save the adapter.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or re-save the adapter.")
    return parse_lora_config(data, str(path))


def is_lora_key(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def lora_delta(a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """``A @ B * scaling`` computed in float32 (the weight's dtype is applied by the caller).

    Overflow gives inf rather than a warning: callers check the merged result and refuse it.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return (a.astype(np.float32) @ b.astype(np.float32)) * np.float32(scaling)
