"""The families paddle-scorer's decoder computes without a model library (Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral,
DeepSeek-V3, GLM-4.5, ERNIE 4.5 MoE) against their reference implementation, HF transformers' forward on the same
weights (tests/family_fixtures.py), through the CLI: classify with a multi-token label and generate, in RAM and streamed;
LoRA adapters saved by PaddleNLP's own LoRAModel on the families PaddleNLP builds (Mixtral, Qwen2-MoE, DeepSeek-V3),
attached and merged, against the reference with the adapter merged into its weights; what inspect says of each."""

from __future__ import annotations

import copy
import shutil
import json
from pathlib import Path

import numpy as np
import pytest

import builders
import family_fixtures as ff
from cli_runs import run

TEMPLATE = builders.DEMO_SCORER["template"]
LABELS = "goods,life,goods and things"  # single-token labels and a 3-token one (the tree mask)
FAMILIES = list(ff.FAMILIES)
TOL = 1e-5  # per label token, what docs/checkpoints.md promises (measured: ~1e-6, see the deltas summary)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: (root / f, ff.build_hf(f, root / f)) for f in FAMILIES}


def classify(tmp_path, folder, *extra, env=None):
    out = tmp_path / "out.jsonl"
    run("classify", "--model", folder, "--labels", LABELS, "--template", TEMPLATE, "--input", builders.DEMO_QUERIES,
        "--limit", 3, "--output", out, *extra, env=env)
    return [json.loads(x) for x in open(out)], json.loads(out.with_name(out.name + ".meta.json").read_text())


@pytest.mark.parametrize("execution", ["in-ram", "streamed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_classify_equals_transformers(hf, tmp_path, family, execution, deltas):
    folder, model = hf[family]
    recs, meta = classify(tmp_path, folder, "--execution", execution)
    assert meta["model"]["compute"]["forward"] == "paddle-scorer decoder"
    assert meta["model"]["compute"]["family"] == family and meta["execution"] == execution
    assert any(len(ids) > 1 for ids in recs[0]["label_token_ids"].values())  # a multi-token label was scored
    d = deltas.record(f"nlp env: {family} classify ({execution}) vs transformers, per label token",
                      ff.worst_per_token(recs, model))
    assert d <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_transformers_greedy(hf, family, deltas):
    folder, model = hf[family]
    r = run("generate", "--model", folder, "--prompt", "what is the price of cabbage", "--raw", "--max-new-tokens", 6,
            "--top-k", 2, "--json")
    rec = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")][0]
    steps = rec["steps"]
    want, lps = ff.greedy(model, rec["prompt_token_ids"], len(steps))
    assert [s["token_id"] for s in steps] == want
    d = deltas.record(f"nlp env: {family} generate vs transformers greedy, per step",
                      max(abs(s["logprob"] - lp) for s, lp in zip(steps, lps)))
    assert d <= TOL


# PaddleNLP's own classes for the families it builds (its forwards do not run on CPU under paddle 3.3, its LoRAModel
# does: the adapters are real), the modules adapted, and what its class needs of the config (PaddleNLP's Qwen2-MoE
# makes every layer sparse, whatever decoder_sparse_step says: a base with step 1 for its adapter)
_PADDLENLP = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", [".*q_proj.*", ".*v_proj.*", ".*o_proj.*", ".*experts.*w1.*",
                                                        ".*experts.*w2.*"], {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", [".*q_proj.*", ".*k_proj.*", ".*v_proj.*",
                                                            ".*experts.*gate_proj.*", ".*shared_expert.down_proj.*"],
                  {"decoder_sparse_step": 1}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", [".*q_b_proj.*", ".*kv_b_proj.*", ".*o_proj.*",
                                                                  ".*experts.*up_proj.*", ".*shared_experts.down_proj.*"], {}),
}


def paddlenlp_adapter(family: str, base: "object", folder, r: int = 4, alpha: float = 8.0):
    """A LoRA adapter saved by PaddleNLP's LoRAModel on its own class for ``family`` (config from the HF model's),
    with random non-zero A and B; returns its arrays and scaling."""
    import paddlenlp.transformers as t
    from paddlenlp.peft import LoRAConfig, LoRAModel

    from paddle_scorer.checkpoint.describe import describe
    from paddle_scorer.checkpoint.weights import read_files

    cfg_name, lm_name, targets, _ = _PADDLENLP[family]
    hf_cfg = base.config.to_dict()
    if hf_cfg.get("rope_scaling"):  # PaddleNLP's DeepSeek reads the old key
        hf_cfg["rope_scaling"] = dict(hf_cfg["rope_scaling"], type=hf_cfg["rope_scaling"].get("rope_type"))
    config = getattr(t, cfg_name)(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    model = getattr(t, lm_name)(config)
    lora = LoRAModel(model, LoRAConfig(r=r, lora_alpha=alpha, target_modules=targets, dtype="float32",
                                       base_model_name_or_path=None))
    rng = np.random.default_rng(7)
    for name, p in lora.model.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            p.set_value(rng.normal(0.0, 0.2, p.shape).astype("float32"))
    lora.save_pretrained(str(folder))
    return read_files([Path(f) for f in describe(folder).adapter_weights.files]), alpha / r


@pytest.mark.parametrize("mode", ["attach", "merge"])
@pytest.mark.parametrize("family", list(_PADDLENLP))
def test_paddlenlp_lora_attached_and_merged_equal_transformers(hf, tmp_path, family, mode, deltas):
    folder, model = hf[family]
    if _PADDLENLP[family][3]:
        folder = tmp_path / "base"
        model = ff.build_hf(family, folder, **_PADDLENLP[family][3])
    adapter, scaling = paddlenlp_adapter(family, model, tmp_path / "lora")
    reference = copy.deepcopy(model)
    ff.merge_adapter_into(reference, adapter, scaling, prefix=family)
    for execution in ("in-ram", "streamed"):
        recs, meta = classify(tmp_path, folder, "--lora", tmp_path / "lora", "--mode", mode, "--execution", execution,
                              "--overwrite")
        assert meta["model"]["adapter_path"] and meta["model"]["mode"] == mode
        d = deltas.record(f"nlp env: {family} + PaddleNLP LoRA ({mode}, {execution}) vs transformers merged",
                          ff.worst_per_token(recs, reference))
        assert d <= TOL
        assert ff.worst_per_token(recs, model) > 1e-3  # the adapter changes the scores


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_names_the_family_experts_and_active_parameters(hf, family):
    folder, model = hf[family]
    facts = json.loads(run("inspect", folder, "--json").stdout)
    a = facts["assessment"]
    assert a["usable"] and a["library"] == "paddle-scorer"
    fam = a["family"]
    assert fam["family"] == family and fam["runs_on"] == "cpu"
    seen, total = set(), 0
    for t in model.state_dict().values():  # what save_pretrained writes; a tied head is the embedding, counted once
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    assert fam["params_total"] == total
    cfg = ff.FAMILIES[family][2]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or \
        cfg.get("moe_num_experts")
    if experts:
        assert fam["experts"] == experts and fam["experts_per_token"] == (cfg.get("num_experts_per_tok") or cfg["moe_k"])
        assert fam["params_active"] < fam["params_total"]
    else:
        assert fam["experts"] is None and fam["params_active"] == fam["params_total"]
    text = run("inspect", folder).stdout
    assert ff.FAMILIES[family][1] in text and "paddle-scorer's CPU decoder" in text


_ADAPTED = ("q_proj", "o_proj", "qkv_proj", "gate_proj", "down_proj", "gate_up_proj")


@pytest.mark.parametrize("mode", ["attach", "merge"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gemma3", "gpt_oss"])
def test_lora_on_the_new_dense_families_equals_transformers_merged(hf, tmp_path, family, mode, deltas):
    """An adapter on the attention and MLP projections, under the names the checkpoint has (Phi-3's stored fused
    qkv_proj [q | k | v], run grouped per KV head, and gate_up_proj), attached and merged, in RAM and streamed."""
    import torch

    folder, model = hf[family]
    targets = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in _ADAPTED}
    assert targets
    adapter, scaling = ff.paddle_format_adapter(tmp_path / "lora", targets)
    reference = copy.deepcopy(model)
    ff.merge_adapter_into(reference, adapter, scaling, prefix="model")
    for execution in ("in-ram", "streamed"):
        recs, meta = classify(tmp_path, folder, "--lora", tmp_path / "lora", "--mode", mode, "--execution", execution,
                              "--overwrite")
        d = deltas.record(f"nlp env: {family} + LoRA ({mode}, {execution}) vs transformers merged",
                          ff.worst_per_token(recs, reference))
        assert d <= TOL
        assert ff.worst_per_token(recs, model) > 1e-3


def test_phi3_merge_writes_its_stored_fused_layout_back(hf, tmp_path):
    folder, model = hf["phi3"]
    cfg = model.config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * (cfg.hidden_size // cfg.num_attention_heads)
    adapter, scaling = ff.paddle_format_adapter(tmp_path / "lora", {"model.layers.0.self_attn.qkv_proj": (cfg.hidden_size, qkv),
                                                                  "model.layers.1.self_attn.qkv_proj": (cfg.hidden_size, qkv),
                                                                  "model.layers.0.mlp.gate_up_proj": (cfg.hidden_size, 2 * cfg.intermediate_size),
                                                                  "model.layers.1.mlp.gate_up_proj": (cfg.hidden_size, 2 * cfg.intermediate_size)})
    run("merge", "--model", folder, "--lora", tmp_path / "lora", "--out", tmp_path / "merged")
    from safetensors.numpy import load_file

    merged = {}
    for f in sorted((tmp_path / "merged").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    want = model.state_dict()["model.layers.0.self_attn.qkv_proj.weight"].numpy().astype(np.float64) + \
        (adapter["model.layers.0.self_attn.qkv_proj.lora_A"].astype(np.float64)
         @ adapter["model.layers.0.self_attn.qkv_proj.lora_B"].astype(np.float64) * scaling).T
    np.testing.assert_allclose(merged["model.layers.0.self_attn.qkv_proj.weight"], want, atol=1e-5)
    reference = copy.deepcopy(model)
    ff.merge_adapter_into(reference, adapter, scaling, prefix="model")
    recs, _ = classify(tmp_path, tmp_path / "merged", "--overwrite")
    assert ff.worst_per_token(recs, reference) <= TOL


_FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def _to_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [E, out, in]`` as MXFP4 ``(blocks [E, out, in/32, 16], scales [E, out, in/32])``: a power-of-two scale per
    32 values (the smallest that brings them within 6), each value rounded to the nearest E2M1 number."""
    E, O, In = w.shape
    g = w.reshape(E, O, In // 32, 32).astype(np.float64)
    amax = np.abs(g).max(-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), -127).clip(-127, 127).astype(np.int32)
    q = g / np.ldexp(1.0, exp)[..., None]
    idx = np.abs(q[..., None] - _FP4[None, None, None, None, :8].astype(np.float64) * np.sign(q)[..., None]).argmin(-1)
    idx = np.where(q < 0, idx + 8, idx).astype(np.uint8)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)


def test_gpt_oss_with_mxfp4_experts_equals_transformers_dequantized(hf, tmp_path, deltas):
    """The released GPT-OSS checkpoints hold their experts as MXFP4 ``_blocks`` + ``_scales``: dequantized on load
    exactly as transformers' own ``convert_moe_packed_tensors`` does (its result is the reference's expert weights)."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, model = hf["gpt_oss"]
    q = tmp_path / "mxfp4"
    shutil.copytree(folder, q)
    tensors = load_file(str(q / "model.safetensors"))
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _to_mxfp4(np.ascontiguousarray(tensors.pop(name).transpose(0, 2, 1)))  # [E, out, in]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        deq = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
        with torch.no_grad():
            params[name].copy_(deq.transpose(1, 2))
    save_file(tensors, str(q / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.router",
                                                                                      "model.embed_tokens", "lm_head"]}
    (q / "config.json").write_text(json.dumps(cfg))
    for execution in ("in-ram", "streamed"):
        recs, _ = classify(tmp_path, q, "--execution", execution, "--overwrite")
        d = deltas.record(f"nlp env: gpt_oss with MXFP4 experts ({execution}) vs transformers dequantized",
                          ff.worst_per_token(recs, reference))
        assert d <= TOL
    assert ff.worst_per_token(recs, model) > 1e-4  # the quantized experts were read, not some float copy
