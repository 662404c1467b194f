"""Load a model (+ LoRA adapter, attached or merged) into RAM from a :class:`~paddle_scorer.model.load_plan.LoadPlan`.

``load()`` reads like a recipe: :func:`~paddle_scorer.model.load_plan.make_plan` (every check, no paddle) ->
:func:`build_model` -> :func:`attach_adapter` (or the deltas merged while reading) ->
:func:`load_tokenizer`.

Building without a second copy: the model is declared without allocating or initialising its
parameters (``no_init_weights`` + ``paddle.LazyGuard``, see :meth:`LibrarySpec.no_init_context <paddle_scorer.model.libraries.LibrarySpec.no_init_context>`), then
each parameter is materialised by ``set_value`` from the checkpoint, tensor by tensor, cast as it is
read. Peak memory is about one copy of the compute-dtype weights plus the tensor in flight (the old
"build randomly initialised, then overwrite" spent 40 s of 62 s on an 810M model in throw-away
initialisation, and held two copies). Stricter than PaddleNLP's ``from_pretrained``: every parameter
must come from the checkpoint (nothing keeps a random or an uninitialised value), every tensor of
the checkpoint must land on a parameter, and shapes must agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from paddle_scorer.errors import CheckpointError, WeightMismatchError
from paddle_scorer.model.arrays import cast_or_refuse, merge_lora, to_paddle_array
from paddle_scorer.model.load_plan import LoadPlan, make_plan
from paddle_scorer.checkpoint.weights import read_tensor, read_tensors
from paddle_scorer.model.tensor_layout import layer_index
from paddle_scorer.model.tokenizer import load_tokenizer, tokenizer_facts



@dataclass
class LoadFacts:
    """What was loaded and how: goes into every output's provenance."""

    model_path: str
    adapter_path: str | None
    adapter_sha256: str | None
    mode: str | None
    scaling: float | None
    lora_r: int | None
    lora_alpha: float | None
    rslora: bool | None
    adapter_key_mapping: str | None
    architecture: str | None
    num_params: int
    stored_dtypes: dict[str, int]
    adapter_stored_dtypes: dict[str, int] | None
    policy: dict
    tokenizer_path: str
    chat_template: bool
    library: str = "paddlenlp"
    library_version: str | None = None
    layout: dict | None = None
    execution: dict | None = None
    compute: dict | None = None  # which forward and GEMM kernel ran (execution.backend_for)
    tokenizer: dict | None = None  # its class, fast or not, what the fast one was checked against
    model_fingerprint: str | None = None  # content hash, computed when a run's identity needs it (Loaded.fingerprint)
    noop_adapter_allowed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Loaded:
    model: Any  # the paddle model (None for a streamed plan: layers are read while scoring)
    tokenizer: Any
    facts: LoadFacts
    config: Any = None
    plan: LoadPlan | None = None
    arrays: dict[str, np.ndarray] | None = None  # a family model's runtime tensors (float32; no model object)

    @property
    def device(self) -> str:
        return self.facts.policy["device"]

    def fingerprint(self) -> str | None:
        """The model's content fingerprint (hashes every weight file once; cached, see fingerprints)."""
        if self.facts.model_fingerprint is None and self.plan is not None:
            from paddle_scorer.checkpoint.fingerprints import model_fingerprint

            self.facts.model_fingerprint = model_fingerprint(self.plan.model.info)
        return self.facts.model_fingerprint

    @property
    def dtype(self) -> str:
        return self.facts.policy["dtype"]

    @property
    def streamed(self) -> bool:
        """The plan's decision (:mod:`paddle_scorer.model.memory_budget`): layers are read while scoring, no model object."""
        return self.plan is not None and self.plan.streamed

    @property
    def eos_ids(self) -> set[int]:
        """EOS token ids from the tokenizer and the model config: where ``generate`` and ``serve`` stop."""
        cfg_eos = (self.plan.model.info.raw_config.get("eos_token_id") if self.plan is not None
                   else getattr(self.config, "eos_token_id", None))
        ids: set[int] = set()
        for e in (getattr(self.tokenizer, "eos_token_id", None), cfg_eos):
            if isinstance(e, int) and not isinstance(e, bool):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e if isinstance(x, int) and not isinstance(x, bool))
        return ids

    @property
    def context_length(self) -> int | None:
        """The model's context (max_position_embeddings), from config.json."""
        if self.plan is not None:
            v = self.plan.model.info.config.get("max_position_embeddings")
            v = v if isinstance(v, int) else None
            exact = self.plan.model.family.exact_positions if self.plan.model.family is not None else None
            return min(v, exact) if v is not None and exact is not None else (exact or v)
        return getattr(self.config, "max_position_embeddings", None)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def expected_params(model) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """The model's parameters by name, their shapes, and groups of names sharing one tensor (tied)."""
    params = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    by_id: dict[int, list[str]] = {}
    for k, v in params.items():
        by_id.setdefault(id(v), []).append(k)
    tied = {names[0]: names for names in by_id.values() if len(names) > 1}
    return params, shapes, tied


def check_names(plan: LoadPlan, model, where: str, only_layers: set | None = None) -> dict[str, Any]:
    """Every parameter provided, every checkpoint tensor used, every shape equal — or one error listing all."""

    params, shapes, tied = expected_params(model)
    recipes = plan.model.conversion.tensors
    provided = {n for n in recipes if only_layers is None or layer_index(n) in only_layers}
    problems = []
    for name in sorted(provided):
        if name not in shapes:
            src = ", ".join(recipes[name].sources)
            problems.append(f"{src}: unexpected tensor (the model built from config.json has no `{name}`)")
        elif tuple(recipes[name].shape) != shapes[name]:
            problems.append(f"{name}: checkpoint shape {tuple(recipes[name].shape)} != model shape {shapes[name]}")
    covered = set(provided)
    for group in tied.values():
        if covered & set(group):
            covered |= set(group)
    for name in sorted(set(shapes) - covered):
        problems.append(f"{name}: missing from the checkpoint (PaddleNLP would initialise it randomly)")
    if problems:
        layout = plan.model.layout
        raise WeightMismatchError(
            f"{where}: the weights do not match {type(model).__name__} built from config.json "
            f"({len(problems)} problem(s)):", problems,
            f"Check that config.json and the weights come from the same model (weights read as: {layout.description}; "
            f"{layout.evidence}).",
        )
    return params


def _file_order(names: list[str], plan: LoadPlan) -> list[str]:
    """Runtime names sorted by where their (first) source tensor lies: sequential reads."""
    recipes = plan.model.conversion.tensors
    refs = plan.model.refs

    def order(n):
        first = refs[recipes[n].sources[0]]
        return (str(first.file), first.offset)

    return sorted(names, key=order)


def materialise(param, value: np.ndarray, on_cpu: bool) -> None:
    """Give ``param`` the array's values. On CPU in float32 the parameter takes over the array's memory
    through DLPack (no copy: measured 4 s of 25 s of loading a 0.94B model was ``set_value``'s memcpy);
    elsewhere (GPU, half dtypes) ``set_value`` copies."""
    if on_cpu and value.dtype == np.float32:
        from paddle_scorer.process.environment import paddle

        value = np.ascontiguousarray(value)
        if not value.flags.writeable:
            value = value.copy()
        paddle().utils.dlpack.from_dlpack(value)._share_buffer_to(param)
    else:
        param.set_value(value)


def read_cast(plan: LoadPlan, name: str, dtype: str, scratch: np.ndarray | None, where: str) -> np.ndarray:
    """The runtime tensor ``name`` in the compute dtype, NaN/inf refused. A tensor that will be cast is read
    into ``scratch`` (no fresh pages to fault in for bytes that live a moment); the cast and the finite
    check run slice by slice on every core."""
    mp = plan.model
    recipe = mp.conversion.tensors[name]
    src = mp.refs[recipe.sources[0]]
    if len(recipe.parts) == 1 and scratch is not None and src.dtype != dtype and src.nbytes <= scratch.nbytes:
        arr = recipe.build({src.name: read_tensor(src, scratch)})
    else:
        arr = recipe.build(read_tensors([mp.refs[s] for s in recipe.sources]))
    return cast_or_refuse(name, arr, dtype, where)


def set_params(plan: LoadPlan, params: dict[str, Any], names: list[str], dtype: str, merge_pairs=None) -> None:
    """Read ``names`` (runtime names) one tensor at a time in file order, cast, merge deltas if given, and
    materialise the parameters: peak memory is the parameters plus one tensor in flight."""
    where = str(plan.model_dir)
    on_cpu = plan.policy.device == "cpu"
    mp = plan.model
    biggest = max((mp.refs[mp.conversion.tensors[n].sources[0]].nbytes for n in names), default=0)
    scratch = np.empty(biggest, dtype=np.uint8) if biggest else None
    for name in _file_order(names, plan):
        arrays = {name: read_cast(plan, name, dtype, scratch, where)}
        if merge_pairs:
            merge_lora(arrays, merge_pairs, plan.adapter.scaling, str(plan.lora_dir), out_dtype=dtype,
                       magnitudes=plan.magnitudes)
        materialise(params[name], to_paddle_array(arrays.pop(name), dtype), on_cpu)


def build_model(plan: LoadPlan, num_layers: int | None = None):
    """Build from config without initialising, then set every parameter from the checkpoint."""
    from paddle_scorer.process.environment import paddle

    pd = paddle()
    pd.set_device(plan.policy.device)
    mp = plan.model
    config = mp.library.load_config(mp.info, mp.folder, plan.policy.dtype, num_layers)
    model = mp.library.build_skeleton(mp.info, config)
    keep = None if num_layers is None else {None, *range(num_layers)}
    params = check_names(plan, model, str(mp.folder), only_layers=keep)

    names = [n for n in mp.conversion.tensors if keep is None or layer_index(n) in keep]
    merge_pairs = plan.merged_pairs or None
    set_params(plan, params, names, plan.policy.dtype, merge_pairs)
    model.eval()
    return model, config


def read_family(plan: LoadPlan) -> dict[str, np.ndarray]:
    """Every runtime tensor of a family model (:mod:`paddle_scorer.model.families`) in float32, NaN/inf refused, the
    adapter merged in when the mode is merge. Read a layer at a time, so an expert tensor stacked in one 3-D tensor is
    read once, not once per expert."""
    where = str(plan.model_dir)
    out: dict[str, np.ndarray] = {}
    merge_pairs = plan.merged_pairs or None
    for names in plan.model.conversion.layer_groups().values():
        arrays = {n: cast_or_refuse(n, a, "float32", where)
                  for n, a in plan.model.read(names, check=False, dtype="float32").items()}
        if merge_pairs:
            pairs = {m: ab for m, ab in merge_pairs.items() if m + ".weight" in arrays}
            merge_lora(arrays, pairs, plan.adapter.scaling, str(plan.lora_dir), out_dtype="float32",
                       magnitudes=plan.magnitudes)
        out.update({n: np.ascontiguousarray(a) for n, a in arrays.items()})
    return out


def attach_adapter(plan: LoadPlan, model, num_layers: int | None = None):
    """Wrap with the library's ``LoRAModel`` on exactly the adapted modules and set every lora_A/lora_B."""

    pairs = plan.attached_pairs
    if num_layers is not None:
        pairs = {m: ab for m, ab in pairs.items() if layer_index(m + ".") is None or layer_index(m + ".") < num_layers}
    dtype = plan.policy.dtype
    lora_model = plan.model.library.attach_lora(model, list(pairs), plan.adapter.settings, dtype)
    params = lora_model.model.state_dict()
    created = {k.rsplit(".", 1)[0] for k in params if k.endswith(".lora_A")}
    problems = [f"{m}: LoRAModel created no LoRA layer here" for m in sorted(set(pairs) - created)]
    problems += [f"{m}: LoRA layer created without adapter weights" for m in sorted(created - set(pairs))]
    if problems:
        raise WeightMismatchError(f"{plan.lora_dir}: attaching the adapter failed:", problems)
    for module, (a, b) in pairs.items():
        params[module + ".lora_A"].set_value(to_paddle_array(a, dtype))
        params[module + ".lora_B"].set_value(to_paddle_array(b, dtype))
    return lora_model


def facts_for(plan: LoadPlan, tok) -> LoadFacts:
    from paddle_scorer.process.environment import versions

    mp, ap = plan.model, plan.adapter
    return LoadFacts(
        model_path=str(mp.folder),
        adapter_path=str(ap.folder) if ap else None,
        adapter_sha256=ap.sha256 if ap else None,
        mode=plan.mode if ap else None,
        scaling=ap.scaling if ap else None,
        lora_r=ap.settings.r if ap else None,
        lora_alpha=ap.settings.lora_alpha if ap else None,
        rslora=ap.settings.rslora if ap else None,
        adapter_key_mapping=ap.mapping_note if ap else None,
        architecture=mp.info.architecture,
        num_params=mp.num_params,
        stored_dtypes=mp.info.weights.dtypes,
        adapter_stored_dtypes=ap.info.adapter_weights.dtypes if ap else None,
        policy=plan.policy.to_dict(),
        tokenizer_path=str(plan.tokenizer_dir),
        chat_template=bool(getattr(tok, "chat_template", None)),
        library=mp.library.name,
        library_version=versions((mp.library.distribution,)).get(mp.library.distribution),
        layout=mp.layout.to_dict(),
        execution=plan.memory.to_dict(),
        noop_adapter_allowed=bool(ap and ap.noop_allowed),
        notes=list(plan.notes) + (list(ap.settings.notes) if ap else [])
        + ([tok.paddle_scorer_note] if getattr(tok, "paddle_scorer_note", None) else []),
        tokenizer=tokenizer_facts(tok),
    )


def load_plan(plan: LoadPlan, num_layers: int | None = None) -> Loaded:
    """Materialise a plan. A streamed plan builds nothing here: :mod:`paddle_scorer.compute.streamed` reads layers as it scores."""
    from paddle_scorer.process.environment import paddle

    paddle()
    plan.model.library.check_device(plan.model.info, plan.policy.device)
    tok = load_tokenizer(plan)
    facts = facts_for(plan, tok)
    if plan.streamed:
        return Loaded(None, tok, facts, None, plan)
    if plan.model.library.native:
        return Loaded(None, tok, facts, None, plan, arrays=read_family(plan))
    model, config = build_model(plan, num_layers)
    if plan.attached_pairs:
        model = attach_adapter(plan, model, num_layers)
    return Loaded(model, tok, facts, config, plan)


def load(
    model: str | Path | None = None,
    lora: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    mode: str = "attach",
    tokenizer: str | Path | None = None,
    memory_limit: int | None = None,
    allow_noop_adapter: bool = False,
    execution: str = "in-ram",
) -> Loaded:
    """Load a model (and adapter) for scoring: :func:`make_plan` then :func:`load_plan`.

    ``execution``: ``in-ram`` (default for the library call: a model object you can run), ``auto``
    (stream when it does not fit, as ``classify`` does) or ``streamed``.
    """
    plan = make_plan(model, lora, device=device, dtype=dtype, mode=mode, tokenizer=tokenizer,
                     memory_limit=memory_limit, allow_noop_adapter=allow_noop_adapter, execution=execution)
    return load_plan(plan)


# --------------------------------------------------------------------------------------------------
# Streaming: the checks and the one-layer template model (compute/streamed.py runs it layer by layer)
# --------------------------------------------------------------------------------------------------


def to_template(name: str, layer: int) -> str:
    """``llama.layers.7.mlp.up_proj.weight`` -> ``llama.layers.0.mlp.up_proj.weight`` (the template layer)."""
    return name.replace(f"layers.{layer}.", "layers.0.", 1)


@dataclass
class StreamTemplate:
    """What a streamed run needs from the checkpoint: each layer's runtime tensor names, those outside the layers
    (embedding, final norm, head), and a one-layer model whose parameters are set from each layer in turn."""

    num_layers: int
    layer_names: dict[int, list[str]]
    outside: list[str]
    config: Any
    model: Any
    tied: dict[str, list[str]]
    embed_name: str
    norm_names: list[str]
    head_names: list[str]


def _layer_groups(plan: LoadPlan) -> tuple[dict[int, list[str]], list[str]]:
    """Runtime tensor names per decoder layer, and outside the layers; layers that config.json does not have, or
    tensors of layers it does not say, are refused."""
    mp = plan.model
    n = mp.num_layers
    groups = mp.conversion.layer_groups()
    missing = [i for i in range(n) if i not in groups]
    if missing or set(k for k in groups if k is not None) - set(range(n)):
        found = sorted(k for k in groups if k is not None)
        raise CheckpointError(
            f"{mp.folder}: cannot stream this checkpoint layer by layer: config.json says "
            f"{n} decoder layers but the tensors name layers {found[:3]}...{found[-3:] if found else ''} "
            f"({'missing ' + str(missing[:5]) if missing else 'extra layers'}); the key layout is unexpected."
        )
    return {i: groups[i] for i in range(n)}, groups.get(None, [])


def _template_problems(plan: LoadPlan, layer_names: dict, outside: list[str], shapes: dict, tied: dict) -> list[str]:
    """Every template parameter fed from the checkpoint (layer 0's names stand for every layer's), shapes equal,
    and every tensor outside the layers present (or tied to one that is)."""
    mp = plan.model
    problems = []
    want = {n for n in shapes if layer_index(n) == 0}
    for i, names in layer_names.items():
        got = {to_template(n, i) for n in names}
        if got != want:
            problems.append(f"layer {i}: tensors {sorted(got ^ want)[:4]} do not match the model's layer")
            break
        for n in names:
            if tuple(mp.conversion.tensors[n].shape) != shapes[to_template(n, i)]:
                problems.append(f"{n}: checkpoint shape {mp.conversion.tensors[n].shape} != model shape "
                                f"{shapes[to_template(n, i)]}")
    tied_names = {n for g in tied.values() for n in g}
    for n in sorted({n for n in shapes if layer_index(n) is None} - set(outside)):
        if n in tied_names and any(n in g and set(g) & set(outside) for g in tied.values()):
            continue
        problems.append(f"{n}: missing from the checkpoint")
    return problems


def streaming_template(plan: LoadPlan) -> StreamTemplate:
    """The checks a streamed run needs before it reads a layer (the same strictness as :func:`check_names`) and its
    one-layer template model (declared, not initialised)."""
    mp = plan.model
    layer_names, outside = _layer_groups(plan)
    config = mp.library.load_config(mp.info, mp.folder, plan.policy.dtype, num_layers=1)
    model = mp.library.build_skeleton(mp.info, config)
    _, shapes, tied = expected_params(model)
    problems = _template_problems(plan, layer_names, outside, shapes, tied)
    if problems:
        raise WeightMismatchError(f"{mp.folder}: the weights do not match the model built from config.json:",
                                  problems, "Check that config.json and the weights come from the same model.")
    if plan.attached_pairs:
        outside_pairs = [m for m in plan.attached_pairs if layer_index(m + ".") is None]
        if outside_pairs:
            raise CheckpointError(f"{plan.lora_dir}: adapters outside the decoder layers ({outside_pairs[0]}) "
                                  "cannot be streamed attached; pass --mode merge.")
    norm_names = [n for n in outside if "norm" in n]
    embed = next((n for n in outside if "embed_tokens" in n or "word_embeddings" in n), None)
    if embed is None:
        raise CheckpointError(f"{mp.folder}: no embedding table (embed_tokens) among the tensors outside the "
                              "decoder layers; cannot stream this checkpoint.")
    heads = [n for n in outside if n not in norm_names and n != embed]
    return StreamTemplate(mp.num_layers, layer_names, outside, config, model, tied, embed, norm_names, heads)
