"""Session fixtures: tiny real models and adapters are built once and shared (read-only)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import builders


def pytest_configure(config):
    """The weight-hash cache (fingerprints.py) of this run lives in a fresh folder, never in the user's ~/.cache;
    subprocesses (the CLI, servers, launcher workers) inherit it."""
    os.environ["PADDLE_SCORER_CACHE_DIR"] = tempfile.mkdtemp(prefix="paddle-scorer-test-cache-")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(os.environ.get("PADDLE_SCORER_CACHE_DIR", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A family of tiny real checkpoints on disk. Tests must copy before modifying."""
    root = tmp_path_factory.mktemp("models")
    llama = builders.build_model("llama", seed=0)
    qwen = builders.build_model("qwen2", seed=3)
    out = {
        "llama": builders.save_model(llama, root / "llama"),
        "llama16": builders.save_model(llama, root / "llama16", dtype="float16"),
        "qwen2": builders.save_model(qwen, root / "qwen2"),
    }
    out["llama_lora"] = builders.save_lora(llama, root / "llama_lora", base_ref=str(out["llama"]))
    out["llama_rslora"] = builders.save_lora(llama, root / "llama_rslora", base_ref=str(out["llama"]), r=8,
                                             alpha=4, rslora=True, seed=5)
    out["qwen2_lora"] = builders.save_lora(qwen, root / "qwen2_lora", base_ref=str(out["qwen2"]),
                                           targets=(".*q_proj.*", ".*k_proj.*", ".*o_proj.*", ".*up_proj.*"))
    return out


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return _copy


# --------------------------------------------------------------------------------------------------
# Measured agreement: tests that compare our log-probs with a library's own forward record the max |delta|
# here, and the run ends with one line per check (the numbers quoted in README / reports come from this).
# --------------------------------------------------------------------------------------------------

_DELTAS: dict[str, float] = {}


class Deltas:
    def record(self, check: str, value: float) -> float:
        _DELTAS[check] = max(_DELTAS.get(check, 0.0), float(value))
        return float(value)


@pytest.fixture(scope="session")
def deltas():
    return Deltas()


def pytest_terminal_summary(terminalreporter):
    if _DELTAS:
        terminalreporter.section("max |delta log-prob| per check (ours vs the library's own forward)")
        for check, value in sorted(_DELTAS.items()):
            terminalreporter.write_line(f"{value:9.2e}  {check}")
