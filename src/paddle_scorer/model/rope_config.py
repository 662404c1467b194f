"""config.json's rotary settings in every dialect, read into one declaration, and what each model library would
compute instead (pure, no paddle).

Dialects in the wild, all read here:

* transformers 5: ``rope_parameters: {rope_type, rope_theta, factor, ...}`` and no ``rope_theta`` at the top;
* transformers 4.x (most of the hub): ``rope_theta`` + ``rope_scaling: {type | rope_type, factor, ...}``;
* PaddleNLP: ``rope_theta`` + ``rope_scaling_type`` (``linear``, ``ntk``, ``dynamic_ntk``) + ``rope_scaling_factor``.

Two dialects in one config that say different things are refused naming both fields (transformers 5 follows one,
PaddleNLP another: a silent 1.5-nat difference). :func:`library_differs` says where an installed library would
compute something other than what config.json declares (PaddleNLP 3.0.0b4's Llama ignores ``rope_parameters`` and
every ``rope_scaling`` but llama3's; its Qwen2 has no scaling at all): the model then goes to paddle-scorer's decoder,
which computes the declaration, or is refused where the decoder cannot run it.
"""

from __future__ import annotations

import math

from paddle_scorer.errors import UnsupportedModelError

# PaddleNLP's rope_scaling_type -> the transformers rope type with the same math ("ntk" has none: PaddleNLP only)
_PADDLENLP_TYPES = {"linear": "linear", "dynamic_ntk": "dynamic", "ntk": "ntk"}
# parameters compared between a declaration and a library's reading (beyond type and theta)
_PARAMS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
           "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "partial_rotary_factor")


def _refuse(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}/config.json {what}; fix config.json so it says one thing (paddle-scorer "
                                 "computes what config.json declares, and will not guess between two readings).")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _type_of(d: dict, field: str, where: str) -> str | None:
    t, rt = d.get("type"), d.get("rope_type")
    if t is not None and rt is not None and t != rt:
        raise _refuse(where, f"has {field}.type {t!r} and {field}.rope_type {rt!r}")
    return rt if rt is not None else t


def declared(cfg: dict, where: str, default_theta: float = 10000.0) -> dict:
    """One dict ``{rope_type, rope_theta, factor, ...}`` of what config.json declares, whichever dialect it uses;
    contradictions between dialects refused naming both fields."""
    rp = cfg.get("rope_parameters")
    rs = cfg.get("rope_scaling")
    for name, v in (("rope_parameters", rp), ("rope_scaling", rs)):
        if v is not None and not isinstance(v, dict):
            raise _refuse(where, f"has {name} {v!r}, not an object")
    rp, rs = dict(rp or {}), dict(rs or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedModelError(
            f"{where}/config.json gives rope_parameters per layer type ({', '.join(sorted(rp))}), which this family "
            "does not have; fix config.json (or tell us which model this is).")
    out: dict = {}
    tp, ts = _type_of(rp, "rope_parameters", where), _type_of(rs, "rope_scaling", where)
    if rp and rs:
        if tp is not None and ts is not None and tp != ts:
            raise _refuse(where, f"has rope_parameters.rope_type {tp!r} and rope_scaling type {ts!r}")
        for k in sorted(set(rp) & set(rs) - {"type", "rope_type"}):
            if not _same(rp[k], rs[k]):
                raise _refuse(where, f"has rope_parameters.{k} {rp[k]!r} and rope_scaling.{k} {rs[k]!r}")
    out.update({k: v for k, v in rs.items() if k not in ("type", "rope_type")})
    out.update({k: v for k, v in rp.items() if k not in ("type", "rope_type")})
    kind = tp or ts
    top = cfg.get("rope_theta")
    if top is not None and out.get("rope_theta") is not None and not _same(top, out["rope_theta"]):
        raise _refuse(where, f"has rope_theta {top!r} and rope_parameters.rope_theta {out['rope_theta']!r}")
    pt, pf = cfg.get("rope_scaling_type"), cfg.get("rope_scaling_factor")
    if pt is not None:
        mapped = _PADDLENLP_TYPES.get(pt)
        if mapped is None:
            raise UnsupportedModelError(f"{where}/config.json has rope_scaling_type {pt!r}, which no library computes "
                                        "(PaddleNLP knows linear, ntk, dynamic_ntk); fix config.json.")
        if kind not in (None, "default") and kind != mapped:
            raise _refuse(where, f"has rope_scaling_type {pt!r} (PaddleNLP's spelling) and a {kind!r} rope type "
                                 "(transformers' rope_scaling / rope_parameters)")
        if kind in (None, "default"):
            kind = mapped
            out["factor"] = pf if pf is not None else 1.0
        elif pf is not None and out.get("factor") is not None and not _same(pf, out["factor"]):
            raise _refuse(where, f"has rope_scaling_factor {pf!r} and a rope factor {out['factor']!r}")
    out["rope_type"] = kind or "default"
    if out.get("rope_theta") is None:
        out["rope_theta"] = top if top is not None else default_theta
    if cfg.get("partial_rotary_factor") is not None and out.get("partial_rotary_factor") is None:
        out["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    return out


def paddlenlp_reading(cfg: dict, scaling: bool) -> dict:
    """What PaddleNLP 3.0.0b4 computes (read in its modeling code): the top-level ``rope_theta`` (10000 without it);
    with ``scaling`` (its Llama) ``rope_scaling`` only when its ``rope_type`` is llama3, otherwise its own
    ``rope_scaling_type`` / ``rope_scaling_factor``; without (its Qwen2) no scaling whatever config.json says."""
    out: dict = {"rope_theta": cfg.get("rope_theta") if cfg.get("rope_theta") is not None else 10000.0,
                 "rope_type": "default"}
    if not scaling:
        return out
    rs = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else {}
    if rs.get("rope_type") == "llama3":
        out.update({k: rs.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")})
        out["rope_type"] = "llama3"
    elif cfg.get("rope_scaling_type") in _PADDLENLP_TYPES:
        out["rope_type"] = _PADDLENLP_TYPES[cfg["rope_scaling_type"]]
        out["factor"] = cfg.get("rope_scaling_factor") if cfg.get("rope_scaling_factor") is not None else 1.0
    return out


def paddlenlp_differs(cfg: dict, where: str, scaling: bool) -> str | None:
    """Why PaddleNLP 3.0.0b4's rotary embedding would differ from config.json's declaration (:func:`paddlenlp_reading`),
    or None."""
    why = difference(declared(cfg, where), paddlenlp_reading(cfg, scaling), cfg)
    return f"PaddleNLP 3.0.0b4 would not compute what config.json declares: {why}" if why else None


def _field_of(cfg: dict, key: str) -> str:
    """The config.json field a declared rope value came from (for the sentence that names it)."""
    if isinstance(cfg.get("rope_parameters"), dict) and key in cfg["rope_parameters"]:
        return f"rope_parameters.{key}"
    if isinstance(cfg.get("rope_scaling"), dict) and (key in cfg["rope_scaling"]
                                                       or (key == "rope_type" and "type" in cfg["rope_scaling"])):
        return f"rope_scaling.{key}"
    if key == "rope_type" and cfg.get("rope_scaling_type") is not None:
        return "rope_scaling_type"
    return key


def difference(want: dict, got: dict, cfg: dict) -> str | None:
    """The first rotary setting where a library's reading ``got`` differs from the declaration ``want``, as a phrase
    naming the field; None when they compute the same thing."""
    if want["rope_type"] != got["rope_type"]:
        return (f"{_field_of(cfg, 'rope_type')} declares {want['rope_type']!r} rotary scaling, which it would compute "
                f"as {got['rope_type']!r}")
    if not _same(float(want["rope_theta"]), float(got["rope_theta"])):
        return f"{_field_of(cfg, 'rope_theta')} declares base {want['rope_theta']!r}, where it would use {got['rope_theta']!r}"
    if want["rope_type"] == "default":
        return None
    for k in _PARAMS:
        a, b = want.get(k), got.get(k)
        if a is not None and (b is None or not _same(a, b)):
            return f"{_field_of(cfg, k)} declares {a!r}, where it would use {b!r}"
    return None
