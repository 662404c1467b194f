"""Which executor scores a loaded model, decided once per load and recorded in its provenance
(``facts.compute``):

* streamed (the load plan's decision, :mod:`paddle_scorer.model.memory_budget`): :class:`~paddle_scorer.compute.streamed.StreamedBackend`,
  layer by layer from disk;
* in RAM on CPU: the :mod:`paddle_scorer.compute.decoder` forward (:class:`~paddle_scorer.compute.numpy_runner.NumpyRunner`) on the
  GEMM kernel :mod:`paddle_scorer.compute.gemm` measured fastest, when the architecture is one it computes; else,
  with the reason recorded, the library's forward (:class:`~paddle_scorer.compute.library_runner.ModelRunner`);
* on GPU: the library's forward.

``PADDLE_SCORER_CPU_FORWARD=library`` forces the library's forward on CPU (for A/B checks and benchmarks).
"""

from __future__ import annotations

from paddle_scorer.compute.in_ram import Backend, Strategy
from paddle_scorer.compute.seams import ScoringBackend
from paddle_scorer.compute.library_runner import ModelRunner

from paddle_scorer.compute.gemm import FORWARD_ENV, library_forward_forced


def pad_id_of(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def cpu_runner(loaded):
    """``(runner, compute facts)``: the CPU decoder forward over the loaded model, or ``(None, facts)`` saying
    why the library's forward runs."""
    from paddle_scorer.compute import numpy_runner as cr

    forced = library_forward_forced()  # a typo is refused on any device
    if loaded.device != "cpu" or loaded.dtype != "float32":
        return None, {"forward": "library", "why": f"{loaded.device}, {loaded.dtype}"}
    if forced:
        return None, {"forward": "library", "why": f"{FORWARD_ENV}=library"}
    mp = loaded.plan.model
    arch = mp.library.arch_for(mp.info).architecture
    if mp.family is not None:  # no model object: the decoder over the family's tensors
        ap = loaded.plan.adapter
        attached = loaded.plan.attached_pairs  # DoRA's pairs were merged when the arrays were read
        runner = cr.family_runner(mp.family, arch, loaded.arrays, attached or None,
                                  ap.scaling if attached else 1.0)
        fc = mp.family
        _, choice = cr.gemm_for(runner.f.spec, fc.moe.intermediate if fc.moe else fc.intermediate)
        return runner, {"forward": "paddle-scorer decoder", "family": fc.family, "gemm": choice.to_dict()}
    runner, why = cr.runner_for(loaded.model, mp.library.name, arch, loaded.config)
    if runner is None:
        return None, {"forward": "library", "why": why}
    _, choice = cr.gemm_for(runner.f.spec, int(getattr(loaded.config, "intermediate_size", None) or 4 * runner.f.spec.hidden))
    return runner, {"forward": "paddle-scorer decoder", "gemm": choice.to_dict()}


def backend_for(loaded, strategy: Strategy | None = None, prefix_reuse: bool = True,
                prefix_cache_bytes: int | None = None) -> ScoringBackend:
    """The scoring backend for a :func:`paddle_scorer.model.loader.load` result (pad id from its tokenizer).
    ``prefix_reuse``: shared prompt prefixes computed once (CPU decoder, in RAM and streamed; ``--no-prefix-reuse``
    turns it off for A/B checks); ``prefix_cache_bytes``: the bound of the cache that keeps them across batches."""
    pad = pad_id_of(loaded.tokenizer)
    if loaded.streamed:
        from paddle_scorer.compute.streamed import StreamedBackend  # imports the model library's layer code

        backend = StreamedBackend(loaded, pad_id=pad, prefix_reuse=prefix_reuse)
        record_compute(loaded, backend.compute)
        return backend
    runner, facts = cpu_runner(loaded) if loaded.plan is not None else (None, {"forward": "library"})
    record_compute(loaded, facts)
    if prefix_cache_bytes is None and runner is not None:
        from paddle_scorer.compute.prefix_reuse import default_cache_bytes

        prefix_cache_bytes = default_cache_bytes(runner)
        m = loaded.plan.memory
        if m.budget:  # within what the memory budget leaves after the model, as serve's cache
            prefix_cache_bytes = min(prefix_cache_bytes, max(0, m.budget - m.in_ram_need) // 2)
    return Backend(runner or ModelRunner(loaded.model, loaded.facts.library), pad_id=pad, strategy=strategy,
                   prefix_reuse=prefix_reuse, prefix_cache_bytes=prefix_cache_bytes)


def record_compute(loaded, facts: dict) -> None:
    """What computes (provenance ``model.compute``); the GEMM kernel's notes (a kernel excluded by its self-check, an
    unknown forced kernel) join the load's notes, said by the task with them."""
    loaded.facts.compute = facts
    for note in (facts.get("gemm") or {}).get("notes", []):
        if note not in loaded.facts.notes:
            loaded.facts.notes.append(note)
