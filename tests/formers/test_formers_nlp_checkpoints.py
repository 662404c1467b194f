"""PaddleNLP-saved checkpoints on the PaddleFormers backend (this virtualenv cannot import paddlenlp), checked against
PaddleNLP's own forward recorded by tests/fixtures/make_nlp_fixtures.py: the bundled float16 pdparams demo with its
pdparams adapter (``llama.`` names), and PaddleNLP Trainer ``unified_checkpoint`` ``checkpoint-1/`` folders (full
parameters and LoRA). Also the committed PaddleFormers fixtures, a PaddleNLP-saved base with a PaddleFormers adapter,
and a PaddleNLP model re-saved by PaddleFormers (both version keys in config.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from formers import builders as fb
from paddle_scorer.compute.choose_backend import backend_for
from recorded_forward import FIXTURES, max_delta, recorded
from paddle_scorer.cli.app import app
from paddle_scorer.model.loader import load

runner = CliRunner()
DEMO_BASE, DEMO_LORA = fb.REPO / "checkpoints" / "demo-base", fb.REPO / "checkpoints" / "demo-lora"
NLP_BASE, NLP_LORA = FIXTURES / "nlp-trainer" / "checkpoint-1", FIXTURES / "nlp-trainer-lora" / "checkpoint-1"
PF_BASE, PF_LORA = FIXTURES / "formers-llama", FIXTURES / "formers-llama-lora"
TOL = 1e-5


CASES = [
    ("PaddleNLP pdparams demo (float16)", DEMO_BASE, None, "attach", "demo_base"),
    ("PaddleNLP pdparams demo + pdparams LoRA", DEMO_BASE, DEMO_LORA, "attach", "demo_lora"),
    ("PaddleNLP pdparams demo + pdparams LoRA", DEMO_BASE, DEMO_LORA, "merge", "demo_lora"),
    ("PaddleNLP unified checkpoint-1", NLP_BASE, None, "attach", "base"),
    ("PaddleNLP unified checkpoint-1 + LoRA checkpoint-1", NLP_BASE, NLP_LORA, "attach", "lora"),
    ("PaddleNLP unified checkpoint-1 + LoRA checkpoint-1", NLP_BASE, NLP_LORA, "merge", "lora"),
]


@pytest.mark.parametrize("what,base,lora,mode,prefix", CASES)
def test_paddlenlp_checkpoints_on_paddleformers_equal_paddlenlp_forward(what, base, lora, mode, prefix, deltas):
    loaded = load(base, lora, device="cpu", mode=mode)
    assert loaded.facts.library == "paddleformers" and loaded.facts.layout["kind"] == "paddle"
    assert loaded.facts.layout["saved_by"].startswith("PaddleNLP")
    if lora is not None:
        assert loaded.facts.adapter_key_mapping.endswith("`llama.` -> `model.`")
    d = deltas.record(f"formers env: {what}{' (' + mode + ')' if lora else ''} vs PaddleNLP recorded forward",
                      max_delta(loaded, "nlp-reference.npz", prefix))
    assert d <= TOL


@pytest.mark.parametrize("lora,mode,prefix", [(None, "attach", "base"), (PF_LORA, "attach", "lora"),
                                              (PF_LORA, "merge", "merged")])
def test_committed_paddleformers_fixtures_equal_their_recorded_forward(lora, mode, prefix, deltas):
    """The same files the PaddleNLP virtualenv checks (tests/test_model_tensor_layout.py) score the same here."""
    loaded = load(PF_BASE, lora, device="cpu", mode=mode)
    assert deltas.record(f"formers env: committed PF Llama fixture{' + PF LoRA (' + mode + ')' if lora else ''} vs "
                         "PF recorded", max_delta(loaded, "formers-reference.npz", prefix)) <= TOL


def test_paddlenlp_saved_base_with_a_paddleformers_adapter(tmp_path, pf, deltas):
    """An adapter trained by PaddleFormers (``model.`` names) on a base saved by PaddleNLP (``llama.`` names)."""
    from paddleformers.peft import LoRAConfig, LoRAModel

    from paddle_scorer.process.environment import paddle

    pd = paddle()
    model = load(NLP_BASE, device="cpu").model  # PaddleFormers' LlamaForCausalLM, weights from the PaddleNLP files
    lora = LoRAModel(model, LoRAConfig(r=2, lora_alpha=4, target_modules=[".*q_proj.*", ".*o_proj.*", ".*up_proj.*"],
                                       base_model_name_or_path=str(NLP_BASE), dtype="float32"))
    rng = np.random.default_rng(4)
    for name, p in lora.model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            p.set_value(rng.normal(0.0, 0.3, p.shape).astype("float32"))
    lora.eval()
    lora.save_pretrained(str(tmp_path / "pf-lora"))
    seqs, _ = recorded("nlp-reference.npz")
    ours = backend_for(load(NLP_BASE, tmp_path / "pf-lora", device="cpu"))
    worst = 0.0
    for s in seqs:
        with pd.no_grad():
            want = pf.logprobs(lora, s)
        worst = max(worst, float(np.abs(ours.position_logprobs(s) - want).max()))
    assert deltas.record("formers env: PaddleNLP-saved base + PF LoRA vs PF LoRAModel", worst) <= TOL


def test_paddlenlp_model_resaved_by_paddleformers(tmp_path, deltas):
    """PaddleFormers' save_pretrained keeps the config's paddlenlp_version and adds paddleformers_version; the
    tensor names (``model.``) say who wrote the weights."""
    model = load(DEMO_BASE, device="cpu").model
    model.save_pretrained(str(tmp_path / "resaved"))
    fb.copy_tokenizer(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert cfg.get("paddlenlp_version") and cfg.get("paddleformers_version")
    loaded = load(tmp_path / "resaved", device="cpu")
    assert loaded.facts.layout["kind"] == "hf" and "`model.` (PaddleFormers')" in loaded.facts.layout["evidence"]
    assert deltas.record("formers env: PaddleNLP demo re-saved by PaddleFormers vs PaddleNLP recorded forward",
                         max_delta(loaded, "nlp-reference.npz", "demo_base")) <= TOL


def test_merge_of_a_unified_lora_checkpoint_here(tmp_path, deltas):
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--lora", str(NLP_LORA), "--out", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "paddle_scorer_merge.json").read_text())["layout"] == "paddle"
    assert deltas.record("formers env: merged PaddleNLP unified checkpoint + LoRA vs PaddleNLP recorded",
                         max_delta(load(out, device="cpu"), "nlp-reference.npz", "lora")) <= TOL
