"""What ``inspect`` adds to :func:`~paddle_scorer.checkpoint.describe.describe`: the loader's verdict on a folder (the same
sentence and exit code a load would give), its layout, the library that builds it and the memory verdict on
this machine. No paddle import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.checkpoint.describe import (  # noqa: F401 - the kinds inspect reports, for its callers
    FULL_MODEL,
    LORA_ADAPTER,
    MERGED_MODEL,
    NOT_A_CHECKPOINT,
    RENAMED_ADAPTER,
    CheckpointInfo,
    describe,
)
from paddle_scorer.model import libraries
from paddle_scorer.model import memory_budget
from paddle_scorer.checkpoint.lora import config_file
from paddle_scorer.model.folders import check_adapter_folder, check_tokenizer_files
from paddle_scorer.model.load_plan import plan_model

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
    family: dict | None = None  # a model computed by paddle-scorer's own decoder: family, experts, parameters

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def assess(info: ckpt.CheckpointInfo, memory_limit: int | None = None) -> Assessment:
    """Run the loader's checks for the folder's role, without loading anything."""
    from paddle_scorer.errors import NotACheckpointError, ScorerError

    if info.kind == ckpt.NOT_A_CHECKPOINT:
        return Assessment(False, None, info.summary, NotACheckpointError.exit_code)
    if info.kind == ckpt.LORA_ADAPTER or (info.kind == ckpt.RENAMED_ADAPTER and info.adapter_weights is not None
                                           and config_file(Path(info.path)) is not None):
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
    if mp.family is not None:
        a.family = family_facts(mp)
    arch = mp.library.arch_for(info)
    if arch.gpu_only:
        a.gpu_only = f"{arch.architecture} cannot run on CPU: {arch.gpu_only}; classify, generate and smoke refuse it " \
                     "there before loading (run them with --device gpu)"
    try:
        mem = memory_budget.plan_memory(mp.layer_bytes(4), mp.largest_outside(4), "cpu", memory_limit,
                                 dims=memory_budget.Dims.from_config(info.config))
    except ScorerError as exc:
        a.memory = {"execution": None, "reason": str(exc)}
        return a
    a.memory = {"execution": mem.execution, "need": mem.in_ram_need, "budget": mem.budget,
                "budget_source": mem.budget_source}
    if mem.execution == memory_budget.STREAMED:
        a.memory["records_per_block"] = memory_budget.records_per_block(mem, INSPECT_TOKENS, 2**62)
        a.memory["assumed_tokens"] = INSPECT_TOKENS
    return a


def inspect_folder(path) -> tuple[CheckpointInfo, Assessment]:
    """What ``inspect`` shows: the folder's description (:func:`~paddle_scorer.checkpoint.describe.describe`) and the
    loader's verdict on it; a next command is never suggested for what the loader refuses (the renamed-adapter
    trap's fix is a rename, and is kept)."""
    info = describe(path)
    a = assess(info)
    if not a.usable and info.kind != RENAMED_ADAPTER:
        info.next_command = None
    return info, a


def family_facts(mp) -> dict:
    """What ``inspect`` says of a model paddle-scorer's decoder computes: the family, its experts, its parameters (all
    of them, and those one token goes through), where it runs."""
    fc = mp.family
    total = mp.num_params
    moe = fc.moe
    return {
        "family": fc.family, "title": fc.title, "layers": fc.layers, "moe_layers": len(fc.moe_layers),
        "experts": moe.experts if moe else None, "experts_per_token": moe.top_k if moe else None,
        "shared_expert_intermediate": moe.shared_intermediate if moe and moe.shared_intermediate else None,
        "params_total": total, "params_active": fc.active_params(total),
        "attention": "MLA (low-rank q and kv)" if fc.mla else ("q/k norm" if fc.qk_norm else "standard"),
        "rope": fc.rope.type, "runs_on": "cpu", "computed_by": "paddle-scorer's CPU decoder",
        "why": libraries.decoder_reason(mp.info) or "no model library runs it on a CPU",
        "gpu": ("the library's forward on a GPU" if any(not lib.native and lib.arch_for(mp.info) is not None
                                                       for lib in libraries.LIBRARIES) else
                "on a GPU: not supported yet"),
        "window": fc.window, "sliding_layers": len(fc.local_layers),
        "notes": list(fc.notes),
    }
