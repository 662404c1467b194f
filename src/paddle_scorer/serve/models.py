"""The models a server serves, assembled from the command line's choices: the base (loaded once, whole in memory), and
one backend per adapter sharing its weights, each adapter checked against the base with the loader's sentences before
the server starts; the prefix cache sized from the memory budget; the scorer.json defaults of each. Notes are returned
through the caller's hooks, never printed here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from paddle_scorer.errors import UsageError
from paddle_scorer.tasks.job import Hooks

MAX_DEFAULT_CACHE = 2 * 1024**3


def parse_adapters(values: list[str]) -> list[tuple[str | None, Path]]:
    """``--lora`` values: ``FOLDER`` or ``NAME=FOLDER`` -> ``[(name or None, folder)]``; names must differ."""
    out: list[tuple[str | None, Path]] = []
    for v in values:
        name, sep, path = v.partition("=")
        if sep and not Path(v).exists():
            if not name or not path:
                raise UsageError(f"--lora {v!r}: write NAME=FOLDER (or just FOLDER).")
            out.append((name, Path(path)))
        else:
            out.append((None, Path(v)))
    names = [n or p.resolve().name for n, p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--lora: the name {dup[0]!r} is given to two adapters; name them NAME=FOLDER.")
    return out


def default_name(model: Path | None, lora: Path | None, loaded) -> str:
    folder = lora or model or Path(loaded.facts.model_path)
    return Path(folder).resolve().name


@dataclass
class Served:
    """What a server serves: ``backends`` by served name (the first is the base, or the one adapter), their scorer.json
    ``defaults``, the adapters' folders, the prefix cache bound, and the loaded base."""

    loaded: object
    name: str
    backends: dict
    defaults: dict = field(default_factory=dict)
    adapter_dirs: dict = field(default_factory=dict)
    cache_bytes: int = 0


def cache_bytes_for(plan, asked: int | None) -> int:
    """The prefix cache bound: as asked, or half of what the memory budget leaves after the model (at most 2 GiB).
    More than the budget leaves is refused: the cache would push the server out of memory under load."""
    from paddle_scorer.model.memory_budget import fmt_bytes

    m = plan.memory
    left = max(0, (m.budget or 0) - m.in_ram_need) if m.budget else None
    if asked is None:
        return min(MAX_DEFAULT_CACHE, left // 2) if left is not None else MAX_DEFAULT_CACHE
    if left is not None and asked > left:
        raise UsageError(f"--prefix-cache {fmt_bytes(asked)} is more than the memory budget leaves after the model "
                         f"({fmt_bytes(left)} of {fmt_bytes(m.budget)}, {m.budget_source}); give at most "
                         f"{fmt_bytes(left)}, or 0 to keep no prefixes.")
    return asked


def serve_models(load, adapters: list[tuple[str | None, Path]], *, model_name: str | None, prefix_cache: int | None,
                 prefix_reuse: bool, hooks: Hooks = Hooks()) -> Served:
    """Load the base of ``load`` (a :class:`~paddle_scorer.tasks.loading.LoadOptions`; with several ``adapters`` the
    base is ``--model``, or the one the first adapter names) and assemble the served models."""
    import dataclasses

    from paddle_scorer.checkpoint.sidecars import scorer_defaults
    from paddle_scorer.tasks.loading import load_model, plan_in_ram, say_notes

    several = len(adapters) > 1 or any(n is not None for n, _ in adapters)
    lora = adapters[0][1] if (adapters and not several) else None
    load = dataclasses.replace(load, lora=lora if not several else None)
    if several and load.model is None:  # the base the first adapter names
        from paddle_scorer.model.folders import resolve_paths

        load = dataclasses.replace(load, model=resolve_paths(None, adapters[0][1])[0])
    plan = plan_in_ram(load, "serve")
    loaded = load_model(load, hooks, plan)
    cache = cache_bytes_for(plan, prefix_cache)
    name = model_name or default_name(load.model, lora, loaded)
    backends, defaults, dirs = _backends(loaded, plan, adapters if several else [], name, cache, prefix_reuse,
                                         load.mode, hooks)
    say_notes(loaded, hooks)
    defaults.setdefault(name, scorer_defaults(plan.model_dir, plan.lora_dir))
    return Served(loaded, name, backends, defaults, dirs, cache)


def _backends(loaded, plan, adapters, name: str, cache_bytes: int, prefix_reuse: bool, mode: str, hooks: Hooks):
    """``{served name: backend}``: the loaded model alone, or the base plus one backend per adapter sharing its weights
    (each adapter validated against the base with the loader's checks before the server starts)."""
    from paddle_scorer.compute.choose_backend import backend_for, cpu_runner, pad_id_of, record_compute

    share = max(1, len(adapters) + 1)
    if not adapters:
        return {name: backend_for(loaded, prefix_reuse=prefix_reuse, prefix_cache_bytes=cache_bytes)}, {}, {}
    from paddle_scorer.compute.in_ram import Backend
    from paddle_scorer.model.load_plan import plan_adapter
    from paddle_scorer.checkpoint.sidecars import scorer_defaults

    if mode != "attach":
        raise UsageError("several adapters on one base are served attached (each request picks one); drop --mode merge.")
    runner, facts = cpu_runner(loaded)
    if runner is None:
        raise UsageError(f"several adapters on one base need paddle-scorer's CPU decoder ({facts.get('why')}); start one "
                         "server per adapter (--lora FOLDER) instead.")
    record_compute(loaded, facts)
    pad = pad_id_of(loaded.tokenizer)
    backends = {name: Backend(runner, pad, prefix_reuse=prefix_reuse, prefix_cache_bytes=cache_bytes // share)}
    defaults, dirs = {}, {}
    for adapter_name, folder in adapters:
        adapter_name = adapter_name or folder.resolve().name
        if adapter_name in backends:
            raise UsageError(f"--lora: {adapter_name!r} is also the base model's name; pick another name or --model-name.")
        ap = plan_adapter(folder, plan.model)  # the loader's checks and sentences
        if ap.changes_base:
            what = "DoRA magnitudes" if ap.magnitudes else "whole tensors (modules_to_save or trained biases)"
            raise UsageError(f"--lora {adapter_name}={folder}: the adapter changes the base's own weights ({what}), so it "
                             f"cannot share a base with other adapters; serve it alone: paddle-scorer serve --lora {folder}")
        backends[adapter_name] = Backend(runner.with_adapter(ap.pairs, ap.scaling), pad, prefix_reuse=prefix_reuse,
                                         prefix_cache_bytes=cache_bytes // share)
        defaults[adapter_name] = scorer_defaults(None, folder)
        dirs[adapter_name] = str(folder)
        for note in [ap.mapping_note, ap.base_note]:
            if note:
                hooks.note(f"{adapter_name}: {note}")
    return backends, defaults, dirs
