"""inspect and refusals on PaddleFormers 1.2.0 checkpoints: the layout is what the folder says (never guessed from
shapes, so square matrices come out right), who saved it, which library builds it; MoE refused on CPU before
loading; unknown architectures in one sentence naming the libraries tried and what each builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from formers import builders as fb
from paddle_scorer.compute.choose_backend import backend_for
from paddle_scorer.cli.app import app
from paddle_scorer.model.loader import load

runner = CliRunner()
TOL = 1e-5


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def inspect_json(path):
    r = cli("inspect", path, "--json")
    return r, json.loads(r.stdout)


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def one_sentence(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("arch,archname", [("llama", "LlamaForCausalLM"), ("ernie4_5", "Ernie4_5ForCausalLM")])
def test_inspect_base_reports_layout_saver_and_library(arch, archname, formers_models):
    r, data = inspect_json(formers_models[arch])
    assert r.exit_code == 0, r.output
    a = data["assessment"]
    assert a["usable"] is True and a["library"] == "paddleformers" and a["library_installed"] is True
    assert a["layout"]["kind"] == "hf" and a["layout"]["saved_by"] == "PaddleFormers 1.2.0"
    assert "paddleformers_version" in a["layout"]["evidence"]
    assert data["architecture"] == archname
    text = cli("inspect", formers_models[arch]).stdout
    flat = " ".join(text.split())
    assert "PaddleFormers / HF layout" in flat and "converted on load" in flat
    assert "saved by PaddleFormers 1.2.0" in flat and "built by paddleformers" in flat


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_inspect_adapter_reports_saver_and_library(arch, formers_models):
    r, data = inspect_json(formers_models[f"{arch}_lora"])
    assert r.exit_code == 0, r.output
    assert data["kind"] == "lora-adapter" and data["assessment"]["usable"] is True
    assert data["adapter"]["saved_by"] == "PaddleFormers 1.2.0"
    assert data["assessment"]["library"] == "paddleformers"
    assert "peft_model.safetensors.index.json" in data["summary"]
    flat = " ".join(cli("inspect", formers_models[f"{arch}_lora"]).stdout.split())
    assert "saved by PaddleFormers 1.2.0" in flat and "next: paddle-scorer classify" in flat


def test_moe_runs_on_cpu_with_the_decoder_and_is_checked_before_scoring(formers_models, copy_of):
    """ERNIE 4.5 MoE, whose PaddleFormers forward needs GPU kernels, runs on CPU with paddle-scorer's decoder (its
    numbers: tests/formers/test_formers_families.py); inspect, smoke and the loader's NaN check say so."""
    r, data = inspect_json(formers_models["ernie4_5_moe"])
    a = data["assessment"]
    assert r.exit_code == 0 and a["gpu_only"] is None and a["library"] == "paddle-scorer"
    assert a["family"]["family"] == "ernie4_5_moe" and a["family"]["experts"] == 4
    text = " ".join(cli("inspect", formers_models["ernie4_5_moe"]).stdout.split())
    assert "ERNIE 4.5 MoE" in text and "paddle-scorer's CPU decoder" in text
    r = cli("smoke", "--model", formers_models["ernie4_5_moe"], "--lora", formers_models["ernie4_5_moe_lora"],
            "--labels", "a,b", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.exit_code == 0 and checks["score"]["status"] == "PASS" and checks["adapter fits base"]["status"] == "PASS"
    folder = copy_of(formers_models["ernie4_5_moe"])
    shard = folder / "model-00001-of-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)  # every float32 a NaN
    shard.write_bytes(bytes(raw))
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 4 and "NaN/inf" in r.stderr


def test_unknown_architecture_is_one_sentence_naming_what_each_library_builds(formers_models, copy_of):
    folder = copy_of(formers_models["llama"])
    edit_config(folder, architectures=["MambaForCausalLM"], model_type="mamba")
    r, data = inspect_json(folder)
    assert r.exit_code == 7 and data["assessment"]["usable"] is False
    msg = data["assessment"]["refusal"]
    assert "MambaForCausalLM is not supported yet" in msg
    assert "paddlenlp builds LlamaForCausalLM, Qwen2ForCausalLM" in msg
    assert "paddleformers builds LlamaForCausalLM, Ernie4_5ForCausalLM, Ernie4_5_MoeForCausalLM" in msg
    assert "paddle-scorer's own CPU decoder computes Llama, Mistral, Qwen2, Phi-3, Gemma 3, GPT-OSS, Qwen3" in msg
    assert "DeepSeek-V3" in msg
    r = cli("inspect", folder)
    assert r.exit_code == 7 and "next:" not in r.stdout and "Traceback" not in r.output
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 7 and one_sentence(r.stderr) == "error: " + msg


def test_qwen2_here_goes_to_the_decoder_which_checks_its_declared_biases(formers_models, copy_of):
    """No plain-Paddle Qwen2 in PaddleFormers 1.2.0: the decoder computes it (it used to be refused naming the PaddleNLP
    environment); a Llama relabelled Qwen2 lacks the q/k/v biases every Qwen2 declares, and is refused naming them."""
    folder = copy_of(formers_models["llama"])
    edit_config(folder, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    r, data = inspect_json(folder)
    assert r.exit_code == 4 and data["assessment"]["library"] == "paddle-scorer"
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 4 and "the weights do not match the Qwen2 model" in r.stderr
    assert "model.layers.0.self_attn.q_proj.bias: missing from the checkpoint (config.json declares this bias)" \
        in r.stderr


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """A Llama whose every 2-D weight is square: hidden = intermediate = vocab = 512, 4 heads = 4 KV heads of 128
    (q/k/v/o, gate/up/down, embedding and LM head all 512 x 512). Transposing any of them would still fit."""
    root = tmp_path_factory.mktemp("square")
    model = fb.build_model("llama", seed=9, scale=2.0, hidden_size=512, intermediate_size=512, vocab_size=512,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=128)
    folder = fb.save_model(model, root / "square")
    lora = fb.save_lora(model, root / "square_lora", base_ref=str(folder), seed=3, std=0.05)
    shapes = {v.shape for v in fb.read_safetensors(folder).values() if v.ndim == 2}
    assert shapes == {(512, 512)}
    return model, folder, lora


F32_ROWS = 5e-5  # two independent float32 forwards, whole vocabulary rows of an ill-conditioned model (see below)


def test_square_matrices_come_out_right(square, pf, deltas):
    model, folder, lora = square
    from paddle_scorer.model.tensor_layout import orientation_from_shapes
    from paddle_scorer.checkpoint.weights import index_files

    shapes = {n: r.shape for n, r in index_files([folder / "model-00001-of-00001.safetensors"]).items()}
    assert orientation_from_shapes(shapes, json.loads((folder / "config.json").read_text()))[0] is None
    ids = [5, 17, 42, 99, 7, 150, 3, 64, 300]
    got = backend_for(load(folder, device="cpu")).position_logprobs(ids)
    want = pf.logprobs(model, ids)
    # Whole rows of a scale-2 model: PaddleFormers' own float32 forward is 2.9e-5 from a float64 evaluation of the same
    # weights here (ours 3.8e-5), so two float32 forwards agree to ~3e-5, not 1e-5; a transposed read is off by > 1e-2.
    assert deltas.record("formers env: square-matrix Llama (PF-saved) vs PF forward", np.abs(got - want).max()) <= F32_ROWS
    attached = backend_for(load(folder, lora, device="cpu")).position_logprobs(ids)
    want = pf.logprobs(fb.load_lora_model(model, lora), ids)
    assert deltas.record("formers env: square-matrix Llama + PF LoRA vs PF LoRAModel",
                         np.abs(attached - want).max()) <= F32_ROWS
    # what a wrong (transposed) reading would give: far off, so the check above has teeth
    assert np.abs(got - pf.logprobs(model, ids[::-1])[::-1]).max() > 1e-2


def test_square_model_without_a_declared_layout_is_refused(square, copy_of):
    _, folder, _ = square
    folder = copy_of(folder)
    edit_config(folder, paddleformers_version=None, torch_dtype=None)
    r, data = inspect_json(folder)
    assert r.exit_code == 4 and data["assessment"]["usable"] is False
    msg = data["assessment"]["refusal"]
    assert "cannot tell whether the linear weights are stored [in, out] (Paddle) or [out, in] (HF)" in msg
    assert "all square" in msg and "paddleformers_version" in msg
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 4 and one_sentence(r.stderr) == "error: " + msg


def test_tensor_parallel_settings_in_the_configs_are_single_process_here(formers_models, copy_of, pf, deltas):
    """A run with tensor parallelism saves tensor_model_parallel_size > 1 in config.json and lora_config.json, but
    flex-checkpoint files hold full tensors; we build non-parallel layers (as LoRAModel.from_pretrained does for the
    safetensors adapter) and score the same."""
    base = copy_of(formers_models["ernie4_5"])
    lora = copy_of(formers_models["ernie4_5_lora"])
    edit_config(base, tensor_model_parallel_size=2)
    cfg = json.loads((lora / "lora_config.json").read_text())
    cfg["tensor_model_parallel_size"] = 2
    cfg["base_model_name_or_path"] = str(base)
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    ids = [5, 17, 42, 99, 7, 150, 3, 64]
    got = backend_for(load(base, lora, device="cpu")).position_logprobs(ids)
    want = pf.logprobs(pf.model("ernie4_5", "lora"), ids)
    assert deltas.record("formers env: ERNIE + LoRA saved with tensor_model_parallel_size 2",
                         np.abs(got - want).max()) <= TOL


def test_two_rotary_dialects_that_disagree_are_refused_on_the_library_path_too(formers_models, copy_of):
    """PaddleFormers builds this Llama and would follow one of the two keys: refused naming both, as the decoder's
    families are."""
    folder = copy_of(formers_models["llama"])
    edit_config(folder, rope_scaling={"rope_type": "linear", "factor": 4.0},
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 7 and "Traceback" not in r.output
    assert "rope_parameters.factor 2.0 and rope_scaling.factor 4.0" in one_sentence(r.stderr)
