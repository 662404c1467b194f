"""`smoke`: will this GPU job work, and will it fit? Answered on a CPU in minutes.

A short sequence of checks over the one load plan and the real scoring path, each a PASS / FAIL /
WARN / INFO / SKIP line (the CLI prints them; ``--json`` gives them as data):

1. the plan — model folder, adapter folder, adapter against the base (the loader's own checks and
   messages), tokenizer, chat template;
2. the data — labels and template against **every** input record through the real prompt path
   (:class:`~paddle_scorer.tasks.classify.LabelEncoder`, or the generator's prompter without labels);
3. memory — float32 on this machine's budget, float16/bfloat16 against ``--gpu-memory``
   (:mod:`paddle_scorer.tasks.smoke_estimates`);
4. real scores of ``--limit`` records with the real :class:`~paddle_scorer.tasks.classify.Classifier` — in
   RAM, or **streamed layer by layer** when the model does not fit (real probabilities either way):
   finite, summing to 1, JSON-serialisable records; attach vs merge on one record (in RAM); the time
   projected for the whole input from what was measured here;
5. the exact ``classify ... --device gpu --dtype ...`` command for the GPU run.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.tasks import smoke_estimates
from paddle_scorer.model import memory_budget
from paddle_scorer.model import folders
from paddle_scorer.checkpoint import sidecars
from paddle_scorer.model import load_plan as planning
from paddle_scorer.model.dtype_policy import resolve_policy
from paddle_scorer.errors import ScorerError, UsageError

PASS, FAIL, WARN, INFO, SKIP = "PASS", "FAIL", "WARN", "INFO", "SKIP"

DEFAULT_LIMIT = 5
ATTACH_MERGE_ATOL = 1e-4  # fp32: attach and merge agree to ~1e-6; more means a scaling or mapping bug
SUM_ATOL = 1e-6
SYNTHETIC_TEXT = "what is the price of cabbage today?"


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | WARN | INFO | SKIP
    detail: str


@dataclass
class MemoryRow:
    device: str
    dtype: str
    weights: int  # bytes of the weights alone
    needed: int  # with the margin the loader (CPU) or a GPU job needs
    available: int | None
    fits: bool | None
    note: str = ""


@dataclass
class SmokeOptions:
    model: Path | None
    lora: Path | None = None
    labels: str | list[str] | None = None  # "a,b" as typed, or a list; None: the adapter's (or model's) scorer.json
    template: str | None = None
    label_prefix: str | None = None
    input: Path | None = None
    limit: int = DEFAULT_LIMIT
    gpu_memory: int | None = None  # bytes
    memory_limit: int | None = None  # bytes; default: this machine's available RAM
    tokenizer: Path | None = None
    id_field: str = "id"


@dataclass
class SmokeResult:
    options: SmokeOptions
    model_dir: Path | None = None
    lora_dir: Path | None = None
    checks: list[Check] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    labels: list[str] | None = None
    records: list[dict] = field(default_factory=list)
    execution: str | None = None  # "in-ram" | "streamed" | None (not scored)
    projection: smoke_estimates.Projection | None = None
    attach_merge_delta: float | None = None
    gpu_dtype: str | None = None
    command: str | None = None
    synthetic: bool = False  # no --input: one made-up record, nothing to project

    def add(self, name: str, status: str, detail: str) -> Check:
        c = Check(name, status, detail)
        self.checks.append(c)
        return c

    @property
    def passed(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "model": str(self.model_dir) if self.model_dir else None,
            "lora": str(self.lora_dir) if self.lora_dir else None,
            "execution": self.execution,
            "checks": [asdict(c) for c in self.checks],
            "memory": [asdict(m) for m in self.memory],
            "projection": asdict(self.projection) if self.projection else None,
            "attach_merge_max_abs_logprob_delta": self.attach_merge_delta,
            "gpu_command": self.command,
        }


def _attempt(r: SmokeResult, name: str, fn, ok=None):
    """Run one check: PASS with ``ok(value)`` as detail, or FAIL with the error's own sentence."""
    try:
        value = fn()
    except ScorerError as exc:
        r.add(name, FAIL, str(exc))
        return None
    if ok is not None:
        r.add(name, PASS, ok(value))
    return value


# --------------------------------------------------------------------------------------------------
# The sequence
# --------------------------------------------------------------------------------------------------


def run(opts: SmokeOptions) -> SmokeResult:
    if opts.limit < 1:
        raise UsageError("--limit must be at least 1.")
    model_dir, lora_dir = folders.resolve_paths(opts.model, opts.lora)
    r = SmokeResult(opts, model_dir, lora_dir)

    # 1. the plan: the loader's own checks, one at a time so each failure is named
    mp = _attempt(r, "model folder", lambda: planning.plan_model(model_dir), lambda m: (
        f"{m.info.architecture or m.info.model_type}, {m.num_params:,} parameters stored as {m.stored_dtype} "
        f"({m.info.weights.format}, {len(m.info.weights.files)} file(s)); {m.layout.description}; built by {m.library.name}"))
    ap = None
    if lora_dir is not None:
        linfo = _attempt(r, "adapter folder", lambda: _adapter_folder(lora_dir), lambda i: (
            f"{i[1].describe()}, {i[0].adapter.adapted_modules} adapted modules"))
        if linfo is not None and linfo[0].kind == ckpt.RENAMED_ADAPTER:
            name = Path(linfo[0].adapter_weights.files[0]).name
            r.add("adapter file name", WARN,
                  f"the adapter weights are in {name} (a renamed lora_model_state.pdparams): paddle-scorer reads them, "
                  "but PaddleNLP's LoRAModel.from_pretrained would silently create an empty adapter; rename the file "
                  "back to lora_model_state.pdparams.")
        if linfo is not None and mp is not None:
            ap = _attempt(r, "adapter fits base", lambda: planning.plan_adapter(lora_dir, mp, info=linfo[0]),
                          lambda a: f"{len(a.pairs)} modules, shapes match the base with r={a.settings.pair_rank}, all values "
                                    "finite, not a no-op" + (f"; {a.mapping_note}" if a.mapping_note else ""))
    plan = None
    gpu_only = mp.library.arch_for(mp.info).gpu_only if mp is not None else None
    if gpu_only:
        r.add("CPU run", WARN, f"{mp.info.architecture} cannot run on CPU ({gpu_only}): the folders, tokenizer, data "
                               "and memory are checked here, the scores only by the GPU run below")
    if mp is not None and (lora_dir is None or ap is not None):
        plan = _attempt(r, "memory budget", lambda: planning.assemble(
            mp, ap, device="cpu", dtype="float32", tokenizer=opts.tokenizer, memory_limit=opts.memory_limit,
            check_device=not gpu_only))
    tok = _tokenizer(r, plan) if plan is not None else None

    # 2. the data, every record through the real prompt path
    items = _data(r, opts, mp, lora_dir, tok, plan)

    # 3. memory
    if mp is not None:
        _memory(r, opts, mp, plan)

    # 4. real scores
    blocking = [c for c in r.checks if c.status == FAIL and c.name != "fits on GPU"]  # the CPU run still works
    if gpu_only:
        r.add("score", SKIP, "not run: this model cannot run on CPU (see 'CPU run')")
    elif plan is not None and tok is not None and items is not None and not blocking:
        _score(r, plan, items)
    else:
        r.add("score", SKIP, "not run: fix the FAILs above first")

    # 5. the GPU command
    if mp is not None and r.gpu_dtype is not None:
        model = model_dir if opts.model is not None or lora_dir is None else None
        r.command = smoke_estimates.gpu_command(model, lora_dir, dtype=r.gpu_dtype, labels=r.labels,
                                          template=opts.template, label_prefix=opts.label_prefix, input=opts.input,
                                          tokenizer=opts.tokenizer)
    return r


def _adapter_folder(lora_dir: Path):
    info = ckpt.describe(lora_dir)
    return info, folders.check_adapter_folder(info)


def _tokenizer(r: SmokeResult, plan):
    from paddle_scorer.model.loader import load_tokenizer
    from paddle_scorer.process.environment import paddle

    paddle()  # CPU knobs set and the library quietened before the tokenizer imports it
    tok = _attempt(r, "tokenizer", lambda: load_tokenizer(plan), lambda t: (
        f"{type(t).__name__} from {plan.tokenizer_dir}, {len(t)} tokens "
        f"(model vocab_size {plan.model.info.config.get('vocab_size', '?')})"))
    if tok is not None:
        chat = bool(getattr(tok, "chat_template", None))
        r.add("chat template", INFO, "present: classify wraps prompts in it (turn off with --no-chat-template)"
              if chat else "none: prompts are scored as written")
    return tok


def _defaults(mp, lora_dir) -> dict:
    return sidecars.scorer_defaults(mp.folder if mp else None, lora_dir)


def _data(r: SmokeResult, opts: SmokeOptions, mp, lora_dir, tok, plan):
    """Labels, template and every input record through the real prompt path; returns prepared items."""
    from paddle_scorer import jsonio
    from paddle_scorer.tasks.generate import GenerateOptions, prompter_for
    from paddle_scorer.tasks.prompts import parse_labels, template_fields
    from paddle_scorer.tasks.classify import ClassifyOptions, LabelEncoder

    defaults = _defaults(mp, lora_dir)
    template = opts.template if opts.template is not None else defaults.get("template")
    prefix = opts.label_prefix if opts.label_prefix is not None else defaults.get("label_prefix", " ")
    spec = opts.labels if opts.labels is not None else defaults.get("labels")
    if spec is None:
        r.add("labels", WARN, "no --labels and no scorer.json with labels: checking next-token distributions instead "
                              "of label probabilities; pass --labels A,B to check classification.")
    else:
        r.labels = _attempt(r, "labels", lambda: parse_labels(spec, prefix), lambda labs: (
            f"{', '.join(labs)} (from {'--labels' if opts.labels is not None else 'scorer.json'})"))
        if r.labels is None:
            return None
    if opts.input is None:
        fields = template_fields(template) if template else ["query"]
        rows = [("smoke-0", {f: SYNTHETIC_TEXT for f in fields}, "the synthetic smoke record")]
        r.add("input", INFO, f"no --input: one synthetic record ({', '.join(fields)} = {SYNTHETIC_TEXT!r}); pass "
                             "--input data.jsonl to check your data and project the run's time")
    else:
        rows = _attempt(r, "input", lambda: jsonio.read_jsonl(opts.input, opts.id_field),
                        lambda rs: f"{opts.input}: {len(rs)} records")
        if rows is None:
            return None
    if tok is None:
        return None
    context = plan.model.info.config.get("max_position_embeddings")
    try:
        if r.labels:
            enc = LabelEncoder(tok, ClassifyOptions(labels=r.labels, template=template, label_prefix=prefix), context)
            items = [enc.prepare(rec, rid, where) for rid, rec, where in rows]  # bad record 90,000 fails here
            toks = ", ".join(f"{lab}: {len(ids)} token(s)" for lab, ids in zip(r.labels, items[0].label_ids))
            longest = max(len(p.context) + max(len(x) for x in p.label_ids) for p in items)
            chat = enc.use_chat
        else:
            prompter = prompter_for(tok, GenerateOptions(template=template), context)
            items = [_Prompt(rid, prompter.prompt_ids(rec, where, following=1)[1]) for rid, rec, where in rows]
            toks, longest, chat = "next-token distribution", max(len(p.context) for p in items), prompter.use_chat
    except ScorerError as exc:
        r.add("prompts", FAIL, str(exc))
        return None
    r.add("prompts", PASS, f"{len(items)} record(s) templated and tokenised" + (" with the chat template" if chat else "")
          + f"; {toks}; longest prompt+label {longest} of {context or '?'} tokens")
    r.synthetic = opts.input is None
    return items


@dataclass
class _Prompt:
    id: object
    context: list[int]


def _memory(r: SmokeResult, opts: SmokeOptions, mp, plan) -> None:
    n = mp.num_params
    stored = mp.stored_dtype
    r.gpu_dtype = resolve_policy("gpu:0", "auto", stored, smoke_estimates.ASSUMED_GPU, mp.info.config_dtype).dtype
    if plan is not None:
        m = plan.memory
        fits = m.execution == memory_budget.IN_RAM
        r.memory.append(MemoryRow("CPU", "float32", 4 * n, m.in_ram_need, m.budget, fits,
                                  "in RAM" if fits else "streamed layer by layer"))
        if fits:
            r.add("fits in RAM", PASS, f"about {memory_budget.fmt_bytes(m.in_ram_need)} <= {memory_budget.fmt_bytes(m.budget)} "
                                       f"({m.budget_source}): loaded in RAM")
        else:
            r.add("fits in RAM", INFO, f"about {memory_budget.fmt_bytes(m.in_ram_need)} > {memory_budget.fmt_bytes(m.budget)} "
                                       f"({m.budget_source}): classify streams it layer by layer (exact, slower); the "
                                       "scores below are the full model's, streamed")
    need = smoke_estimates.gpu_memory_needed(n, r.gpu_dtype)
    gpu_fits = None if opts.gpu_memory is None else need <= opts.gpu_memory
    r.memory.append(MemoryRow("GPU", r.gpu_dtype, (2 if r.gpu_dtype != "float32" else 4) * n, need, opts.gpu_memory,
                              gpu_fits, "weights x1.2 + 1 GB CUDA context (estimate)"))
    if opts.gpu_memory is None:
        r.add("fits on GPU", INFO, f"needs about {memory_budget.fmt_bytes(need)} in {r.gpu_dtype}; pass --gpu-memory 80GB to check")
    elif gpu_fits:
        r.add("fits on GPU", PASS, f"about {memory_budget.fmt_bytes(need)} in {r.gpu_dtype} <= {memory_budget.fmt_bytes(opts.gpu_memory)}")
    else:
        r.add("fits on GPU", FAIL, f"needs about {memory_budget.fmt_bytes(need)} in {r.gpu_dtype} but the GPU has "
                                   f"{memory_budget.fmt_bytes(opts.gpu_memory)}: use a GPU with more memory, or split the model "
                                   "over several GPUs with PaddleNLP's tensor parallelism.")


def _score(r: SmokeResult, plan, items: list) -> None:
    from paddle_scorer.model.loader import load_plan

    r.execution = plan.memory.execution
    t0 = time.perf_counter()
    loaded = _attempt(r, "load", lambda: load_plan(plan), lambda _: (
        f"float32 on CPU, {'in RAM' if not plan.streamed else 'streamed layer by layer'}"
        f"{'; adapter ' + plan.mode + 'ed' if plan.adapter else ''}"))
    if loaded is None:
        return
    r.checks[-1].detail += f"; {time.perf_counter() - t0:.1f}s"
    n = min(r.options.limit, len(items))
    try:
        scorer = _Scorer(loaded, r.labels, items)
        t1 = time.perf_counter()
        scorer.score(items[:1])  # warm-up (in RAM) / the 1-record block (streamed)
        one = time.perf_counter() - t1
        t1 = time.perf_counter()
        outputs = scorer.score(items[:n])
        seconds = time.perf_counter() - t1
    except ScorerError as exc:
        r.add("score", FAIL, str(exc))
        return
    r.records = outputs
    how = "streamed (every layer read once for the block)" if plan.streamed else "in RAM"
    r.add("score", PASS, f"{n} record(s) through the real {scorer.what}, {how}, in {seconds:.3f}s "
                         f"({seconds / n * 1000:.1f} ms/record)")
    r.checks += scorer.checks(outputs)
    if not r.synthetic:
        if plan.streamed:
            width = max(len(p.context) + sum(len(x) - 1 for x in getattr(p, "label_ids", [[0]])) for p in items)
            block = scorer.backend.block_size_for(width, len(items))
            p = r.projection = smoke_estimates.project_streamed(one, seconds, n, len(items), block)
            detail = (f"streamed: {p.seconds_per_block:.1f}s per block (every layer read once) + "
                      f"{p.seconds_per_record * 1000:.1f} ms/record; {len(items)} records in blocks of {block} = "
                      f"{smoke_estimates.fmt_duration(p.total_seconds)} on this CPU")
        else:
            p = r.projection = smoke_estimates.project(seconds, n, len(items))
            detail = (f"{p.seconds_per_record * 1000:.1f} ms/record measured x {p.total_records} records = "
                      f"{smoke_estimates.fmt_duration(p.total_seconds)} on this CPU in float32")
        r.add("projected time", INFO, detail + f" ({smoke_estimates.fmt_duration(p.remaining_seconds)} for the "
                                               f"{p.remaining_records} not yet scored); a GPU is typically much faster")
        if plan.streamed and not r.labels and getattr(scorer.backend, "fast", None) is not None:
            _generate_projection(r, plan, scorer.backend, items, one)
    if plan.adapter is None:
        r.add("attach vs merge", SKIP, "no adapter")
        return
    if plan.streamed:
        r.add("attach vs merge", SKIP, "not compared for a streamed model (it would read every layer again); the "
                                       "streamed path merges or attaches per layer with the same math")
        return
    first = items[:1]
    attached = scorer.values(outputs[:1])
    del loaded, scorer
    gc.collect()  # two full models need not fit at once
    try:
        other = _Scorer(load_plan(_with_mode(plan, "merge" if plan.mode == "attach" else "attach")), r.labels, first)
        delta = float(np.max(np.abs(attached - other.values(other.score(first)))))
    except ScorerError as exc:
        r.add("attach vs merge", FAIL, str(exc))
        return
    r.attach_merge_delta = delta
    ok = delta <= ATTACH_MERGE_ATOL
    r.add("attach vs merge", PASS if ok else FAIL,
          f"max |delta log-prob| on record {first[0].id!r} = {delta:.2e} "
          + (f"(<= {ATTACH_MERGE_ATOL:g})" if ok else f"(> {ATTACH_MERGE_ATOL:g}: the merged and attached adapter "
             "disagree; check lora_alpha, r and rslora in lora_config.json)"))


def _with_mode(plan, mode: str):
    import dataclasses

    return dataclasses.replace(plan, mode=mode)


GENERATE_NEW_TOKENS = 20  # generate's default --max-new-tokens: what the projection assumes


def _generate_projection(r: SmokeResult, plan, backend, items: list, pass_seconds: float) -> None:
    """generate past RAM on this data: blocks of records sized by their KV caches, a pass over the layers per step (the
    1-record block just measured is one pass)."""
    width = max(len(p.context) for p in items) + GENERATE_NEW_TOKENS
    block = memory_budget.decode_rows(plan.memory, backend.kv_bytes_per_token(), width, len(items))
    if block < 1:
        r.add("generate past RAM", WARN, f"one record of {width} tokens (prompt + {GENERATE_NEW_TOKENS} new) keeps more "
                                         "keys and values than the budget leaves: generate would refuse; shorten the "
                                         "prompts or --max-new-tokens, or raise --memory-limit")
        return
    total = smoke_estimates.project_streamed_generate(pass_seconds, len(items), block, GENERATE_NEW_TOKENS)
    r.add("generate past RAM", INFO, f"{pass_seconds:.2f}s per pass over the layers (measured); {len(items)} records in "
                                     f"blocks of {block} x {GENERATE_NEW_TOKENS} passes (--max-new-tokens "
                                     f"{GENERATE_NEW_TOKENS}) = {smoke_estimates.fmt_duration(total)} on this CPU")


class _Scorer:
    """The real Classifier (with labels) or the real backend's next-token distribution (without)."""

    def __init__(self, loaded, labels, items):
        from paddle_scorer.compute.choose_backend import backend_for
        from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

        self.labels = labels
        if labels:
            self.clf = Classifier(loaded, ClassifyOptions(labels=labels))
            self.backend = self.clf.backend
            self.what = "classify path"
        else:
            self.backend = backend_for(loaded)
            self.what = "next-token path"

    def score(self, items) -> list[dict]:
        if self.labels:
            return self.clf.score(items)
        lp = self.backend.next_token_logprobs([p.context for p in items]).astype(np.float64)
        return [{"id": p.id, "next_token_logprobs": row} for p, row in zip(items, lp)]

    def values(self, outputs) -> np.ndarray:
        if self.labels:
            return np.array([[o["logprobs"][lab] for lab in self.labels] for o in outputs])
        return np.stack([o["next_token_logprobs"] for o in outputs])

    def checks(self, outputs) -> list[Check]:
        if self.labels:
            bad = [repr(o["id"]) for o in outputs
                   if not all(math.isfinite(v) for v in [*o["probs"].values(), *o["logprobs"].values()])]
            sums = [sum(o["probs"].values()) for o in outputs]
            what = "label probability and log-probability"
        else:
            bad = [repr(o["id"]) for o in outputs if not np.isfinite(o["next_token_logprobs"]).all()]
            sums = [float(np.exp(o["next_token_logprobs"]).sum()) for o in outputs]
            what = "next-token log-probability"
        out = [Check("probabilities finite", FAIL, f"non-finite values in {', '.join(bad[:5])}: check the weights "
                                                   "(NaN/inf) and the dtype.") if bad else
               Check("probabilities finite", PASS, f"every {what} is finite")]
        worst = max((abs(s - 1.0) for s in sums), default=0.0)
        out.append(Check("probabilities sum to 1", PASS, f"max |sum - 1| = {worst:.1e} over {len(sums)} record(s)")
                   if worst <= SUM_ATOL else
                   Check("probabilities sum to 1", FAIL, f"max |sum - 1| = {worst:.1e} (> {SUM_ATOL:g}): the output is "
                                                         "not a distribution; report this as a bug."))
        if self.labels:
            try:
                back = [json.loads(json.dumps(o, ensure_ascii=False)) for o in outputs]
                missing = sorted({k for o in back for k in ("id", "prediction", "probs", "logprobs", "label_token_ids")
                                  if k not in o})
                out.append(Check("output records", FAIL, f"records lack {', '.join(missing)}; report this as a bug.")
                           if missing else Check("output records", PASS, "JSON lines with id, prediction, probs, "
                                                                         "logprobs, label_token_ids"))
            except (TypeError, ValueError) as exc:
                out.append(Check("output records", FAIL, f"a record is not JSON-serialisable ({exc}); report this as a bug."))
        return out
