"""`smoke`: will this GPU job work, and will it fit? Answered on a CPU in minutes.

Two phases, each returning plain data (the CLI prints it):

1. :func:`preflight` reads no model weights into paddle: the checkpoint and adapter checks the
   loader runs (shared functions, same messages), the adapter validated against the base's tensor
   shapes, tokenizer and chat template, labels and template against the input, and the memory the
   model needs per device and dtype against this machine's RAM and a given GPU's memory.
2. :func:`exercise` loads the model in float32 and scores a few records with the real
   :class:`~paddle_scorer.scoring.Classifier`: probabilities finite and summing to 1, attach vs
   merge on one record, measured time per record and the projection for the whole dataset. When
   the model does not fit in RAM it loads only the embeddings, the first one or two decoder layers,
   the final norm and the LM head (real tensors, the adapter attached for those layers): a
   *pipeline* check of tokenisation, adapter, template and output path, never a quality check.

Without labels (no ``--labels``, no ``scorer.json``) the scoring checks read the next-token
distribution instead (finite, sums to 1), and the GPU command is a ``generate`` command.
"""

from __future__ import annotations

import gc
import json
import math
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from paddle_scorer import checkpoint as ckpt
from paddle_scorer.dtype_policy import GpuInfo, resolve_policy
from paddle_scorer.errors import CheckpointError, ScorerError, UsageError

PASS, FAIL, WARN, INFO, SKIP = "PASS", "FAIL", "WARN", "INFO", "SKIP"

DEFAULT_LIMIT = 5
PARTIAL_LAYERS = (2, 1)  # tried in this order when the whole model does not fit in RAM
ATTACH_MERGE_ATOL = 1e-4  # fp32: attach and merge agree to ~1e-6; more means a scaling or mapping bug
SUM_ATOL = 1e-6
GPU_ACTIVATION_FACTOR = 1.2  # weights x 1.2 for activations and KV cache at moderate batch sizes
GPU_CONTEXT_BYTES = 1 << 30  # the CUDA context and paddle's allocator reserve, about 1 GB
# An Ampere-or-newer GPU is assumed for the dtype choice (bfloat16 where the checkpoint is not fp16).
ASSUMED_GPU = GpuInfo(True, 1, (8, 0), "an Ampere-or-newer GPU")
SYNTHETIC_TEXT = "what is the price of cabbage today?"

_UNITS = {"": 1024**3, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"80GB"``, ``"80 GiB"``, ``"512MB"``, ``"80"`` (GB) -> bytes. Units are powers of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise UsageError(f"{text!r} is not a memory size; write it like 80GB, 24GiB or 512MB.")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{text!r} is not a positive memory size; write it like 80GB.")
    return size


@dataclass
class Projection:
    """Time for the whole dataset, from the time measured on the smoke records (this machine, fp32)."""

    measured_records: int
    measured_seconds: float
    seconds_per_record: float
    total_records: int
    remaining_records: int
    remaining_seconds: float
    total_seconds: float


def project(measured_seconds: float, measured_records: int, total_records: int) -> Projection:
    """Seconds per record measured here x records: the full run's time on this machine."""
    if measured_records <= 0:
        raise ValueError("nothing was measured")
    per = measured_seconds / measured_records
    remaining = max(0, total_records - measured_records)
    return Projection(measured_records, measured_seconds, per, total_records, remaining,
                      per * remaining, per * total_records)


def gpu_memory_needed(num_params: int, dtype: str) -> int:
    """Bytes a GPU needs for a model of ``num_params`` in ``dtype`` (weights + activations + context)."""
    size = 4 if dtype == "float32" else 2
    return int(num_params * size * GPU_ACTIVATION_FACTOR) + GPU_CONTEXT_BYTES


def gpu_command(model: Path | None, lora: Path | None, *, dtype: str, labels: list[str] | None,
                template: str | None, label_prefix: str | None, input: Path | None,
                tokenizer: Path | None = None) -> str:
    """The exact command for the GPU run (classify with labels, else generate).

    ``model`` None: the adapter's lora_config.json names the base, and classify finds it the same way.
    """
    q = shlex.quote
    parts = ["paddle-scorer", "classify" if labels else "generate"]
    if model is not None:
        parts += ["--model", q(str(model))]
    if lora is not None:
        parts += ["--lora", q(str(lora))]
    if tokenizer is not None:
        parts += ["--tokenizer", q(str(tokenizer))]
    if labels:
        parts += ["--labels", q(",".join(labels))]
    if template is not None:
        parts += ["--template", q(template)]
    if label_prefix is not None and labels:
        parts += ["--label-prefix", q(label_prefix)]
    kind = "scores" if labels else "traces"
    output = f"out/{input.stem}.{kind}.jsonl" if input is not None else f"out/{kind}.jsonl"
    parts += ["--input", q(str(input)) if input is not None else "YOUR_DATA.jsonl", "--output", q(output)]
    parts += ["--device", "gpu", "--dtype", dtype]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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
    labels: list[str] | None = None  # None: the adapter's (or model's) scorer.json
    template: str | None = None
    label_prefix: str | None = None
    input: Path | None = None
    limit: int = DEFAULT_LIMIT
    gpu_memory: int | None = None  # bytes
    memory_limit: int | None = None  # bytes; default: this machine's available RAM
    tokenizer: Path | None = None
    id_field: str = "id"


class _Checks:
    """A list of checks with an ``add`` helper."""

    checks: list

    def add(self, name: str, status: str, detail: str) -> Check:
        c = Check(name, status, detail)
        self.checks.append(c)
        return c


@dataclass
class Preflight(_Checks):
    options: SmokeOptions
    model_dir: Path
    lora_dir: Path | None
    checks: list[Check] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    model_info: ckpt.CheckpointInfo | None = None
    lora_info: ckpt.CheckpointInfo | None = None
    labels: list[str] | None = None
    template: str | None = None
    template_given: bool = False
    label_prefix: str = " "
    rows: list[tuple] = field(default_factory=list)  # (id, record, where) from the input
    synthetic_input: bool = False
    gpu_dtype: str | None = None
    fits_in_ram: bool = False
    partial_layers: int | None = None  # set when only a partial load fits
    ready: bool = False  # the checkpoint checks passed: the model may be loaded


@dataclass
class Exercise(_Checks):
    path: str  # "full" | "partial" | "none"
    checks: list[Check] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    projection: Projection | None = None
    attach_merge_delta: float | None = None
    layers: int | None = None


@dataclass
class SmokeResult:
    preflight: Preflight
    exercise: Exercise
    command: str | None

    @property
    def all_checks(self) -> list[Check]:
        return self.preflight.checks + self.exercise.checks

    @property
    def passed(self) -> bool:
        return not any(c.status == FAIL for c in self.all_checks)

    def to_dict(self) -> dict:
        pre, ex = self.preflight, self.exercise
        return {
            "passed": self.passed,
            "model": str(pre.model_dir),
            "lora": str(pre.lora_dir) if pre.lora_dir else None,
            "path": ex.path,
            "partial_layers": ex.layers,
            "checks": [asdict(c) for c in self.all_checks],
            "memory": [asdict(m) for m in pre.memory],
            "projection": asdict(ex.projection) if ex.projection else None,
            "attach_merge_max_abs_logprob_delta": ex.attach_merge_delta,
            "gpu_command": self.command,
        }


# --------------------------------------------------------------------------------------------------
# 1. Preflight
# --------------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _runtime():
    from paddle_scorer.runtime import paddle

    return paddle()


def _fits_cpu(num_params: int, limit: int | None) -> bool:
    """Exactly the loader's own memory rule (so smoke never promises a load the loader refuses)."""
    from paddle_scorer.loader import check_memory

    try:
        check_memory(num_params, "float32", "cpu", limit)
    except CheckpointError:
        return False
    return True


def preflight(opts: SmokeOptions) -> Preflight:
    """Everything that can be checked without loading the model into paddle."""
    from paddle_scorer import loader
    from paddle_scorer.weights import read_files_meta

    if opts.limit < 1:
        raise UsageError("--limit must be at least 1.")
    model_dir, lora_dir = loader.resolve_paths(opts.model, opts.lora)
    pre = Preflight(opts, model_dir, lora_dir)

    # ---- checkpoint folders: the loader's own checks and messages -------------------------------
    model_ok = lora_ok = False
    try:
        info = ckpt.describe(model_dir)
        pre.model_info = info
        loader.check_model_folder(info)
        w = info.weights
        pre.add("model folder", PASS,
                f"{info.architecture or info.model_type}, {w.num_params:,} parameters stored as "
                f"{loader.dominant_dtype(w.dtypes)} ({w.format}, {len(w.files)} file(s))")
        model_ok = True
    except ScorerError as exc:
        pre.add("model folder", FAIL, str(exc))
    settings = None
    if lora_dir is not None:
        try:
            linfo = ckpt.describe(lora_dir)
            pre.lora_info = linfo
            settings = loader.check_adapter_folder(linfo)
            pre.add("adapter folder", PASS,
                    f"LoRA r={settings.r}, lora_alpha={settings.lora_alpha:g}, scaling {settings.scaling:g} "
                    f"({settings.scaling_formula}), {linfo.adapter.adapted_modules} adapted modules")
            lora_ok = True
            if linfo.kind == ckpt.RENAMED_ADAPTER:
                name = Path(linfo.adapter_weights.files[0]).name
                pre.add("adapter file name", WARN,
                        f"the adapter weights are in {name} (a renamed lora_model_state.pdparams): paddle-scorer reads "
                        "them, but PaddleNLP's LoRAModel.from_pretrained would silently create an empty adapter; "
                        "rename the file back to lora_model_state.pdparams.")
        except ScorerError as exc:
            pre.add("adapter folder", FAIL, str(exc))

    metas = {}
    if model_ok:
        try:
            metas = read_files_meta([Path(f) for f in pre.model_info.weights.files])
        except ScorerError as exc:
            pre.add("model weights", FAIL, str(exc))
            model_ok = False
    if model_ok and lora_ok:
        try:
            adapter = loader.read_weights(pre.lora_info.adapter_weights, "adapter", str(lora_dir))
            shapes = {k: tuple(m.shape) for k, m in metas.items()}
            pairs, note = loader.validate_adapter(adapter, shapes, settings, str(lora_dir))
            pre.add("adapter fits base", PASS,
                    f"{len(pairs)} modules, shapes match the base with r={settings.r}, all values finite"
                    + (f"; {note}" if note else ""))
        except ScorerError as exc:
            pre.add("adapter fits base", FAIL, str(exc))
            lora_ok = False

    # ---- tokenizer, chat template ----------------------------------------------------------------
    tok = None
    if model_ok:
        try:
            _runtime()  # CPU knobs set and paddlenlp quietened before the tokenizer imports paddlenlp
            tok_dir = loader.tokenizer_folder(model_dir, lora_dir, opts.tokenizer)
            tok = loader.load_tokenizer(tok_dir, pre.model_info.config.get("vocab_size"))
            pre.add("tokenizer", PASS, f"{type(tok).__name__} from {tok_dir}, {len(tok)} tokens "
                                       f"(model vocab_size {pre.model_info.config.get('vocab_size', '?')})")
            chat = bool(getattr(tok, "chat_template", None))
            pre.add("chat template", INFO, "present: classify wraps prompts in it (turn off with --no-chat-template)"
                    if chat else "none: prompts are scored as written")
        except ScorerError as exc:
            pre.add("tokenizer", FAIL, str(exc))

    # ---- labels, template, input ----------------------------------------------------------------
    _labels_and_input(pre, opts)

    # ---- memory ----------------------------------------------------------------------------------
    if model_ok:
        _memory(pre, opts, metas, settings)
    pre.ready = model_ok and (lora_dir is None or lora_ok) and tok is not None \
        and not any(c.status == FAIL for c in pre.checks if c.name in ("labels", "input"))
    return pre


def _labels_and_input(pre: Preflight, opts: SmokeOptions) -> None:
    from paddle_scorer import dataio
    from paddle_scorer.prompts import fill_template, parse_labels, template_fields

    defaults = {}
    for info in (pre.lora_info, pre.model_info):
        if info is not None and info.scorer_defaults:
            defaults = info.scorer_defaults
            break
    pre.template_given = opts.template is not None
    pre.template = opts.template if opts.template is not None else defaults.get("template")
    pre.label_prefix = opts.label_prefix if opts.label_prefix is not None else defaults.get("label_prefix", " ")
    spec = opts.labels if opts.labels is not None else defaults.get("labels")
    if spec is None:
        pre.add("labels", WARN, "no --labels and no scorer.json with labels: checking next-token distributions "
                                "instead of label probabilities; pass --labels A,B to check classification.")
    else:
        try:
            pre.labels = parse_labels(spec)
            src = "--labels" if opts.labels is not None else "scorer.json"
            pre.add("labels", PASS, f"{', '.join(pre.labels)} (from {src})")
        except UsageError as exc:
            pre.add("labels", FAIL, str(exc))

    if opts.input is None:
        fields = template_fields(pre.template) if pre.template else ["query"]
        pre.rows = [("smoke-0", {f: SYNTHETIC_TEXT for f in fields}, "the synthetic smoke record")]
        pre.synthetic_input = True
        pre.add("input", INFO, f"no --input: one synthetic record ({', '.join(fields)} = {SYNTHETIC_TEXT!r}); "
                               "pass --input data.jsonl to check your data and project the run's time")
        return
    try:
        pre.rows = dataio.read_jsonl(opts.input, opts.id_field)
        for _, rec, where in pre.rows:  # every record, so a bad line 90,000 fails here, not on the GPU
            fill_template(pre.template, rec, where)
        what = f"template fields {', '.join(template_fields(pre.template))}" if pre.template else "a query/prompt/text field"
        pre.add("input", PASS, f"{opts.input}: {len(pre.rows)} records, all with {what}")
    except UsageError as exc:
        pre.add("input", FAIL, str(exc))


def partial_params(metas: dict, layers: int) -> int:
    from paddle_scorer.loader import first_layers

    keep = first_layers(layers)
    return sum(m.numel for k, m in metas.items() if keep(k))


def _memory(pre: Preflight, opts: SmokeOptions, metas: dict, settings) -> None:
    from paddle_scorer.loader import available_memory, dominant_dtype

    info = pre.model_info
    n = info.weights.num_params
    have = opts.memory_limit if opts.memory_limit is not None else available_memory()
    src = "--memory-limit" if opts.memory_limit is not None else "available RAM"
    pre.fits_in_ram = _fits_cpu(n, opts.memory_limit)
    pre.memory.append(MemoryRow("CPU", "float32", 4 * n, int(4 * n * 1.1), have, pre.fits_in_ram,
                                "CPU computes in float32 only"))
    stored = dominant_dtype(info.weights.dtypes)
    pre.gpu_dtype = resolve_policy("gpu:0", "auto", stored, ASSUMED_GPU, info.config_dtype).dtype
    need = gpu_memory_needed(n, pre.gpu_dtype)
    gpu_fits = None if opts.gpu_memory is None else need <= opts.gpu_memory
    pre.memory.append(MemoryRow("GPU", pre.gpu_dtype,
                                (2 if pre.gpu_dtype != "float32" else 4) * n, need, opts.gpu_memory, gpu_fits,
                                "weights x1.2 + 1 GB CUDA context (estimate)"))
    if pre.fits_in_ram:
        pre.add("fits in RAM", PASS, f"float32 weights {_fmt_bytes(4 * n)} <= {_fmt_bytes(have)} ({src}): full load")
    else:
        for k in PARTIAL_LAYERS:
            total = info.config.get("num_hidden_layers") or 0
            if k <= total and _fits_cpu(partial_params(metas, k), opts.memory_limit):
                pre.partial_layers = k
                break
        if pre.partial_layers is None:
            pre.add("fits in RAM", FAIL,
                    f"float32 weights {_fmt_bytes(4 * n)} do not fit in {_fmt_bytes(have)} ({src}), and neither does a "
                    "partial load (embeddings, one decoder layer, final norm, LM head): run smoke on a machine with "
                    "more RAM.")
        else:
            k = pre.partial_layers
            pre.add("fits in RAM", WARN,
                    f"float32 weights {_fmt_bytes(4 * n)} do not fit in {_fmt_bytes(have)} ({src}): a partial load "
                    f"({k} of {info.config.get('num_hidden_layers')} decoder layers, "
                    f"{_fmt_bytes(4 * partial_params(metas, k))}) checks the pipeline, not the quality")
    if opts.gpu_memory is None:
        pre.add("fits on GPU", INFO, f"needs about {_fmt_bytes(need)} in {pre.gpu_dtype}; pass --gpu-memory 80GB to check")
    elif gpu_fits:
        pre.add("fits on GPU", PASS, f"about {_fmt_bytes(need)} in {pre.gpu_dtype} <= {_fmt_bytes(opts.gpu_memory)}")
    else:
        pre.add("fits on GPU", FAIL,
                f"needs about {_fmt_bytes(need)} in {pre.gpu_dtype} but the GPU has {_fmt_bytes(opts.gpu_memory)}: "
                "use a GPU with more memory, or split the model over several GPUs with PaddleNLP's tensor parallelism.")


# --------------------------------------------------------------------------------------------------
# 2. Exercise: load and score a few records
# --------------------------------------------------------------------------------------------------


def _load(pre: Preflight, mode: str, layers: int | None):
    from paddle_scorer.loader import load

    return load(pre.model_dir, pre.lora_dir, device="cpu", dtype="float32", mode=mode,
                tokenizer=pre.options.tokenizer, memory_limit=pre.options.memory_limit, layers=layers)


def exercise(pre: Preflight) -> Exercise:
    """Load (fully or partially) and run the real scoring path on a few records."""
    if not pre.ready:
        ex = Exercise("none")
        ex.add("scoring", SKIP, "not run: fix the FAILs above first")
        return ex
    if not pre.fits_in_ram and pre.partial_layers is None:
        ex = Exercise("none")
        ex.add("scoring", SKIP, "not run: not even a partial load fits in RAM")
        return ex
    layers = None if pre.fits_in_ram else pre.partial_layers
    ex = Exercise("full" if layers is None else "partial", layers=layers)
    if layers is not None:
        ex.checks.append(scan_finite(pre))  # the partial load reads only some tensors: scan them all
        if ex.checks[-1].status == FAIL:
            return ex
    total_layers = pre.model_info.config.get("num_hidden_layers")
    what = "float32 on CPU" if layers is None else \
        f"PARTIAL: embeddings + the first {layers} of {total_layers} decoder layers + final norm + LM head; " \
        "a pipeline check, not a quality check"
    t0 = time.perf_counter()
    try:
        loaded = _load(pre, "attach", layers)
    except ScorerError as exc:
        ex.add("load", FAIL, str(exc))
        return ex
    ex.add("load", PASS, f"{what}; {'adapter attached; ' if pre.lora_dir else ''}{time.perf_counter() - t0:.1f}s")

    runner = _LabelRunner(loaded, pre) if pre.labels else _NextTokenRunner(loaded, pre)
    try:
        runner.prepare()
    except ScorerError as exc:
        ex.add("prompts", FAIL, str(exc))
        return ex
    ex.add("prompts", PASS, runner.prepared_detail())
    n = min(pre.options.limit, len(runner.items))
    try:
        runner.score(runner.items[:1])  # warm-up, untimed (first-call allocations)
        t0 = time.perf_counter()
        outputs = runner.score(runner.items[:n])
        seconds = time.perf_counter() - t0
    except ScorerError as exc:
        ex.add("score", FAIL, str(exc))
        return ex
    ex.records = outputs
    ex.add("score", PASS, f"{n} record(s) through the real {runner.what} in {seconds:.3f}s "
                          f"({seconds / n * 1000:.1f} ms/record)")
    for check in runner.output_checks(outputs):
        ex.checks.append(check)
    if layers is None and not pre.synthetic_input:
        ex.projection = project(seconds, n, len(pre.rows))
        p = ex.projection
        ex.add("projected time", INFO,
               f"{p.seconds_per_record * 1000:.1f} ms/record measured x {p.total_records} records = "
               f"{_fmt_duration(p.total_seconds)} on this CPU in float32 ({_fmt_duration(p.remaining_seconds)} for "
               f"the {p.remaining_records} not yet scored); a GPU is typically much faster")
    elif layers is not None:
        ex.add("projected time", SKIP, "not projected: a partial model's speed says nothing about the full model's")

    if pre.lora_dir is not None:
        first = runner.items[:1]
        attached = runner.values(outputs[:1])
        del loaded, runner
        gc.collect()  # two full models need not fit at once
        try:
            merged = _load(pre, "merge", layers)
            mrunner = _LabelRunner(merged, pre) if pre.labels else _NextTokenRunner(merged, pre)
            mrunner.items = first
            delta = float(np.max(np.abs(attached - mrunner.values(mrunner.score(first)))))
        except ScorerError as exc:
            ex.add("attach vs merge", FAIL, str(exc))
            return ex
        ex.attach_merge_delta = delta
        ok = delta <= ATTACH_MERGE_ATOL
        ex.add("attach vs merge", PASS if ok else FAIL,
               f"max |delta log-prob| on record {first[0].id!r} = {delta:.2e} "
               + (f"(<= {ATTACH_MERGE_ATOL:g})" if ok else
                  f"(> {ATTACH_MERGE_ATOL:g}: the merged and attached adapter disagree; check lora_alpha, r and "
                  "rslora in lora_config.json)"))
    else:
        ex.add("attach vs merge", SKIP, "no adapter")
    return ex


def scan_finite(pre: Preflight) -> Check:
    """NaN/inf in every model tensor, one weights file in memory at a time."""
    from paddle_scorer.loader import available_memory, nonfinite
    from paddle_scorer.weights import iter_tensors

    files = [Path(f) for f in pre.model_info.weights.files]
    have = available_memory()  # the real RAM: the partial load itself reads each file whole, too
    biggest = max(files, key=lambda f: f.stat().st_size)
    if biggest.stat().st_size * 2 > have:  # the file's bytes and its arrays
        return Check("weights finite", SKIP, f"{biggest.name} ({_fmt_bytes(biggest.stat().st_size)}) is too big to read "
                                             "here in one piece, so the layers not loaded were not scanned for NaN/inf")
    bad, count = [], 0
    for name, arr in iter_tensors(files):
        bad += nonfinite({name: arr})
        count += 1
    if bad:
        return Check("weights finite", FAIL,
                     f"{pre.model_dir}: the model weights contain NaN/inf, so every score would be meaningless: "
                     f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Re-export the checkpoint from a healthy "
                     "training step.")
    return Check("weights finite", PASS, f"all {count} tensors scanned file by file (not only the loaded layers)")


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _finite_and_normalised(name: str, bad: list[str], sums: list[float]) -> list[Check]:
    checks = []
    if bad:
        checks.append(Check("probabilities finite", FAIL, f"non-finite values in {', '.join(bad[:5])}: "
                                                          "check the weights (NaN/inf) and the dtype."))
    else:
        checks.append(Check("probabilities finite", PASS, f"every {name} is finite"))
    worst = max((abs(s - 1.0) for s in sums), default=0.0)
    if worst <= SUM_ATOL:
        checks.append(Check("probabilities sum to 1", PASS, f"max |sum - 1| = {worst:.1e} over {len(sums)} record(s)"))
    else:
        checks.append(Check("probabilities sum to 1", FAIL, f"max |sum - 1| = {worst:.1e} (> {SUM_ATOL:g}): the output "
                                                            "is not a distribution; report this as a bug."))
    return checks


class _LabelRunner:
    """The classify path: Classifier.prepare / score, output records as classify writes them."""

    what = "classify path"

    def __init__(self, loaded, pre: Preflight):
        from paddle_scorer.scoring import Classifier, ClassifyOptions

        self.pre = pre
        self.clf = Classifier(loaded, ClassifyOptions(labels=pre.labels, template=pre.template,
                                                      label_prefix=pre.label_prefix))
        self.items: list = []

    def prepare(self) -> None:
        # Every record, as classify does before any forward pass: template, chat template, label
        # tokens and prompt length against the context are all checked here.
        self.items = [self.clf.prepare(rec, rid, where) for rid, rec, where in self.pre.rows]

    def prepared_detail(self) -> str:
        first = self.items[0]
        toks = ", ".join(f"{lab}: {len(ids)} token(s)" for lab, ids in zip(self.pre.labels, first.label_ids))
        longest = max(len(p.context) + max(len(x) for x in p.label_ids) for p in self.items)
        return (f"{len(self.items)} record(s) templated and tokenised"
                + (" with the chat template" if self.clf.use_chat else "")
                + f"; labels {toks}; longest prompt+label {longest} of {self.clf.max_length or '?'} tokens")

    def score(self, items) -> list[dict]:
        return self.clf.score(items)

    def values(self, outputs) -> np.ndarray:
        return np.array([[r["logprobs"][lab] for lab in self.pre.labels] for r in outputs])

    def output_checks(self, outputs) -> list[Check]:
        bad, sums = [], []
        for r in outputs:
            vals = list(r["probs"].values()) + list(r["logprobs"].values())
            if not all(math.isfinite(v) for v in vals):
                bad.append(repr(r["id"]))
            sums.append(sum(r["probs"].values()))
        checks = _finite_and_normalised("label probability and log-probability", bad, sums)
        return checks + [_output_record_check(outputs, [p.id for p in self.items[:len(outputs)]],
                                              ("id", "prediction", "probs", "logprobs", "label_token_ids"))]


@dataclass
class _Prompt:
    id: object
    context: list[int]


class _NextTokenRunner:
    """Without labels: the next-token distribution after each prompt (a one-step generate)."""

    what = "next-token path"

    def __init__(self, loaded, pre: Preflight):
        from paddle_scorer.backend import Backend

        self.pre = pre
        self.tok = loaded.tokenizer
        self.backend = Backend(loaded.model, pad_id=getattr(self.tok, "pad_token_id", None) or 0)
        self.max_length = getattr(loaded.config, "max_position_embeddings", None)
        self.items: list = []

    def prepare(self) -> None:
        from paddle_scorer.prompts import apply_chat, encode, fill_template, has_chat_template

        self.use_chat = has_chat_template(self.tok)
        for rid, rec, where in self.pre.rows:
            ids = encode(self.tok, apply_chat(self.tok, fill_template(self.pre.template, rec, where), self.use_chat),
                         special=not self.use_chat)
            if not ids:
                raise UsageError(f"{where}: the prompt is empty after tokenization; give some text.")
            if self.max_length and len(ids) >= self.max_length:
                raise UsageError(f"{where}: the prompt is {len(ids)} tokens, longer than the model's context of "
                                 f"{self.max_length}; shorten it or pass --truncate left to generate.")
            self.items.append(_Prompt(rid, ids))

    def prepared_detail(self) -> str:
        return (f"{len(self.items)} record(s) templated and tokenised"
                + (" with the chat template" if self.use_chat else "")
                + f"; longest prompt {max(len(p.context) for p in self.items)} of {self.max_length or '?'} tokens")

    def score(self, items) -> list[dict]:
        lp = self.backend.next_token_logprobs([p.context for p in items]).astype(np.float64)
        return [{"id": p.id, "next_token_logprobs": row} for p, row in zip(items, lp)]

    def values(self, outputs) -> np.ndarray:
        return np.stack([r["next_token_logprobs"] for r in outputs])

    def output_checks(self, outputs) -> list[Check]:
        bad = [repr(r["id"]) for r in outputs if not np.isfinite(r["next_token_logprobs"]).all()]
        sums = [float(np.exp(r["next_token_logprobs"]).sum()) for r in outputs]
        return _finite_and_normalised("next-token log-probability", bad, sums)


def _output_record_check(outputs: list[dict], ids: list, required: tuple[str, ...]) -> Check:
    try:
        back = [json.loads(json.dumps(r, ensure_ascii=False)) for r in outputs]
    except (TypeError, ValueError) as exc:
        return Check("output records", FAIL, f"a record is not JSON-serialisable ({exc}); report this as a bug.")
    missing = sorted({k for r in back for k in required if k not in r})
    if missing or [r["id"] for r in back] != [json.loads(json.dumps(i)) for i in ids]:
        return Check("output records", FAIL, f"records lack {', '.join(missing) or 'their input ids'}; report this as a bug.")
    return Check("output records", PASS, f"JSON lines with {', '.join(required)}; ids in input order")


# --------------------------------------------------------------------------------------------------
# Both phases
# --------------------------------------------------------------------------------------------------


def command_for(pre: Preflight) -> str | None:
    if pre.model_info is None or pre.gpu_dtype is None:
        return None
    opts = pre.options
    model = pre.model_dir if opts.model is not None or pre.lora_dir is None else None
    return gpu_command(model, pre.lora_dir, dtype=pre.gpu_dtype, labels=pre.labels,
                       template=pre.template if pre.template_given else None,
                       label_prefix=opts.label_prefix, input=opts.input, tokenizer=opts.tokenizer)


def run(opts: SmokeOptions) -> SmokeResult:
    pre = preflight(opts)
    return SmokeResult(pre, exercise(pre), command_for(pre))
