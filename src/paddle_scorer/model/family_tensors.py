"""Every runtime tensor a family's model has, with its shape, from its normalized config (pure, no paddle): what the
loader checks a checkpoint against when no library model class exists to do it (every tensor accounted for, nothing
missing, no shape off), and what ``inspect`` counts (total and active parameters).

Runtime names are the checkpoint's HF names (``model.layers.N...``) in Paddle's ``[in, out]`` orientation, with the
projections PaddleFormers fuses in memory fused the same way (``qkv_proj``, ``up_gate_proj``: see
:attr:`~paddle_scorer.model.families.spec.Family.fused`), so its LoRA adapters land on them as they are.
"""

from __future__ import annotations

import re

from paddle_scorer.model.families import FamilyConfig

PREFIX = "model"
_MTP = re.compile(r"(^|\.)mtp")


_BIAS_OF = {"qkv_proj": "q_proj", "up_gate_proj": "gate_proj"}


def _linear(out: dict, opt: dict, name: str, n_in: int, n_out: int, biases: frozenset[str] = frozenset()) -> None:
    """A linear map's weight, and its bias when config.json declares one on this module (``biases``: module names;
    a fused module has one when its first part does)."""
    out[f"{name}.weight"] = (n_in, n_out)
    leaf = name.rsplit(".", 1)[-1]
    if _BIAS_OF.get(leaf, leaf) in biases:
        out[f"{name}.bias"] = (n_out,)


def _swiglu(fc: FamilyConfig, out: dict, opt: dict, name: str, inter: int, names=("gate_proj", "up_proj", "down_proj"),
            fused: bool = True, biases: frozenset[str] = frozenset()) -> None:
    h = fc.hidden
    if fused and "up_gate_proj" in fc.fused:
        _linear(out, opt, f"{name}.up_gate_proj", h, 2 * inter, biases)
    else:
        _linear(out, opt, f"{name}.{names[0]}", h, inter, biases)
        _linear(out, opt, f"{name}.{names[1]}", h, inter, biases)
    _linear(out, opt, f"{name}.{names[2]}", inter, h, biases)


def _attention(fc: FamilyConfig, out: dict, opt: dict, p: str) -> None:
    h, H, K, D = fc.hidden, fc.heads, fc.kv_heads, fc.head_dim
    b = fc.biases
    if fc.mla is not None:
        m = fc.mla
        qk, dv = m["qk_nope"] + m["qk_rope"], m["v_head_dim"]
        if m["q_lora_rank"]:
            _linear(out, opt, f"{p}.q_a_proj", h, m["q_lora_rank"], b)
            out[f"{p}.q_a_layernorm.weight"] = (m["q_lora_rank"],)
            _linear(out, opt, f"{p}.q_b_proj", m["q_lora_rank"], H * qk)
        else:
            _linear(out, opt, f"{p}.q_proj", h, H * qk)
        _linear(out, opt, f"{p}.kv_a_proj_with_mqa", h, m["kv_lora_rank"] + m["qk_rope"], b)
        out[f"{p}.kv_a_layernorm.weight"] = (m["kv_lora_rank"],)
        _linear(out, opt, f"{p}.kv_b_proj", m["kv_lora_rank"], H * (m["qk_nope"] + dv))
        _linear(out, opt, f"{p}.o_proj", H * dv, h, b)
        return
    if "qkv_proj" in fc.fused:
        _linear(out, opt, f"{p}.qkv_proj", h, (H + 2 * K) * D, b)
    else:
        _linear(out, opt, f"{p}.q_proj", h, H * D, b)
        _linear(out, opt, f"{p}.k_proj", h, K * D, b)
        _linear(out, opt, f"{p}.v_proj", h, K * D, b)
    _linear(out, opt, f"{p}.o_proj", H * D, h, b)
    if fc.qk_norm:
        out[f"{p}.q_norm.weight"] = (D,)
        out[f"{p}.k_norm.weight"] = (D,)
    if fc.sinks:
        out[f"{p}.sinks"] = (H,)


def _moe(fc: FamilyConfig, out: dict, opt: dict, p: str) -> None:
    m = fc.moe
    out[f"{p}.gate.weight"] = (fc.hidden, m.experts)
    if m.router_bias:
        out[f"{p}.gate.bias"] = (m.experts,)
    if m.expert_bias:  # GPT-OSS: experts fused [gate | up] (de-interleaved on load), every projection with a bias
        both = frozenset({"gate_proj", "down_proj"})
        for e in range(m.experts):
            _linear(out, opt, f"{p}.experts.{e}.up_gate_proj", fc.hidden, 2 * m.intermediate, both)
            _linear(out, opt, f"{p}.experts.{e}.down_proj", m.intermediate, fc.hidden, both)
        return
    if m.correction_bias == "gate.e_score_correction_bias":
        out[f"{p}.{m.correction_bias}"] = (m.experts,)
    elif m.correction_bias:
        out[f"{p}.{m.correction_bias}"] = (1, m.experts)
    for e in range(m.experts):
        _swiglu(fc, out, opt, f"{p}.experts.{e}", m.intermediate, fc.expert_names)
    if m.shared_intermediate:
        _swiglu(fc, out, opt, f"{p}.{m.shared_name}", m.shared_intermediate)
        if m.shared_gated:
            out[f"{p}.shared_expert_gate.weight"] = (fc.hidden, 1)


def layer_tensors(fc: FamilyConfig, i: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(required, optional)`` runtime tensor names of decoder layer ``i`` and their shapes (optional: biases)."""
    out: dict[str, tuple[int, ...]] = {}
    opt: dict[str, tuple[int, ...]] = {}
    p = f"{PREFIX}.layers.{i}"
    out[f"{p}.input_layernorm.weight"] = (fc.hidden,)
    out[f"{p}.post_attention_layernorm.weight"] = (fc.hidden,)
    if fc.post_norms:  # Gemma 3: the attention's output normed too, and a norm before and after the MLP
        out[f"{p}.pre_feedforward_layernorm.weight"] = (fc.hidden,)
        out[f"{p}.post_feedforward_layernorm.weight"] = (fc.hidden,)
    _attention(fc, out, opt, f"{p}.self_attn")
    if i in fc.moe_layers:
        _moe(fc, out, opt, f"{p}.{fc.mlp_name}")
    else:
        _swiglu(fc, out, opt, f"{p}.mlp", fc.intermediate, biases=fc.biases)
    return out, opt


def outside_tensors(fc: FamilyConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    out = {f"{PREFIX}.embed_tokens.weight": (fc.vocab, fc.hidden), f"{PREFIX}.norm.weight": (fc.hidden,)}
    opt: dict[str, tuple[int, ...]] = {}
    if fc.tie:
        opt["lm_head.weight"] = (fc.vocab, fc.hidden)  # the embedding is the head: a saved copy must equal it
    else:
        out["lm_head.weight"] = (fc.vocab, fc.hidden)
    return out, opt


def expected(fc: FamilyConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Every required and optional runtime tensor of the model."""
    req, opt = outside_tensors(fc)
    for i in range(fc.layers):
        r, o = layer_tensors(fc, i)
        req.update(r)
        opt.update(o)
    return req, opt


def unused(name: str, fc: FamilyConfig) -> bool:
    """A checkpoint tensor scoring never uses: next-n / MTP layers (index >= num_hidden_layers, ``mtp*`` names)."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return bool(_MTP.search(name)) or (m is not None and int(m.group(1)) >= fc.layers)


def problems(fc: FamilyConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every way the runtime tensors ``shapes`` differ from the family's model: missing, unexpected, shape."""
    req, opt = expected(fc)
    found = []
    for name in sorted(req):
        if name not in shapes:
            found.append(f"{name}: missing from the checkpoint" + (" (config.json declares this bias)"
                                                                    if name.endswith(".bias") else ""))
        elif tuple(shapes[name]) != req[name]:
            found.append(f"{name}: checkpoint shape {tuple(shapes[name])} != model shape {req[name]}")
    for name in sorted(set(shapes) - set(req)):
        if name in opt:
            if tuple(shapes[name]) != opt[name]:
                found.append(f"{name}: checkpoint shape {tuple(shapes[name])} != model shape {opt[name]}")
        elif name.endswith(".bias") and f"{name[:-5]}.weight" in req:
            found.append(f"{name}: a bias config.json does not declare (transformers would not use it; set the "
                         f"config's bias flag if the model was trained with it, or remove the tensor)")
        elif not unused(name, fc):
            found.append(f"{name}: unexpected tensor (the {fc.title} model of config.json has no such weight)")
    return found
