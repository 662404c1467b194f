"""A LoRA adapter against its base, before anything is loaded: adapter keys mapped onto the runtime model's
module names (one transform for every key, nothing skipped silently), every tensor checked (shape, rank,
NaN/inf, targets without weights), and a no-op adapter refused. No paddle import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.model.arrays import nonfinite
from paddle_scorer.errors import CheckpointError, WeightMismatchError
from paddle_scorer.checkpoint.lora import LoraSettings


def map_adapter_keys(adapter_keys: list[str], base_modules: set[str],
                     aliases: tuple[str, ...] = ()) -> tuple[dict[str, str], str | None]:
    """Map adapter tensor names onto the runtime model's module names.

    PaddleNLP adapters use the model's own prefix (``llama.layers.0...``); PaddleFormers uses
    ``model.layers.0...``; PEFT-style exports may add ``base_model.model.``. We try the names as
    they are, then with the leading component(s) replaced by the base's prefix. ``aliases`` are the
    other prefixes *the same architecture* has in another library (a PaddleNLP Llama adapter's
    ``llama.`` on a PaddleFormers Llama, whose body is ``model.``). One transform must fit every
    key; nothing is skipped silently.
    """
    base_prefix = ckpt.key_prefix(base_modules)

    def module_of(k: str) -> str:
        return k.rsplit(".", 1)[0]

    transforms: list[tuple[str | None, Any]] = [(None, lambda m: m)]
    src_prefix = ckpt.key_prefix(adapter_keys)
    # Only the generic wrappers are rewritten; another architecture's prefix (qwen2 vs llama) is a
    # real mismatch and must not be mapped away.
    for wrapper in ("base_model.model.model", "base_model.model", "model.model", "model"):
        if all(k.startswith(wrapper + ".") for k in adapter_keys):
            transforms.append((f"`{wrapper}.` -> `{base_prefix}.`",
                               lambda m, w=wrapper: f"{base_prefix}." + m[len(w) + 1:]))
            transforms.append((f"`{wrapper}.` stripped", lambda m, w=wrapper: m[len(w) + 1:]))
    for alias in aliases:
        if alias != base_prefix and all(k.startswith(alias + ".") for k in adapter_keys):
            transforms.append((f"`{alias}.` -> `{base_prefix}.`", lambda m, a=alias: f"{base_prefix}." + m[len(a) + 1:]))
    if src_prefix != base_prefix:
        transforms.append((f"`{base_prefix}.` added", lambda m: f"{base_prefix}.{m}"))
    for label, fn in transforms:
        mapped = {k: fn(module_of(k)) + "." + k.rsplit(".", 1)[1] for k in adapter_keys}
        if all(module_of(v) in base_modules for v in mapped.values()):
            if label is not None:
                label = f"adapter keys mapped onto the base's names: {label}"
            return mapped, label
    return {k: k for k in adapter_keys}, None


def split_parts(conversion) -> dict[str, tuple[str, int, int, tuple | None, int]]:
    """Split modules of fused runtime ones: ``{model.layers.0.self_attn.q_proj: (model.layers.0.self_attn.qkv_proj,
    first column, end column, the fused module's column permutation, its width)}`` (columns before the permutation)."""
    out = {}
    for t in conversion.tensors.values():
        if len(t.parts) < 2 or not t.name.endswith(".weight"):
            continue
        fused = t.name[: -len(".weight")]
        stem = fused.rsplit(".", 1)[0]
        for part in t.parts:
            out[f"{stem}.{part.source.rsplit('.', 2)[-2]}"] = (fused, part.start, part.stop, t.perm, t.shape[-1])
    return out


def combine_split_pairs(pairs: dict, splits: dict) -> tuple[dict, list[str]]:
    """LoRA pairs on split modules (``q_proj``, ``k_proj``...) of a fused runtime module (``qkv_proj``) as one pair on
    it: ``A = [A_q | A_k | A_v]`` and a block of ``B`` rows per part in its columns (zeros elsewhere, then the fused
    module's column order), so ``x @ A @ B`` adds exactly what the split pairs add. Its rank is their ranks' sum."""
    grouped: dict[str, list] = {}
    out = {m: ab for m, ab in pairs.items() if m not in splits}
    for m in sorted(set(pairs) & set(splits)):
        grouped.setdefault(splits[m][0], []).append((m, *splits[m][1:], *pairs[m]))
    problems = []
    for fused, items in grouped.items():
        if fused in out:
            problems.append(f"{fused}: the adapter adapts it and also its parts ({', '.join(i[0] for i in items)})")
            continue
        perm, width = items[0][3], items[0][4]
        a = np.concatenate([np.asarray(i[5], np.float32) for i in items], axis=1)
        b = np.zeros((a.shape[1], width), np.float32)
        row = 0
        for _, start, stop, _, _, _, bi in items:
            b[row:row + bi.shape[0], start:stop] = bi
            row += bi.shape[0]
        out[fused] = (a, np.ascontiguousarray(b[:, list(perm)]) if perm is not None else b)
    return out, problems


def validate_adapter(
    adapter: dict[str, np.ndarray], base_shapes: dict[str, tuple[int, ...]], settings: LoraSettings, where: str,
    *, allow_noop: bool = False, aliases: tuple[str, ...] = (), splits: dict | None = None,
    file_names: dict[str, str] | None = None, magnitudes: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str | None, dict[str, np.ndarray]]:
    """Check every adapter tensor against the runtime model's shapes; return ``{module: (A, B)}`` or raise
    listing every problem. A no-op adapter (every B zero, or scaling 0) is refused unless ``allow_noop``.
    ``splits`` (:func:`split_parts`; paddle-scorer's decoder only, which takes a pair of any rank): adapters on the
    split modules of a fused runtime module are combined onto it (:func:`combine_split_pairs`). ``file_names``: the
    adapter's names as its file has them, for the keys a family renamed (``target_modules`` match those).
    ``magnitudes``: DoRA's magnitude per module (the adapter's module names), returned on the runtime modules (a fused
    module's columns that no DoRA part covers are NaN)."""
    splits = splits or {}
    problems: list[str] = []
    non_lora = [k for k in adapter if not (k.endswith(".lora_A") or k.endswith(".lora_B"))]
    for k in non_lora:
        problems.append(f"{k}: not a lora_A/lora_B tensor (trainable modules or biases are not supported)")
    keys = [k for k in adapter if k not in non_lora]
    if not keys:
        raise WeightMismatchError(f"{where}: the adapter file holds no lora_A/lora_B tensors:", problems or ["(empty)"],
                                  "Check that this is the adapter saved by LoRAModel.save_pretrained.")
    base_modules = {k[: -len(".weight")] for k in base_shapes if k.endswith(".weight")}
    split_widths = {m: (base_shapes[f + ".weight"][0], stop - start) for m, (f, start, stop, _, _) in splits.items()}
    mapping, mapping_note = map_adapter_keys(keys, base_modules | set(splits), aliases)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for k in keys:
        target = mapping[k]
        module, part = target.rsplit(".", 1)
        if module not in base_modules and module not in splits:
            problems.append(f"{k}: no module `{module}` in the base model (adapter for another architecture or prefix?)")
            continue
        pairs.setdefault(module, {})[part] = adapter[k]
    result = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            problems.append(f"{module}: {missing} is missing")
            continue
        a, b = parts["lora_A"], parts["lora_B"]
        w = split_widths[module] if module in splits else base_shapes[module + ".weight"]
        if len(w) != 2:
            problems.append(f"{module}: base weight has shape {tuple(w)}, not a Linear")
            continue
        r = settings.pair_rank
        want_a, want_b = (w[0], r), (r, w[1])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{module}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base weight "
                f"{tuple(w)} with r={r} (expected A{want_a} B{want_b})"
            )
            continue
        result[module] = (a, b)
    mags = {}
    for name, vec in (magnitudes or {}).items():
        target = mapping.get(name + ".lora_A", name + ".lora_A").rsplit(".", 1)[0]
        if target in result and vec.shape != (result[target][1].shape[1],):
            problems.append(f"{name}: its DoRA magnitude {tuple(vec.shape)} does not have one value per output "
                            f"column ({result[target][1].shape[1]})")
        mags[target] = vec
    problems += _target_problems(settings, keys, mapping, pairs, base_modules, base_shapes, splits, file_names or {})
    problems += nonfinite({f"{m}.lora_A": ab[0] for m, ab in result.items()}
                          | {f"{m}.lora_B": ab[1] for m, ab in result.items()})
    if splits and not problems:
        mags = combine_split_magnitudes(mags, splits)
        result, combined = combine_split_pairs(result, splits)
        problems += combined
    if problems:
        raise WeightMismatchError(
            f"{where}: the adapter does not fit the base model ({len(problems)} problem(s)):", problems,
            "Pass the base model this adapter was trained on (see `paddle-scorer inspect` on the adapter).",
        )
    if not allow_noop:
        check_not_noop(result, settings, where)
    return result, mapping_note, mags


def combine_split_magnitudes(mags: dict, splits: dict) -> dict:
    """DoRA magnitudes of split modules (``q_proj``...) on their fused runtime module, in its column order; the columns
    of a part without one are NaN (DoRA leaves them as they are). A column's DoRA norm is its own, so this is exact."""
    out = {m: v for m, v in mags.items() if m not in splits}
    perms = {}
    for m in sorted(set(mags) & set(splits)):
        fused, start, stop, perm, width = splits[m]
        if fused not in out:
            out[fused] = np.full(width, np.nan, np.float32)
        out[fused][start:stop] = mags[m]
        perms[fused] = perm
    for fused, perm in perms.items():
        if perm is not None:
            out[fused] = np.ascontiguousarray(out[fused][list(perm)])
    return out


def _target_problems(settings: LoraSettings, keys: list[str], mapping: dict, pairs: dict, base_modules: set[str],
                     base_shapes: dict, splits: dict, file_names: dict[str, str]) -> list[str]:
    """What ``target_modules`` says against what the file holds. PaddleNLP's ``LoRAModel`` adapts exactly the modules
    its regexes fully match and ignores tensors for any other: a module with weights in the file that no target
    matches (under its name in the file or in the base), targets that match no module, or matched modules without
    weights are each refused, so the adapter means one thing."""
    if not settings.target_modules:
        return []
    problems = []
    original = {mapping[k].rsplit(".", 1)[0]: file_names.get(k, k).rsplit(".", 1)[0] for k in keys}
    expected = {m for m in base_modules if settings.targets(m)}
    expected = {m for m in expected if len(base_shapes.get(m + ".weight", ())) == 2}  # only Linear weights
    covered = set(pairs) | {splits[m][0] for m in pairs if m in splits}
    untargeted = sorted(m for m in pairs if not any(settings.targets(x) for x in (m, original.get(m, m))))
    saver = settings.saver
    if pairs and not expected and len(untargeted) == len(pairs):
        return [f"target_modules {settings.target_modules} match no module of the base model, while the file has "
                f"weights for {len(pairs)} module(s) (e.g. {original.get(untargeted[0], untargeted[0]) if untargeted else '-'}): "
                f"{saver} would apply none of them; fix target_modules in the adapter's config"]
    for m in untargeted[:20]:
        problems.append(f"{original.get(m, m)}: the file has LoRA weights for it, but target_modules "
                        f"{settings.target_modules} do not match it ({saver} would not apply them)")
    if len(untargeted) > 20:
        problems.append(f"... and {len(untargeted) - 20} more module(s) with weights that target_modules do not match")
    for m in sorted(expected - covered):
        problems.append(f"{m}: matches target_modules but the adapter has no weights for it (would stay a zero adapter)")
    return problems


def check_not_noop(pairs: dict[str, tuple[np.ndarray, np.ndarray]], settings: LoraSettings, where: str) -> None:
    """An adapter that changes nothing is almost always a mistake (saved before the first step,
    ``lora_alpha: 0``): it would score the bare base model under the adapter's name."""
    if settings.scaling == 0:
        raise CheckpointError(
            f"{where}: lora_alpha is 0, so the adapter's scaling is 0 and it changes nothing (scores would be the bare "
            "base model's); fix lora_alpha in lora_config.json, or pass --allow-noop-adapter to score it anyway."
        )
    if all(not np.any(b.astype(np.float32) != 0) for _, b in pairs.values()):
        raise CheckpointError(
            f"{where}: every lora_B matrix is all zeros, so the adapter changes nothing (it was probably saved before "
            "the first training step); use a later checkpoint, or pass --allow-noop-adapter to score it anyway."
        )
