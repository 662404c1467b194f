"""Merge a LoRA adapter into its base model's weights, tensor by tensor, without building the model.

The recipe (each step a small function; nothing here imports paddle unless ``verify`` is asked for):

1. :func:`plan` checks everything before a byte is written: both folders (the same checks as the
   loader), the adapter against the base's tensor *shapes* (read from the file headers, not the
   tensors), the output path, the output dtype and format, free disk space.
2. :func:`write` streams the base one shard at a time: read the shard (refusing NaN/inf), add
   ``A @ B * scaling`` (float32) to each adapted weight, cast, write the shard. Only one shard of
   weights is in memory at any time, so peak memory stays near one copy of the largest shard.
3. Everything goes into a temporary folder next to ``--out``; with ``verify`` the merged model is
   compared with base + attached adapter on a probe input; only then is the folder renamed into
   place. An error or Ctrl-C leaves neither ``--out`` nor the temporary folder behind.

Output dtype ``auto`` keeps every tensor's stored dtype (merging does not change precision); an
explicit dtype casts every floating tensor. Key names and weight layout (Paddle's ``[in, out]``)
are the base's, so PaddleNLP's ``from_pretrained`` reads the result as a plain model.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import dataclasses
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from paddle_scorer import __version__
from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.model import load_plan as planning
from paddle_scorer.checkpoint import sidecars
from paddle_scorer.model.folders import resolve_paths
from paddle_scorer.model.dtype_policy import DTYPES, normalise_dtype
from paddle_scorer.errors import CheckpointError, UsageError, WeightMismatchError
from paddle_scorer.model.arrays import add_delta, dora_delta, merge_refusal, nonfinite, to_dtype
from paddle_scorer.tasks.merge_output import (  # noqa: F401 - the names tests and the CLI use via merge
    _BASE_EXTRA_FILES, _CHAT_TEMPLATE_FILES, _INDEX_NAME, _SHARD_NAME, _SINGLE_NAME, check_output,
    clean_stale, commit as _commit, temp_folder,
)
from paddle_scorer.checkpoint.lora import LoraSettings, lora_delta
from paddle_scorer.checkpoint.weights import TensorMeta, dtype_size, read_tensors, write_pdparams, write_safetensors

FORMATS = ("safetensors", "pdparams")

# PaddleNLP's loader accepts safetensors with format "np" (or none) and refuses anything else. An HF-layout
# base (PaddleFormers writes no metadata) gets "pt", which says [out, in] to HF-style readers; PaddleFormers'
# own from_pretrained ignores it (tests/formers: the merged folder loads there).
_SAFETENSORS_METADATA = {"paddle": {"format": "np"}, "hf": {"format": "pt"}}

# --verify: a fixed probe text, and how far merged logits may drift from base + attached adapter.
PROBE_TEXT = "paddle-scorer merge check: is the merged model the same as base plus adapter?"
PROBE_FALLBACK_IDS = [5, 17, 42, 99, 7, 150, 3, 64]
TOL_FLOAT32 = 1e-3  # absolute; exact math in float32 lands near 1e-6
TOL_HALF = 5e-2  # relative to max |logit|: storing merged weights in float16/bfloat16 rounds them


@dataclass
class MergePlan:
    """Everything checked and decided before writing; :func:`write` only executes it."""

    base: Path
    adapter: Path
    out: Path
    dtype: str  # "auto" (keep each tensor's stored dtype) or one of DTYPES
    out_dtype: str  # what config.json and the record say: the dominant dtype of the output
    format: str
    force: bool
    model: planning.ModelPlan  # the base: files, per-tensor refs, layout, runtime names
    adapter_plan: planning.AdapterPlan  # validated pairs keyed by the runtime module names
    tokenizer_source: Path | None
    out_bytes: int  # size of the tensors to be written
    notes: list[str] = field(default_factory=list)  # what was cleaned up before (interrupted earlier merges)

    @property
    def base_info(self) -> ckpt.CheckpointInfo:
        return self.model.info

    @property
    def adapter_info(self) -> ckpt.CheckpointInfo:
        return self.adapter_plan.info

    @property
    def settings(self) -> LoraSettings:
        return self.adapter_plan.settings

    @property
    def pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.adapter_plan.pairs

    @property
    def mapping_note(self) -> str | None:
        return self.adapter_plan.mapping_note

    @property
    def adapter_sha256(self) -> str:
        return self.adapter_plan.sha256

    @property
    def base_files(self) -> list[Path]:
        return [Path(f) for f in self.base_info.weights.files]

    @property
    def base_bytes(self) -> int:
        return self.base_info.weights.nbytes


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    logit_scale: float  # max |logit| of base + attached adapter
    probe_tokens: int
    passed: bool


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    format: str
    out_dtype: str
    merged_modules: int
    scaling: float
    scaling_formula: str
    out_bytes: int  # bytes on disk of everything written
    base_bytes: int  # tensor bytes of the base checkpoint
    peak_rss_bytes: int  # process peak RSS when the weights were written (before any --verify)
    record: dict
    replaced_existing: bool = False
    verify: VerifyResult | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# --------------------------------------------------------------------------------------------------
# 1. Plan: every check before writing
# --------------------------------------------------------------------------------------------------


def output_dtype(requested: str, stored: dict[str, int]) -> tuple[str, str]:
    """``(cast, label)``: ``cast`` is "auto" or a dtype for every floating tensor; ``label`` goes into config.json."""
    dtype = normalise_dtype(requested)
    if dtype == "auto":
        floating = {k: v for k, v in stored.items() if k in DTYPES}
        return "auto", planning.dominant_dtype(floating)
    return dtype, dtype


def _out_nbytes(metas: dict[str, TensorMeta], cast: str) -> int:
    total = 0
    for m in metas.values():
        floating = m.dtype in DTYPES or m.dtype == "float64"
        total += m.numel * (dtype_size(cast) if cast != "auto" and floating else dtype_size(m.dtype))
    return total


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def plan(
    model: str | Path | None,
    lora: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    fmt: str = "safetensors",
    force: bool = False,
    verify: bool = False,
    allow_noop_adapter: bool = False,
) -> MergePlan:
    """The load plan's model and adapter parts (every check the loader makes), plus the output checks."""
    if lora is None:
        raise UsageError("no adapter given; pass --lora ADAPTER_FOLDER (the folder with lora_config.json).")
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; use safetensors or pdparams.")
    base_dir, lora_dir = resolve_paths(model, lora)
    out = Path(out)
    check_output(out, base_dir, lora_dir, force)

    mp = planning.plan_model(base_dir)
    ap = planning.plan_adapter(lora_dir, mp, allow_noop=allow_noop_adapter)
    if ap.whole:  # peft's modules_to_save / trained biases are written instead of the base's
        mp = dataclasses.replace(mp, refs={**mp.refs, **ap.whole})
    cast, label = output_dtype(dtype, mp.info.weights.dtypes)

    tok_src = base_dir if _has_tokenizer(base_dir) else (lora_dir if _has_tokenizer(lora_dir) else None)
    if verify and tok_src is None:
        raise UsageError(
            "--verify needs tokenizer files (tokenizer_config.json) in the base or adapter folder to build its probe "
            "input; copy them there or drop --verify."
        )

    metas = {n: r.meta for n, r in mp.refs.items()}
    out_bytes = _out_nbytes(metas, cast)
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if out_bytes * 1.05 > free:
        gb = 1024**3
        raise UsageError(
            f"the merged model needs about {out_bytes / gb:.2f} GB but only {free / gb:.2f} GB is free under "
            f"{existing}; free some space or pass an --out on another disk."
        )
    return MergePlan(base=base_dir, adapter=lora_dir, out=out, dtype=cast, out_dtype=label, format=fmt, force=force,
                     model=mp, adapter_plan=ap, tokenizer_source=tok_src, out_bytes=out_bytes)


# --------------------------------------------------------------------------------------------------
# 2. Merge and write, shard by shard
# --------------------------------------------------------------------------------------------------


def source_deltas(p: MergePlan) -> dict[str, tuple[str, object]]:
    """Source tensor name -> (runtime module, recipe) for every adapted weight. A fused runtime module
    (ERNIE 4.5's qkv_proj) has one entry per split source tensor (q_proj, k_proj, v_proj)."""
    recipes = p.model.conversion.tensors
    out = {}
    for module in p.pairs:
        rt = recipes[module + ".weight"]
        for src in rt.sources:
            out[src] = (module, rt)
    return out


def merge_shard(shard: dict[str, np.ndarray], p: MergePlan, deltas: dict[str, tuple[str, object]], where: str) -> list[str]:
    """Add each adapted weight's share of ``A @ B * scaling`` (in the source layout) and cast, in place.
    Returns the merged source tensors."""
    merged, bad, cache = [], [], {}
    out_dtype = None if p.dtype == "auto" else p.dtype
    for name in [n for n in shard if n in deltas]:
        module, rt = deltas[name]
        if module not in cache:
            a, b = p.pairs[module]
            delta = lora_delta(a, b, p.settings.scaling)
            if module in p.adapter_plan.magnitudes:  # DoRA: the rescaled sum needs the whole runtime weight
                w = p.model.read([module + ".weight"], check=False)[module + ".weight"]
                delta = dora_delta(w, delta, p.adapter_plan.magnitudes[module])
            cache[module] = rt.split(delta)
        delta = cache[module].pop(name)
        if not cache[module]:  # every source of this module is merged: free its delta now, not at the
            del cache[module]  # end of the shard (kept, the deltas were as big as the adapted weights)
        value, problem = add_delta(name, shard[name], delta, out_dtype)
        del delta
        if problem:
            bad.append(problem)
            continue
        shard[name] = value
        merged.append(name)
    if bad:
        raise merge_refusal(where, bad)
    if out_dtype is not None:
        narrowed = []
        for name in list(shard):
            before = shard[name].dtype
            shard[name] = to_dtype(shard.pop(name), out_dtype)
            if shard[name].dtype != before and shard[name].itemsize < before.itemsize:
                narrowed.append(name)
        bad = nonfinite({n: shard[n] for n in narrowed})
        if bad:
            raise WeightMismatchError(
                f"--dtype {out_dtype}: some base weights exceed {out_dtype}'s range and would become inf:", bad,
                "Keep the stored dtype with --dtype auto, or use --dtype bfloat16 (float32's range).",
            )
    return merged


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_tensors(tensors: dict[str, np.ndarray], path: Path, fmt: str, metadata: dict | None = None,
                   layout: str = "paddle") -> None:
    if fmt == "safetensors":
        # keep the base's metadata (its "format" says the layout to PaddleFormers/HF loaders), else the layout's
        meta = {str(k): str(v) for k, v in (metadata or _SAFETENSORS_METADATA[layout]).items()}
        write_safetensors(tensors, path, metadata=meta)
        os.chmod(path, 0o666 & ~_umask())  # the safetensors writer creates files 0600; match the other files
    else:
        write_pdparams(tensors, path)


def _shard_names(n: int, fmt: str) -> list[str]:
    if n == 1:
        return [_SINGLE_NAME[fmt]]
    return [_SHARD_NAME[fmt].format(i=i, n=n) for i in range(1, n + 1)]


def write_weights(p: MergePlan, folder: Path) -> tuple[list[str], int]:
    """Stream the base shard by shard into ``folder``; returns the weight file names and merged module count."""
    files = p.base_files
    sharded = p.base_info.weights.sharded
    names = _shard_names(len(files), p.format) if sharded else [_SINGLE_NAME[p.format]]
    weight_map: dict[str, str] = {}
    total = 0
    merged: list[str] = []
    deltas = source_deltas(p)
    by_file: dict[str, list] = {}
    for name, ref in p.base_info.tensors.items():  # the base's files; a tensor the adapter replaces is read from it
        by_file.setdefault(str(ref.file), []).append(p.model.refs[name])
    for src, name in zip(files, names, strict=True):
        shard = read_tensors(sorted(by_file.get(str(src), []), key=lambda r: r.offset))
        bad = nonfinite(shard)
        if bad:
            raise WeightMismatchError(f"{p.base}: the model weights contain NaN/inf, so every score would be meaningless:",
                                      bad, "Re-export the checkpoint from a healthy training step.")
        merged += merge_shard(shard, p, deltas, str(p.adapter))
        for key, arr in shard.items():
            weight_map[key] = name
            total += arr.nbytes
        _write_tensors(shard, folder / name, p.format, p.base_info.weights.metadata, p.model.layout.kind)
        del shard
    missing = sorted(set(deltas) - set(merged))
    if missing:  # cannot happen after validate_adapter; refuse rather than write a partial merge
        raise CheckpointError(f"{p.base}: adapted tensor(s) {', '.join(missing)} were not found while merging.")
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / _INDEX_NAME[p.format]).write_text(json.dumps(index, indent=2) + "\n")
        names = names + [_INDEX_NAME[p.format]]
    return names, len(p.pairs)


def merge_record(p: MergePlan, merged_modules: int) -> dict:
    s = p.settings
    record = {
        "base": str(p.base.resolve()),
        "adapter": str(p.adapter.resolve()),
        "adapter_sha256": p.adapter_sha256,
        "r": s.r,
        "lora_alpha": s.lora_alpha,
        "rslora": s.rslora,
        "scaling": s.scaling,
        "scaling_formula": s.scaling_formula,
        "dtype": p.out_dtype,
        "dtype_request": p.dtype,
        "base_stored_dtypes": p.base_info.weights.dtypes,
        "format": p.format,
        "merged_modules": merged_modules,
        "adapter_key_mapping": p.mapping_note,
        "layout": p.model.layout.kind,
        "layout_saved_by": p.model.layout.saved_by,
        "paddle_scorer_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if s.peft is not None:
        ap = p.adapter_plan
        record.update({"adapter_format": "peft", "scaling": "per module (folded into lora_B)", "dora": bool(ap.magnitudes),
                       "replaced_tensors": sorted(ap.whole)})
    if p.base_info.merged_from:
        record["base_merged_from"] = p.base_info.merged_from
    return record


def write_side_files(p: MergePlan, folder: Path, record: dict) -> list[str]:
    """config.json (with the output dtype), generation config, tokenizer, chat template, scorer.json, record."""
    written = []
    config = sidecars.read_json(p.base / "config.json")
    config["dtype"] = p.out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = p.out_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written.append("config.json")
    copies = [(p.base, n) for n in _BASE_EXTRA_FILES]
    if p.tokenizer_source is not None:
        copies += [(p.tokenizer_source, n) for n in ckpt._TOKENIZER_FILES + list(_CHAT_TEMPLATE_FILES)]
    copies.append((p.adapter, sidecars.SCORER_DEFAULTS))
    for src, name in copies:
        if (src / name).is_file() and not (folder / name).exists():
            shutil.copyfile(src / name, folder / name)
            written.append(name)
    written.append(ckpt.MERGE_RECORD)
    record["files"] = sorted(set(record.get("files", [])) | set(written))  # what a later --force may replace
    (folder / ckpt.MERGE_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return written


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write(p: MergePlan, *, verify: bool = False) -> MergeResult:
    """Execute a plan: merge into a temporary folder, optionally verify, then move it into place."""
    out = p.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out)
    if tmp.exists():  # left by an earlier run of a process with our pid: ours to remove
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        weight_files, n_merged = write_weights(p, tmp)
        record = merge_record(p, n_merged)
        record["files"] = list(weight_files)
        side_files = write_side_files(p, tmp, record)
        rss = peak_rss_bytes()
        check = verify_merge(p, tmp) if verify else None
        if check is not None and not check.passed:
            raise CheckpointError(
                f"--verify failed: the merged model's log-probs differ from base + attached adapter by up to "
                f"{check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g}), so nothing was written; report this "
                "with the output of `paddle-scorer inspect` on both folders."
            )
        written = weight_files + side_files
        size = sum((tmp / f).stat().st_size for f in written)
        replaced = _commit(tmp, out, p.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = list(p.notes)
    if p.mapping_note:
        notes.append(p.mapping_note)
    if p.tokenizer_source is None:
        notes.append("no tokenizer files in the base or the adapter: pass --tokenizer when loading the merged model.")
    elif p.tokenizer_source == p.adapter:
        notes.append("the tokenizer was copied from the adapter folder (the base has none).")
    return MergeResult(
        out=out, files=written, format=p.format, out_dtype=p.out_dtype, merged_modules=n_merged,
        scaling=p.settings.scaling, scaling_formula=p.settings.describe() if p.settings.peft is not None else
        p.settings.scaling_formula, out_bytes=size,
        base_bytes=p.base_bytes, peak_rss_bytes=rss, record=record, replaced_existing=replaced, verify=check,
        notes=notes,
    )


def merge(
    model: str | Path | None,
    lora: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    fmt: str = "safetensors",
    force: bool = False,
    verify: bool = False,
    allow_noop_adapter: bool = False,
) -> MergeResult:
    """Clean up after interrupted merges to ``out`` (:func:`clean_stale`), then plan and write. See the module
    docstring."""
    cleaned = clean_stale(Path(out))
    p = plan(model, lora, out, dtype=dtype, fmt=fmt, force=force, verify=verify, allow_noop_adapter=allow_noop_adapter)
    p.notes = cleaned
    result = write(p, verify=verify)
    if p.adapter_plan.base_note:  # the same note classify gives for this pair (the CLI says it before writing)
        result.notes.insert(0, p.adapter_plan.base_note)
    return result


# --------------------------------------------------------------------------------------------------
# 3. Verify (imports paddle): merged logits == base + attached adapter logits
# --------------------------------------------------------------------------------------------------


def tolerance(out_dtype: str, logit_scale: float) -> float:
    """float32: 1e-3 absolute. float16/bfloat16: 5e-2 x max(1, max |logit|), since the merged weights are rounded."""
    if out_dtype == "float32":
        return TOL_FLOAT32
    return TOL_HALF * max(1.0, logit_scale)


def _logprobs(loaded, ids: list[int]) -> np.ndarray:
    from paddle_scorer.compute.choose_backend import backend_for

    return backend_for(loaded).position_logprobs(ids).astype(np.float64)


def verify_merge(p: MergePlan, merged_dir: Path) -> VerifyResult:
    """Run base + attached adapter, then the merged folder, on CPU in float32 (one model in memory at a time),
    through the scoring backend: the next-token log-probs after every prefix of a probe text must agree."""
    from paddle_scorer.model import loader

    attached = loader.load(p.base, p.adapter, mode="attach", device="cpu", dtype="float32",
                           tokenizer=p.tokenizer_source, allow_noop_adapter=p.adapter_plan.noop_allowed)
    try:
        ids = list(attached.tokenizer(PROBE_TEXT)["input_ids"])
    except Exception:  # a tokenizer that cannot encode plain text: fall back to fixed ids
        ids = []
    vocab = p.model.info.config.get("vocab_size") or max(PROBE_FALLBACK_IDS) + 1
    if not ids:
        ids = [i % vocab for i in PROBE_FALLBACK_IDS]
    want = _logprobs(attached, ids)
    del attached
    merged = loader.load(merged_dir, device="cpu", dtype="float32")  # with the tokenizer files copied there
    got = _logprobs(merged, ids)
    del merged
    diff = float(np.abs(want - got).max())
    scale = float(np.abs(want).max())
    tol = tolerance(p.out_dtype, scale)
    return VerifyResult(max_abs_diff=diff, tolerance=tol, logit_scale=scale, probe_tokens=len(ids),
                        passed=bool(diff <= tol))
