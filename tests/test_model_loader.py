"""The loader on real tiny PaddleNLP models: same logits every way, and every refusal on a real crafted folder."""

import json
import math

import numpy as np
import pytest

import builders
from paddle_scorer.errors import CheckpointError, DtypeError, UnsafeCheckpointError, UsageError, WeightMismatchError
from paddle_scorer.model.loader import load
from paddle_scorer.process.environment import paddle
from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

IDS = [[5, 17, 42, 99, 7, 150, 3, 64]]


def logits(loaded, ids=IDS):
    pd = paddle()
    with pd.no_grad():
        return loaded.model(pd.to_tensor(ids), return_dict=True).logits.numpy().astype(np.float64)


@pytest.fixture(scope="module")
def llama_logits(models):
    """Logits of the plain base, the attached adapter and the merged adapter."""
    return {
        "base": logits(load(models["llama"])),
        "attach": logits(load(models["llama"], models["llama_lora"], mode="attach")),
        "merge": logits(load(models["llama"], models["llama_lora"], mode="merge")),
    }


def test_attach_equals_merge_and_the_adapter_matters(llama_logits):
    np.testing.assert_allclose(llama_logits["attach"], llama_logits["merge"], atol=1e-5)
    assert np.abs(llama_logits["attach"] - llama_logits["base"]).max() > 1e-2


def test_attach_equals_paddlenlp_own_lora_model(models, llama_logits):
    from paddlenlp.peft import LoRAModel
    from paddlenlp.transformers import AutoModelForCausalLM

    pd = paddle()
    base = AutoModelForCausalLM.from_pretrained(str(models["llama"]))
    ref = LoRAModel.from_pretrained(base, str(models["llama_lora"]))
    ref.eval()
    with pd.no_grad():
        theirs = ref(pd.to_tensor(IDS), return_dict=True).logits.numpy()
    np.testing.assert_allclose(llama_logits["attach"], theirs, atol=1e-5)


def test_qwen2_attach_equals_merge(models):
    a = logits(load(models["qwen2"], models["qwen2_lora"], mode="attach"))
    m = logits(load(models["qwen2"], models["qwen2_lora"], mode="merge"))
    b = logits(load(models["qwen2"]))
    np.testing.assert_allclose(a, m, atol=1e-5)
    assert np.abs(a - b).max() > 1e-2


def test_model_can_be_omitted_when_the_adapter_names_a_local_base(models, llama_logits):
    loaded = load(lora=models["llama_lora"])
    assert loaded.facts.model_path == str(models["llama"].resolve())
    np.testing.assert_allclose(logits(loaded), llama_logits["attach"], atol=1e-6)


def test_facts_record_policy_hash_and_scaling(models):
    loaded = load(models["llama16"], models["llama_lora"], mode="merge")
    f = loaded.facts
    assert f.policy["device"] == "cpu" and f.policy["dtype"] == "float32"
    assert f.policy["stored_dtype"] == "float16" and f.policy["upcast"] is True
    assert f.scaling == 2.0 and f.mode == "merge" and len(f.adapter_sha256) == 64
    assert str(loaded.model.parameters()[0].dtype).endswith("float32")


def test_fp16_checkpoint_loads_as_fp32_and_matches_its_fp32_twin(models, tmp_path):
    half = logits(load(models["llama16"]))
    full = logits(load(models["llama"]))
    # Same weights rounded to fp16, stored as fp32: must give identical logits.
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in models["llama"].iterdir():
        (twin / f.name).write_bytes(f.read_bytes())
    sd = read_pdparams(twin / "model_state.pdparams")
    write_pdparams({k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}, twin / "model_state.pdparams")
    rounded = logits(load(twin))
    np.testing.assert_allclose(half, rounded, atol=1e-5)
    # and differs from the unrounded model only by fp16 rounding of the weights
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_fp16_on_cpu_is_refused_before_any_weight_is_read(models, copy_of):
    folder = copy_of(models["llama16"])
    (folder / "model_state.pdparams").write_bytes(b"garbage")  # reading it would raise CheckpointError
    with pytest.raises(DtypeError, match="--dtype float16 cannot run on CPU.*no float16 kernels"):
        load(folder, device="cpu", dtype="float16")


def test_rslora_merge_equals_numpy(models):
    loaded = load(models["llama"], models["llama_rslora"], mode="merge")
    base = read_pdparams(models["llama"] / "model_state.pdparams")
    ad = read_pdparams(models["llama_rslora"] / "lora_model_state.pdparams")
    cfg = json.loads((models["llama_rslora"] / "lora_config.json").read_text())
    scaling = cfg["lora_alpha"] / math.sqrt(cfg["r"])
    params = loaded.model.state_dict()
    name = "llama.layers.1.self_attn.v_proj"
    expect = base[name + ".weight"].astype(np.float64) + (
        ad[name + ".lora_A"].astype(np.float64) @ ad[name + ".lora_B"].astype(np.float64)) * scaling
    np.testing.assert_allclose(params[name + ".weight"].numpy(), expect, atol=1e-5)
    assert loaded.facts.scaling == pytest.approx(scaling)
    # no LoRA layers remain after a merge
    assert not any("lora" in k for k in params)


def test_paddleformers_model_prefix_is_mapped_not_skipped(models, copy_of, llama_logits):
    lora = copy_of(models["llama_lora"])
    sd = read_pdparams(lora / "lora_model_state.pdparams")
    write_pdparams({"model." + k.split(".", 1)[1]: v for k, v in sd.items()}, lora / "lora_model_state.pdparams")
    loaded = load(models["llama"], lora)
    assert "`model.` -> `llama.`" in loaded.facts.adapter_key_mapping
    np.testing.assert_allclose(logits(loaded), llama_logits["attach"], atol=1e-6)


# ---------------------------------------------------------------- refusals on crafted folders


def test_missing_adapter_file(models, copy_of):
    lora = copy_of(models["llama_lora"])
    (lora / "lora_model_state.pdparams").unlink()
    with pytest.raises(CheckpointError, match="no adapter weights.*silently create an empty adapter"):
        load(models["llama"], lora)


def test_missing_base_tensor_is_never_randomly_initialised(models, copy_of):
    base = copy_of(models["llama"])
    sd = read_pdparams(base / "model_state.pdparams")
    del sd["llama.layers.1.mlp.up_proj.weight"]
    del sd["lm_head.weight"]
    write_pdparams(sd, base / "model_state.pdparams")
    with pytest.raises(WeightMismatchError) as exc:
        load(base)
    msg = str(exc.value)
    assert "llama.layers.1.mlp.up_proj.weight: missing from the checkpoint" in msg
    assert "lm_head.weight: missing" in msg  # all problems, not just the first


def test_adapter_for_another_architecture_is_refused(models, copy_of):
    # lora_config.json names the qwen2 base: refused before any tensor is read, naming both models
    with pytest.raises(CheckpointError, match="trained on .*qwen2.* is a different model .*model_type 'qwen2' vs 'llama'"):
        load(models["llama"], models["qwen2_lora"])
    # without the name, the tensors themselves do not fit
    lora = copy_of(models["qwen2_lora"])
    cfg = json.loads((lora / "lora_config.json").read_text())
    del cfg["base_model_name_or_path"]
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match="no module `qwen2.layers.0.self_attn.q_proj` in the base"):
        load(models["llama"], lora)


def test_adapter_shape_mismatch_lists_every_module(models, copy_of):
    lora = copy_of(models["llama_lora"])
    cfg = json.loads((lora / "lora_config.json").read_text())
    cfg["r"] = 8
    del cfg["scaling"]  # else the saved scaling (alpha / 4) contradicts r=8 and that is refused first
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError) as exc:
        load(models["llama"], lora)
    assert str(exc.value).count("do not fit the base weight") == 6


def test_target_module_without_weights_is_refused(models, copy_of):
    lora = copy_of(models["llama_lora"])
    sd = read_pdparams(lora / "lora_model_state.pdparams")
    sd = {k: v for k, v in sd.items() if "layers.1.self_attn.q_proj" not in k}
    write_pdparams(sd, lora / "lora_model_state.pdparams")
    with pytest.raises(WeightMismatchError, match="layers.1.self_attn.q_proj: matches target_modules but the adapter has no weights"):
        load(models["llama"], lora)


def test_renamed_adapter_passed_as_model(models, copy_of):
    trap = copy_of(models["llama"], "trap")
    (trap / "model_state.pdparams").write_bytes((models["llama_lora"] / "lora_model_state.pdparams").read_bytes())
    with pytest.raises(CheckpointError, match="renamed LoRA adapter.*rename it back to lora_model_state.pdparams"):
        load(trap)


def test_adapter_passed_as_model_is_explained(models):
    with pytest.raises(UsageError, match="is a LoRA adapter, not a model; pass it as --lora"):
        load(models["llama_lora"])


@pytest.mark.parametrize("where", ["base", "adapter"])
def test_nan_weights_are_refused(models, copy_of, where):
    base, lora = models["llama"], models["llama_lora"]
    if where == "base":
        base = copy_of(base)
        f = base / "model_state.pdparams"
        key = "llama.layers.0.self_attn.o_proj.weight"
    else:
        lora = copy_of(lora)
        f = lora / "lora_model_state.pdparams"
        key = "llama.layers.0.mlp.down_proj.lora_B"
    sd = read_pdparams(f)
    sd[key][0, 0] = np.nan
    write_pdparams(sd, f)
    with pytest.raises(WeightMismatchError, match=f"(?s)contain NaN/inf.*{key}: 1 NaN/inf"):
        load(base, lora)


def test_merge_overflow_is_refused(models, copy_of):
    lora = copy_of(models["llama_lora"])
    sd = read_pdparams(lora / "lora_model_state.pdparams")
    sd["llama.layers.0.self_attn.q_proj.lora_A"][:] = 1e30
    sd["llama.layers.0.self_attn.q_proj.lora_B"][:] = 1e30
    write_pdparams(sd, lora / "lora_model_state.pdparams")
    with pytest.raises(WeightMismatchError, match="merged weight has NaN/inf"):
        load(models["llama"], lora, mode="merge")


@pytest.mark.parametrize("variant", ["pissa", "use_mora"])
def test_unsupported_variants_are_refused_by_name(models, copy_of, variant):
    lora = copy_of(models["llama_lora"])
    cfg = json.loads((lora / "lora_config.json").read_text())
    cfg[variant] = True
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"is a {variant} adapter.*does not support"):
        load(models["llama"], lora)


def test_pickle_payload_in_model_folder_executes_nothing(models, copy_of, tmp_path):
    folder = copy_of(models["llama"])
    marker = tmp_path / "pwned"
    builders.make_pickle_bomb(folder / "model_state.pdparams", marker)
    with pytest.raises(UnsafeCheckpointError):
        load(folder)
    assert not marker.exists()


def test_safetensors_sharded_base_and_adapter(models, tmp_path):
    from paddle_scorer.checkpoint.weights import write_safetensors

    base_st = tmp_path / "base"
    base_st.mkdir()
    for name in ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (models["llama"] / name).exists():
            (base_st / name).write_bytes((models["llama"] / name).read_bytes())
    sd = read_pdparams(models["llama"] / "model_state.pdparams")
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    wmap = {}
    for i, part in enumerate(halves, 1):
        fname = f"model-0000{i}-of-00002.safetensors"
        write_safetensors({k: sd[k] for k in part}, base_st / fname)
        wmap.update({k: fname for k in part})
    (base_st / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    lora_st = tmp_path / "lora"
    lora_st.mkdir()
    (lora_st / "lora_config.json").write_bytes((models["llama_lora"] / "lora_config.json").read_bytes())
    ad = read_pdparams(models["llama_lora"] / "lora_model_state.pdparams")
    write_safetensors(ad, lora_st / "peft_model-00001-of-00001.safetensors")
    (lora_st / "peft_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "peft_model-00001-of-00001.safetensors" for k in ad}}))
    a = logits(load(base_st, lora_st))
    b = logits(load(models["llama"], models["llama_lora"]))
    np.testing.assert_allclose(a, b, atol=1e-6)
