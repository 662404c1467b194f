"""Session fixtures: tiny real PaddleFormers 1.2.0 checkpoints and adapters, built once, shared read-only.

These tests need the second virtualenv (paddleformers cannot share a venv with paddlenlp 3.0.0b4):

    .venv-formers/bin/python -m pytest tests/formers

In a venv without paddleformers (the main .venv) this folder is not collected at all.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

HAVE_PADDLEFORMERS = importlib.util.find_spec("paddleformers") is not None
if not HAVE_PADDLEFORMERS:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def formers_bases():
    """The in-memory base models the checkpoints were saved from (eval mode). Do not modify them."""
    from formers import builders as fb

    return {
        "llama": fb.build_model("llama", seed=0, scale=1.5),  # log-probs of about -5..-15: 1e-5 is float32-meaningful
        "ernie4_5": fb.build_model("ernie4_5", seed=1),
        "ernie4_5_moe": fb.build_model("ernie4_5_moe", seed=2),
    }


@pytest.fixture(scope="session")
def formers_models(tmp_path_factory, formers_bases):
    """Folders written by paddleformers' save_pretrained. Tests must copy before modifying."""
    from formers import builders as fb

    root = tmp_path_factory.mktemp("formers")
    b = formers_bases
    out = {
        "llama": fb.save_model(b["llama"], root / "llama"),
        "llama16": fb.save_model(b["llama"], root / "llama16", dtype="float16"),
        "llama_bf16": fb.save_model(b["llama"], root / "llama_bf16", dtype="bfloat16"),
        "ernie4_5": fb.save_model(b["ernie4_5"], root / "ernie4_5"),
        "ernie4_5_moe": fb.save_model(b["ernie4_5_moe"], root / "ernie4_5_moe"),
    }
    out["llama_lora"] = fb.save_lora(b["llama"], root / "llama_lora", base_ref=str(out["llama"]))
    out["llama_rslora"] = fb.save_lora(b["llama"], root / "llama_rslora", base_ref=str(out["llama"]), r=8,
                                       alpha=4, rslora=True, seed=5)
    out["ernie4_5_lora"] = fb.save_lora(b["ernie4_5"], root / "ernie4_5_lora", base_ref=str(out["ernie4_5"]),
                                        seed=3)
    out["ernie4_5_moe_lora"] = fb.save_lora(b["ernie4_5_moe"], root / "ernie4_5_moe_lora",
                                            base_ref=str(out["ernie4_5_moe"]), seed=4)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return _copy


class References:
    """PaddleFormers' own models for the saved fixtures, built on first use: ``model(arch, "base" | "lora" |
    "merged")`` (the adapter through ``LoRAModel.from_pretrained``, unmerged or after ``LoRAModel.merge()``), and
    ``logprobs(model, ids)``: float64 log-softmax of PaddleFormers' own forward, one sequence, no padding."""

    def __init__(self, bases, models):
        self.bases, self.models, self._cache = bases, models, {}

    def model(self, arch: str, kind: str = "base", adapter: str | None = None):
        key = (arch, kind, adapter)
        if key not in self._cache:
            from formers import builders as fb

            if kind == "base":
                self._cache[key] = self.bases[arch]
            else:
                lora = fb.load_lora_model(self.bases[arch], self.models[adapter or f"{arch}_lora"])
                if kind == "merged":
                    lora.merge()
                self._cache[key] = lora
        return self._cache[key]

    @staticmethod
    def logprobs(model, ids):
        import numpy as np

        from formers import builders as fb

        x = fb.reference_logits(model, [list(ids)])[0].astype(np.float64)
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)

    def label_logprob(self, model, prompt, label) -> float:
        lp = self.logprobs(model, list(prompt) + list(label))
        return float(sum(lp[len(prompt) - 1 + t, tok] for t, tok in enumerate(label)))


@pytest.fixture(scope="session")
def pf(formers_bases, formers_models):
    return References(formers_bases, formers_models)
