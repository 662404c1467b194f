"""The PaddleFormers 1.2.0 builders produce real checkpoints, and the layout facts in notes/paddleformers.md hold.

Run under .venv-formers only: ``.venv-formers/bin/python -m pytest tests/formers``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import paddle
import pytest

from formers import builders as fb

IDS = [[5, 17, 42, 99, 7, 150, 3, 64]]
ARCHS = list(fb.ARCHS)


def _index_keys(folder, name="model.safetensors.index.json"):
    return set(json.loads((folder / name).read_text())["weight_map"])


# ---------------------------------------------------------------------------------------------------------
# save_pretrained layout
# ---------------------------------------------------------------------------------------------------------

def test_llama_save_layout(formers_models, formers_bases):
    d = formers_models["llama"]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
            "saved_signal_0", "vocab.json", "merges.txt"} <= names
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["paddleformers_version"] == "1.2.0" and cfg["torch_dtype"] == "float32" and "dtype" not in cfg
    assert cfg["vocab_size"] == json.loads((fb.DEMO_BASE / "config.json").read_text())["vocab_size"]
    disk = fb.read_safetensors(d)
    mem = {k: v.numpy() for k, v in formers_bases["llama"].state_dict().items()}
    assert set(disk) == set(mem) == _index_keys(d)
    for k, v in disk.items():
        if v.ndim == 2 and k not in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_array_equal(v, mem[k].T)  # HF [out, in] on disk, Paddle [in, out] in memory
        else:
            np.testing.assert_array_equal(v, mem[k])
    assert disk["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # GQA: 2 kv heads x 16
    assert disk["lm_head.weight"].shape == (cfg["vocab_size"], 64)


def test_ernie_saves_split_qkv_and_gate_up(formers_models, formers_bases):
    d = formers_models["ernie4_5"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Ernie4_5ForCausalLM"] and cfg["tie_word_embeddings"] is True
    disk = fb.read_safetensors(d)
    assert not any("qkv_proj" in k or "up_gate_proj" in k for k in disk)
    assert "lm_head.weight" not in disk  # tied: ERNIE does not save lm_head (Llama saves a copy)
    model = formers_bases["ernie4_5"]
    c = model.config
    attn = model.model.layers[0].self_attn
    q, k, v = (disk[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64)
    fused = fb.fuse_qkv(q, k, v, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    np.testing.assert_array_equal(fused, attn.qkv_proj.weight.numpy())
    naive = np.concatenate([q.T, k.T, v.T], axis=1)
    assert not np.array_equal(naive, attn.qkv_proj.weight.numpy())  # not [Q|K|V]
    for got, want in zip(fb.split_qkv(fused, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
                         (q.T, k.T, v.T)):
        np.testing.assert_array_equal(got, want)
    up_gate = model.model.layers[0].mlp.up_gate_proj.weight.numpy()
    np.testing.assert_array_equal(up_gate, np.concatenate([disk["model.layers.0.mlp.gate_proj.weight"].T,
                                                           disk["model.layers.0.mlp.up_proj.weight"].T], axis=1))


def test_moe_save_layout(formers_models, formers_bases):
    d = formers_models["ernie4_5_moe"]
    disk = fb.read_safetensors(d)
    mem = {k: v.numpy() for k, v in formers_bases["ernie4_5_moe"].state_dict().items()}
    assert disk["model.layers.1.mlp.gate.weight"].shape == (4, 64)  # [experts, hidden] on disk
    np.testing.assert_array_equal(disk["model.layers.1.mlp.gate.weight"].T, mem["model.layers.1.mlp.gate.weight"])
    np.testing.assert_array_equal(disk["model.layers.1.mlp.moe_statics.e_score_correction_bias"],
                                  mem["model.layers.1.mlp.moe_statics.e_score_correction_bias"])  # [1, E]
    for e in range(4):
        assert f"model.layers.1.mlp.experts.{e}.gate_proj.weight" in disk
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in disk
    assert "model.layers.0.mlp.gate_proj.weight" in disk  # layer 0 is dense


@pytest.mark.parametrize("key,dtype,st", [("llama16", "float16", "F16"), ("llama_bf16", "bfloat16", "BF16")])
def test_half_precision_saves(formers_models, key, dtype, st):
    d = formers_models[key]
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype
    raw = (d / "model-00001-of-00001.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {st}


# ---------------------------------------------------------------------------------------------------------
# Loading: paddleformers' own from_pretrained and a numpy-only external loader agree exactly
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_external_loader_and_from_pretrained_reproduce_logits(formers_models, formers_bases, arch):
    ref = fb.reference_logits(formers_bases[arch], IDS)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_array_equal(fb.reference_logits(fb.load_external(formers_models[arch]), IDS), ref)
    np.testing.assert_array_equal(fb.reference_logits(fb.load_pretrained(formers_models[arch]), IDS), ref)
    assert fb.METADATA_FILE not in {p.name for p in formers_models[arch].iterdir()}


@pytest.mark.parametrize("key", ["llama16", "llama_bf16"])
def test_half_checkpoints_upcast_to_float32(formers_models, formers_bases, key):
    ext = fb.load_external(formers_models[key])
    assert ext.lm_head.weight.dtype == paddle.float32
    theirs = fb.reference_logits(fb.load_pretrained(formers_models[key], dtype="float32"), IDS)
    ours = fb.reference_logits(ext, IDS)
    np.testing.assert_array_equal(ours, theirs)
    ref = fb.reference_logits(formers_bases["llama"], IDS)
    assert 0 < np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()  # rounding of the weights only (bf16: ~2%)


def test_from_pretrained_writes_metadata_into_the_folder(formers_models, copy_of):
    from paddleformers.transformers import AutoConfig, AutoModelForCausalLM

    d = copy_of(formers_models["llama"])
    config = AutoConfig.from_pretrained(str(d))
    config.fuse_rms_norm = False
    AutoModelForCausalLM.from_pretrained(str(d), config=config)
    assert (d / fb.METADATA_FILE).is_file()


def test_cpu_needs_fuse_rms_norm_false():
    model = fb.build_model("llama", fuse_rms_norm=True)
    with pytest.raises(RuntimeError, match="fused_rms_norm_ext"):
        fb.reference_logits(model, IDS)


# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------

def test_lora_files_config_and_shapes(formers_models):
    d = formers_models["ernie4_5_lora"]
    names = {p.name for p in d.iterdir()}
    assert {"lora_config.json", "config.json", "peft_model-00001-of-00001.safetensors",
            "peft_model.safetensors.index.json"} <= names
    cfg = json.loads((d / "lora_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["scaling"] == 2.0 and cfg["rslora"] is False
    assert cfg["base_model_name_or_path"] == str(formers_models["ernie4_5"])
    assert cfg["tensor_model_parallel_size"] == 1 and "pissa" not in cfg and "use_mora" not in cfg
    disk = fb.read_safetensors(d, "peft_model.safetensors.index.json")
    assert disk["model.layers.0.self_attn.qkv_proj.lora_A"].shape == (64, 4)      # [in, r]
    assert disk["model.layers.0.self_attn.qkv_proj.lora_B"].shape == (4, 128)     # [r, q+k+v out], fused
    assert disk["model.layers.0.mlp.up_gate_proj.lora_B"].shape == (4, 256)       # [r, gate|up]
    assert disk["model.layers.0.mlp.down_proj.lora_A"].shape == (128, 4)
    rs = json.loads((formers_models["llama_rslora"] / "lora_config.json").read_text())
    assert rs["rslora"] is True and rs["scaling"] == pytest.approx(4 / math.sqrt(8))


@pytest.mark.parametrize("base,adapter", [("llama", "llama_lora"), ("llama", "llama_rslora"),
                                          ("ernie4_5", "ernie4_5_lora"), ("ernie4_5_moe", "ernie4_5_moe_lora")])
def test_lora_changes_logits_and_merges_by_hand(formers_models, formers_bases, base, adapter):
    model = formers_bases[base]
    ref = fb.reference_logits(model, IDS)
    lora = fb.reference_lora_logits(model, formers_models[adapter], IDS)
    assert np.abs(lora - ref).max() > 0.1
    cfg = json.loads((formers_models[adapter] / "lora_config.json").read_text())
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["rslora"] else cfg["r"])
    ad = fb.read_safetensors(formers_models[adapter], "peft_model.safetensors.index.json")
    merged = fb.load_external(formers_models[base])
    state = merged.state_dict()
    for k in ad:
        if k.endswith(".lora_A"):
            w = k[: -len("lora_A")] + "weight"  # adapter keys = in-memory parameter names
            state[w].set_value(state[w].numpy() + ad[k] @ ad[k[:-1] + "B"] * scaling)
    np.testing.assert_allclose(fb.reference_logits(merged, IDS), lora, atol=1e-4)


def test_ernie_fused_lora_merges_into_split_disk_tensors(formers_models, formers_bases):
    """What a loader does with an ERNIE adapter (fused qkv/up_gate) on split HF-layout base weights."""
    c = formers_bases["ernie4_5"].config
    base = fb.read_safetensors(formers_models["ernie4_5"])
    ad = fb.read_safetensors(formers_models["ernie4_5_lora"], "peft_model.safetensors.index.json")
    s = json.loads((formers_models["ernie4_5_lora"] / "lora_config.json").read_text())["scaling"]
    for k in ad:
        if not k.endswith(".lora_A"):
            continue
        mod = k[: -len(".lora_A")]
        delta = ad[k] @ ad[mod + ".lora_B"] * s  # Paddle layout [in, out]
        if mod.endswith("qkv_proj"):
            p = mod[: -len("qkv_proj")]
            for x, dx in zip("qkv", fb.split_qkv(delta, c.num_attention_heads, c.num_key_value_heads, c.head_dim)):
                base[p + f"{x}_proj.weight"] = base[p + f"{x}_proj.weight"] + dx.T
        elif mod.endswith("up_gate_proj"):
            p = mod[: -len("up_gate_proj")]
            half = delta.shape[1] // 2
            base[p + "gate_proj.weight"] = base[p + "gate_proj.weight"] + delta[:, :half].T
            base[p + "up_proj.weight"] = base[p + "up_proj.weight"] + delta[:, half:].T
        else:
            base[mod + ".weight"] = base[mod + ".weight"] + delta.T
    model = fb.build_empty(c)
    want = fb.hf_to_paddle_state(base, c)
    for name, p in model.state_dict().items():
        p.set_value(want[name])
    model.eval()
    lora = fb.reference_lora_logits(formers_bases["ernie4_5"], formers_models["ernie4_5_lora"], IDS)
    np.testing.assert_allclose(fb.reference_logits(model, IDS), lora, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# The model body: masks, positions, cache
# ---------------------------------------------------------------------------------------------------------

def _tree():
    prompt, a, b = [5, 17, 42, 99], [7, 150], [3, 64]
    n = len(prompt)
    mask = np.zeros((8, 8), bool)
    for i in range(n):
        mask[i, : i + 1] = True
    for j in range(2):
        mask[n + j, :n] = True
        mask[n + j, n:n + j + 1] = True
        mask[n + 2 + j, :n] = True
        mask[n + 2 + j, n + 2:n + 3 + j] = True
    return prompt, a, b, mask[None, None], [[0, 1, 2, 3, 4, 5, 4, 5]]


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_4d_bool_tree_mask_and_position_ids(formers_bases, arch):
    model = formers_bases[arch]
    plain = fb.reference_logits(model, IDS)
    causal = np.tril(np.ones((8, 8), bool))[None, None]
    np.testing.assert_array_equal(fb.reference_logits(model, IDS, causal, [list(range(8))]), plain)
    prompt, a, b, mask, pos = _tree()
    tree = fb.reference_logits(model, [prompt + a + b], mask, pos)[0]
    ra = fb.reference_logits(model, [prompt + a])[0]
    rb = fb.reference_logits(model, [prompt + b])[0]
    tol = 1e-4 * max(1.0, np.abs(plain).max())  # measured: <= 4e-5 at |logit| ~ 16
    assert np.abs(tree[:6] - ra).max() < tol
    assert np.abs(tree[6:] - rb[4:]).max() < tol


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_padding_with_2d_masks(formers_bases, arch):
    model = formers_bases[arch]
    short = [5, 17, 42, 99]
    ref = fb.reference_logits(model, [short])[0]
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    right = fb.reference_logits(model, [IDS[0], short + [0] * 4], [[1] * 8, [1] * 4 + [0] * 4])
    assert np.abs(right[1, :4] - ref).max() < tol
    left = fb.reference_logits(model, [IDS[0], [0] * 4 + short], [[1] * 8, [0] * 4 + [1] * 4],
                               [list(range(8)), [0] * 4 + list(range(4))])
    assert np.abs(left[1, 4:] - ref).max() < tol
    assert np.isfinite(left).all() and np.isfinite(right).all()


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_dynamic_cache_decode_and_row_selection(formers_bases, arch):
    from paddleformers.transformers.cache_utils import DynamicCache

    model = formers_bases[arch]
    full = fb.reference_logits(model, IDS)[0]
    ids = paddle.to_tensor(IDS)
    with paddle.no_grad():
        out = model(ids[:, :6], use_cache=True, return_dict=True)
        cache = out.past_key_values
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 6 and len(cache) == 2
        assert list(cache.layers[0].keys.shape) == [1, 2, 6, 16]  # [B, kv_heads, L, head_dim]
        step = model(ids[:, 6:], past_key_values=cache, position_ids=paddle.to_tensor([[6, 7]]), use_cache=True,
                     return_dict=True)
    assert np.abs(step.logits.numpy()[0] - full[6:]).max() < 1e-4 * max(1.0, np.abs(full).max())
    # select batch rows without mutating: a new DynamicCache from (k[rows], v[rows]) per layer
    with paddle.no_grad():
        two = model(paddle.to_tensor([IDS[0][:6], [9, 8, 7, 6, 5, 4]]), use_cache=True, return_dict=True)
        row = DynamicCache(ddp_cache_data=[(k[[1]], v[[1]]) for k, v, _ in two.past_key_values])
        nxt = model(paddle.to_tensor([[44]]), past_key_values=row, position_ids=paddle.to_tensor([[6]]),
                    use_cache=True, return_dict=True).logits.numpy()[0, -1]
    want = fb.reference_logits(model, [[9, 8, 7, 6, 5, 4, 44]])[0, -1]
    assert np.abs(nxt - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert two.past_key_values.layers[0].keys.shape[0] == 2


def test_ernie_decode_needs_explicit_position_ids(formers_bases):
    model = formers_bases["ernie4_5"]
    ids = paddle.to_tensor(IDS)
    with paddle.no_grad():
        cache = model(ids[:, :6], use_cache=True, return_dict=True).past_key_values
        with pytest.raises(ValueError, match="Broadcast dimension mismatch"):
            model(ids[:, 6:], past_key_values=cache, use_cache=True, return_dict=True)


# ---------------------------------------------------------------------------------------------------------
# ERNIE 4.5 MoE on CPU
# ---------------------------------------------------------------------------------------------------------

def test_moe_forward_needs_a_gpu_kernel(formers_bases):
    with paddle.no_grad(), pytest.raises(RuntimeError, match="expand_modality_expert_id"):
        formers_bases["ernie4_5_moe"](paddle.to_tensor(IDS), return_dict=True)


def test_cpu_moe_forward_routing():
    model = fb.build_model("ernie4_5_moe", seed=7, moe_k=1)
    block = model.model.layers[1].mlp
    x = paddle.randn([5, 64])
    # a huge correction bias on expert 2 routes every token there, with weight 1 (renormalised top-1)
    bias = np.zeros([1, 4], "float32")
    bias[0, 2] = 100.0
    block.moe_statics.e_score_correction_bias.set_value(bias)
    with paddle.no_grad(), fb.cpu_moe_forward():
        out, _, _, logits = block(x)
        want = block.experts[2](x) + block.shared_experts(x)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-6)
    assert list(logits.shape) == [5, 4]
    # identical experts, top-2: renormalised weights sum to 1
    model = fb.build_model("ernie4_5_moe", seed=8)
    block = model.model.layers[1].mlp
    for e in block.experts[1:]:
        e.set_state_dict(block.experts[0].state_dict())
    with paddle.no_grad(), fb.cpu_moe_forward():
        out = block(x)[0]
        want = block.experts[0](x) + block.shared_experts(x)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-5)
