"""Checkpoints saved by another library, on PaddleNLP 3.0.0b4 (this virtualenv), against that library's own recorded
forward (tests/fixtures, built by make_formers_fixtures.py / make_nlp_fixtures.py):

* PaddleFormers 1.2.0 Llama base + its PaddleFormers LoRA adapter (HF layout, ``model.`` names, peft_model
  safetensors): loaded on PaddleNLP's Llama, attached and merged, equal to PaddleFormers' recorded forward;
* a PaddleNLP-saved copy of that base with the PaddleFormers adapter;
* PaddleNLP's own Trainer output with ``unified_checkpoint`` (``checkpoint-1/`` folders with optimizer shards):
  full-parameter and LoRA, equal to PaddleNLP's forward (live and recorded);
* ERNIE 4.5 (PaddleFormers only) refused with the environment to create.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.compute.choose_backend import backend_for
from recorded_forward import FIXTURES, max_delta, recorded
from paddle_scorer.cli.app import app
from paddle_scorer.model.loader import load

runner = CliRunner()
PF_BASE, PF_LORA = FIXTURES / "formers-llama", FIXTURES / "formers-llama-lora"
NLP_BASE, NLP_LORA = FIXTURES / "nlp-trainer" / "checkpoint-1", FIXTURES / "nlp-trainer-lora" / "checkpoint-1"
TOL = 1e-5


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- PaddleFormers-saved, on PaddleNLP


@pytest.mark.parametrize("lora,mode,prefix", [(None, None, "base"), (PF_LORA, "attach", "lora"),
                                              (PF_LORA, "merge", "merged")])
def test_paddleformers_llama_on_paddlenlp_equals_its_recorded_forward(lora, mode, prefix, deltas):
    loaded = load(PF_BASE, lora, device="cpu", mode=mode or "attach")
    assert loaded.facts.library == "paddlenlp" and loaded.facts.library_version == "3.0.0b4"
    assert loaded.facts.layout["saved_by"] == "PaddleFormers 1.2.0"
    assert any("converted on load" in n and "`model.` -> `llama.`" in n for n in loaded.facts.notes)
    d = deltas.record(f"nlp env: PF-saved Llama{' + PF LoRA (' + mode + ')' if lora else ''} vs PF recorded "
                      f"{'LoRAModel' if mode == 'attach' else 'LoRAModel.merge()' if mode else 'forward'}",
                      max_delta(loaded, "formers-reference.npz", prefix))
    assert d <= TOL


def test_paddleformers_checkpoints_inspect_and_classify_here():
    r = cli("inspect", PF_BASE, "--json")
    a = json.loads(r.stdout)["assessment"]
    assert r.exit_code == 0 and a["usable"] and a["library"] == "paddlenlp"
    assert a["layout"]["kind"] == "hf" and a["layout"]["saved_by"] == "PaddleFormers 1.2.0"
    r = cli("inspect", PF_LORA, "--json")
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["adapter"]["saved_by"] == "PaddleFormers 1.2.0"
    assert info["adapter"]["base_found"] == str(PF_BASE.resolve())
    r = cli("classify", "--lora", PF_LORA, "--labels", "goods,life", "--prompt", "what is the price", "--json")
    assert r.exit_code == 0, r.output
    (rec,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert abs(sum(rec["probs"].values()) - 1) < 1e-9


def test_paddlenlp_saved_base_with_the_paddleformers_adapter(tmp_path, deltas):
    """The same weights re-saved by PaddleNLP's own save_pretrained (Paddle layout, ``llama.`` names): the
    PaddleFormers adapter (``model.`` names) fits it and scores what PaddleFormers recorded."""
    pf = load(PF_BASE, device="cpu")
    nlp_base = tmp_path / "nlp-base"
    pf.model.save_pretrained(str(nlp_base))
    builders.copy_tokenizer(nlp_base)
    cfg = json.loads((nlp_base / "config.json").read_text())
    assert "paddlenlp_version" in cfg and (nlp_base / "model_state.pdparams").is_file()
    loaded = load(nlp_base, PF_LORA, device="cpu")
    assert loaded.facts.layout["saved_by"].startswith("PaddleNLP")
    assert deltas.record("nlp env: PaddleNLP-saved base + PF LoRA vs PF recorded LoRAModel",
                         max_delta(loaded, "formers-reference.npz", "lora")) <= TOL


def test_merge_of_a_paddleformers_adapter_here_keeps_its_layout(tmp_path, deltas):
    out = tmp_path / "merged"
    r = cli("merge", "--lora", PF_LORA, "--out", out, "--verify")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "paddle_scorer_merge.json").read_text())["layout"] == "hf"
    from paddle_scorer.checkpoint.weights import read_safetensors

    merged = read_safetensors(out / "model.safetensors")
    assert all(k.startswith(("model.", "lm_head.")) for k in merged)
    assert deltas.record("nlp env: merged PF Llama + PF LoRA (our merge) vs PF recorded LoRAModel.merge()",
                         max_delta(load(out, device="cpu"), "formers-reference.npz", "merged")) <= TOL


def relabelled(folder, architecture: str, model_type: str):
    """A copy of the PaddleFormers Llama whose config.json names another architecture."""
    shutil.copytree(PF_BASE, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=[architecture], model_type=model_type)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_ernie_needs_the_paddleformers_environment(tmp_path):
    folder = relabelled(tmp_path / "ernie", "Ernie4_5ForCausalLM", "ernie4_5")
    r = cli("inspect", folder, "--json")
    a = json.loads(r.stdout)["assessment"]
    assert r.exit_code == 4 and a["library"] == "paddleformers" and a["library_installed"] is False
    assert "built by paddleformers, which is not installed" in a["refusal"]
    assert "pip install -e '.[cpu,formers]'" in a["refusal"]
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 4 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == ["error: " + a["refusal"]]


# ---------------------------------------------------------------- PaddleNLP Trainer output (unified checkpoint)


def test_unified_checkpoint_folders_are_a_model_and_an_adapter():
    for folder, kind in ((NLP_BASE, "model"), (NLP_LORA, "lora-adapter")):
        r = cli("inspect", folder, "--json")
        info = json.loads(r.stdout)
        assert r.exit_code == 0 and info["kind"] == kind and info["assessment"]["usable"], r.output
    assert (NLP_BASE / "optimizer.safetensors.index.json").is_file()  # the optimizer shards are ignored
    info = json.loads(cli("inspect", NLP_BASE, "--json").stdout)
    assert info["weights"]["index"].endswith("model.safetensors.index.json")
    assert info["assessment"]["layout"]["saved_by"] == "PaddleNLP 3.0.0b4"


@pytest.mark.parametrize("lora,mode,prefix", [(None, "attach", "base"), (NLP_LORA, "attach", "lora"),
                                              (NLP_LORA, "merge", "lora")])
def test_unified_checkpoint_equals_paddlenlp_forward(lora, mode, prefix, deltas):
    """Recorded by make_nlp_fixtures.py, and live: PaddleNLP's own from_pretrained + LoRAModel.from_pretrained."""
    loaded = load(NLP_BASE, lora, device="cpu", mode=mode)
    label = f"nlp env: PaddleNLP unified checkpoint-1{' + LoRA checkpoint-1 (' + mode + ')' if lora else ''}"
    assert deltas.record(label + " vs PaddleNLP recorded forward",
                         max_delta(loaded, "nlp-reference.npz", prefix)) <= TOL
    from paddlenlp.peft import LoRAModel
    from paddlenlp.transformers import AutoModelForCausalLM

    from paddle_scorer.process.environment import paddle

    pd = paddle()
    ref = AutoModelForCausalLM.from_pretrained(str(NLP_BASE), dtype="float32")
    if lora is not None:
        ref = LoRAModel.from_pretrained(ref, str(lora))
    ref.eval()
    seqs, _ = recorded("nlp-reference.npz")
    ours = backend_for(loaded)
    worst = 0.0
    for s in seqs:
        with pd.no_grad():
            logits = ref(pd.to_tensor([s]), return_dict=True).logits.astype("float32").numpy()[0].astype(np.float64)
        lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        worst = max(worst, float(np.abs(ours.position_logprobs(s) - lp).max()))
    assert deltas.record(label + " vs PaddleNLP live forward", worst) <= TOL


def test_unknown_architecture_names_the_libraries_tried(tmp_path):
    """A causal LM nothing here computes: exit 7 (its own code, README), one sentence naming what runs."""
    folder = relabelled(tmp_path / "gemma", "GemmaForCausalLM", "gemma")
    r = cli("inspect", folder, "--json")
    a = json.loads(r.stdout)["assessment"]
    assert r.exit_code == 7 and a["usable"] is False and a["library"] is None
    assert "GemmaForCausalLM is not supported yet; paddle-scorer runs paddlenlp builds LlamaForCausalLM, " \
           "Qwen2ForCausalLM; paddleformers builds LlamaForCausalLM, Ernie4_5ForCausalLM, Ernie4_5_MoeForCausalLM; " \
           "paddle-scorer's own CPU decoder computes Llama, Mistral, Qwen2, Phi-3, Gemma 3, GPT-OSS, Qwen3, Qwen3-MoE" in a["refusal"]
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 7 and r.stderr.strip().splitlines() == ["error: " + a["refusal"]]


def test_a_family_checkpoint_with_a_tensor_too_many_or_too_few_is_refused(tmp_path):
    """The families without a library model class are checked against the family's own tensor list: a layer's
    tensor missing, or one the config does not describe, refused listing each (exit 4), nothing loaded."""
    import family_fixtures as ff
    from paddle_scorer.checkpoint.weights import read_file, write_safetensors

    folder = tmp_path / "qwen3_moe"
    ff.build_hf("qwen3_moe", folder)
    shard = folder / "model.safetensors"
    sd = read_file(shard)
    sd.pop("model.layers.0.mlp.experts.3.down_proj.weight")
    sd["model.layers.0.mlp.experts.8.down_proj.weight"] = np.zeros((64, 32), np.float32)  # a ninth expert
    write_safetensors(sd, shard, metadata={"format": "pt"})
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x")
    assert r.exit_code == 4, r.output
    assert "experts.3.down_proj.weight: missing from the checkpoint" in r.stderr
    assert "experts.8.down_proj.weight: unexpected tensor" in r.stderr
