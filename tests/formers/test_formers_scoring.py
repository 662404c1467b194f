"""classify, generate, layer-streamed classify and smoke on PaddleFormers 1.2.0 checkpoints, through the real CLI,
checked against PaddleFormers' own forward (``LlamaForCausalLM`` / ``Ernie4_5ForCausalLM``, and its ``LoRAModel``
unmerged or after ``LoRAModel.merge()``) within 1e-5.

Run under .venv-formers only: ``.venv-formers/bin/python -m pytest tests/formers``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from formers import builders as fb
from paddle_scorer.cli.app import app

runner = CliRunner()
QUERIES = fb.REPO / "checkpoints" / "demo-queries.jsonl"
LABELS = "goods,life,goods and things"  # two single-token labels and a 3-token one (the packed tree mask)
TOL = 1e-5


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def jsonl(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def classify(*args) -> list[dict]:
    r = cli("classify", *args, "--json")
    assert r.exit_code == 0, r.output
    return jsonl(r.stdout)


def max_label_delta(pf, model, recs) -> float:
    """The largest |ours - the library's| log P(label), per label token: a label of n tokens sums n float32
    log-probs, each with its own rounding (a 3-token label near -53 differs by ~2e-5 between two float32
    forwards whose matmuls accumulate in another order, e.g. MKL's AVX-512 vs AVX2 kernels)."""
    worst = 0.0
    for rec in recs:
        for label, toks in rec["label_token_ids"].items():
            want = pf.label_logprob(model, rec["prompt_token_ids"], toks)
            worst = max(worst, abs(rec["logprobs"][label] - want) / len(toks))
    return worst


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_classify_base_equals_paddleformers_forward(arch, formers_models, pf, deltas):
    recs = classify("--model", formers_models[arch], "--labels", LABELS, "--input", QUERIES, "--limit", 4)
    assert any(len(t) > 1 for t in recs[0]["label_token_ids"].values())  # a multi-token label is really scored
    d = deltas.record(f"formers env: classify {arch} base (PF-saved) vs PF forward", max_label_delta(
        pf, pf.model(arch), recs))
    assert d <= TOL


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_classify_with_adapter_equals_paddleformers_lora_model(arch, mode, formers_models, pf, deltas):
    """ERNIE's adapter targets the fused qkv_proj / up_gate_proj that the saved base splits: attached, the pairs go
    onto PaddleFormers' own fused LoRA layers; merged, each delta is added to the fused runtime weight."""
    recs = classify("--model", formers_models[arch], "--lora", formers_models[f"{arch}_lora"], "--labels", LABELS,
                    "--input", QUERIES, "--limit", 4, "--mode", mode)
    ref = pf.model(arch, "lora" if mode == "attach" else "merged")
    d = deltas.record(f"formers env: classify {arch} + PF LoRA ({mode}) vs PF LoRAModel"
                      f"{'' if mode == 'attach' else '.merge()'}", max_label_delta(pf, ref, recs))
    assert d <= TOL
    # the adapter changes the scores (not a silent no-op)
    base = max_label_delta(pf, pf.model(arch), recs)
    assert base > 1e-3


def test_rslora_adapter_uses_alpha_over_sqrt_r(formers_models, pf, deltas):
    """PaddleFormers' own LoRAModel.merge() honours rslora (its get_merge_state_dict does not: notes §4)."""
    for mode, kind in (("attach", "lora"), ("merge", "merged")):
        recs = classify("--model", formers_models["llama"], "--lora", formers_models["llama_rslora"], "--labels",
                        LABELS, "--input", QUERIES, "--limit", 2, "--mode", mode)
        ref = pf.model("llama", kind, adapter="llama_rslora")
        assert deltas.record(f"formers env: classify llama + rslora ({mode})", max_label_delta(pf, ref, recs)) <= TOL


def test_classify_provenance_names_paddleformers(formers_models, tmp_path):
    out = tmp_path / "s.jsonl"
    r = cli("classify", "--model", formers_models["ernie4_5"], "--lora", formers_models["ernie4_5_lora"], "--labels",
            "goods,life", "--prompt", "what is the price of cabbage today?", "--output", out)
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["model"]["library"] == "paddleformers" and meta["model"]["library_version"] == "1.2.0"
    assert meta["model"]["layout"]["kind"] == "hf" and meta["model"]["layout"]["saved_by"] == "PaddleFormers 1.2.0"
    assert meta["versions"]["paddleformers"] == "1.2.0" and meta["versions"]["paddlenlp"] is None
    assert meta["identity"]["library"] == "paddleformers"


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_generate_greedy_steps_equal_paddleformers_forward(arch, formers_models, pf, deltas):
    """The step-by-step decode runs on PaddleFormers' DynamicCache (ERNIE needs explicit position ids with a
    cache); every step's distribution equals a full forward over prompt + tokens so far."""
    r = cli("generate", "--model", formers_models[arch], "--lora", formers_models[f"{arch}_lora"], "--prompt",
            "what is the price of", "-n", 6, "-k", 4, "--json")
    assert r.exit_code == 0, r.output
    (rec,) = jsonl(r.stdout)
    assert len(rec["steps"]) == 6
    model = pf.model(arch, "lora")
    ids = list(rec["prompt_token_ids"])
    worst = 0.0
    for step in rec["steps"]:
        lp = pf.logprobs(model, ids)[-1]
        top = np.argsort(-lp, kind="stable")[:4]
        assert [t["token_id"] for t in step["top"]] == list(top)
        assert step["token_id"] == int(np.argmax(lp))  # greedy
        worst = max(worst, abs(step["logprob"] - lp[step["token_id"]]),
                    *(abs(np.log(t["prob"]) - lp[t["token_id"]]) for t in step["top"]))
        ids.append(step["token_id"])
    assert deltas.record(f"formers env: generate {arch} + PF LoRA, 6 greedy steps vs PF forward", worst) <= TOL


@pytest.mark.parametrize("arch,mode", [("llama", "attach"), ("ernie4_5", "attach"), ("ernie4_5", "merge")])
def test_streamed_classify_equals_in_ram(arch, mode, formers_models, tmp_path, deltas):
    common = ["--model", formers_models[arch], "--lora", formers_models[f"{arch}_lora"], "--labels", LABELS,
              "--input", QUERIES, "--limit", 10, "--mode", mode, "--batch-size", 4]
    ram = classify(*common, "--execution", "in-ram")
    out = tmp_path / "streamed.jsonl"
    r = cli("classify", *common, "--execution", "streamed", "--stream-block-records", 5, "--output", out)
    assert r.exit_code == 0, r.output
    streamed = [json.loads(x) for x in open(out)]
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["execution"] == "streamed" and meta["streaming"]["blocks"] == 2
    assert meta["streaming"]["layer_passes"] == 2 * 2  # each decoder layer once per block
    lp = lambda recs: np.array([list(x["logprobs"].values()) for x in recs])  # noqa: E731
    tokens = np.array([[len(t) for t in x["label_token_ids"].values()] for x in ram])
    d = deltas.record(f"formers env: streamed vs in-RAM classify ({arch}, {mode}), per label token",
                      float((np.abs(lp(streamed) - lp(ram)) / tokens).max()))
    assert d <= TOL


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_smoke_passes(arch, formers_models):
    r = cli("smoke", "--model", formers_models[arch], "--lora", formers_models[f"{arch}_lora"], "--labels",
            "goods,life", "--input", QUERIES, "--limit", 2, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert data["passed"] is True, [c for c in data["checks"] if c["status"] == "FAIL"]
    for name in ("model folder", "adapter folder", "adapter fits base", "load", "score", "attach vs merge"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert data["attach_merge_max_abs_logprob_delta"] <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "ernie4_5"])
def test_kv_cache_strategy_selects_rows_of_a_dynamic_cache(arch, formers_models, pf, deltas):
    """The benchmarks' KV-cache variant (plugged in through the documented ``strategy`` hook) copies per-label rows
    of the prompt's cache: PaddleFormers' DynamicCache, not tuples (libraries.select_cache_rows)."""
    import sys

    from paddle_scorer.compute.choose_backend import backend_for
    from paddle_scorer.model.loader import load

    sys.path.insert(0, str(fb.REPO / "benchmarks"))
    from strategies import kv_cache_strategy

    loaded = load(formers_models[arch], formers_models[f"{arch}_lora"], device="cpu")
    prompts = [[5, 17, 42, 99, 7], [90, 75, 317]]
    conts = [[[279], [1, 2, 3], [4, 5]], [[278, 9], [7, 6, 5, 4], [11]]]
    packed = backend_for(loaded).score(prompts, conts)
    cached = backend_for(loaded, strategy=kv_cache_strategy).score(prompts, conts)
    ref = pf.model(arch, "lora")
    worst = 0.0
    for p, cs, a, b in zip(prompts, conts, packed, cached):
        for c, x, y in zip(cs, a, b):
            want = pf.label_logprob(ref, p, c)
            worst = max(worst, abs(x.logprob - want), abs(y.logprob - want))
    assert deltas.record(f"formers env: packed and KV-cache strategies ({arch}) vs PF LoRAModel", worst) <= TOL


@pytest.mark.parametrize("arch,mode,execution", [("llama", "attach", "in-ram"), ("ernie4_5", "attach", "in-ram"),
                                                 ("ernie4_5", "merge", "streamed"), ("llama", "merge", "streamed")])
def test_cpu_decoder_equals_paddleformers_own_layers(arch, mode, execution, formers_models, tmp_path, deltas):
    """paddle-scorer's CPU decoder (ERNIE's interleaved RoPE, per-KV-group qkv_proj, [gate | up]) against the same
    checkpoint run through PaddleFormers' own modules (PADDLE_SCORER_CPU_FORWARD=library)."""
    common = ["classify", "--model", formers_models[arch], "--lora", formers_models[f"{arch}_lora"], "--labels", LABELS,
              "--input", QUERIES, "--limit", 6, "--mode", mode, "--execution", execution]
    got = {}
    for forward in ("decoder", "library"):
        out = tmp_path / f"{forward}.jsonl"
        env = {"PADDLE_SCORER_CPU_FORWARD": "library"} if forward == "library" else None
        r = runner.invoke(app, [str(a) for a in [*common, "--output", out]], env=env)
        assert r.exit_code == 0, r.output
        meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
        assert meta["model"]["compute"]["forward"] == ("library" if forward == "library" else "paddle-scorer decoder")
        got[forward] = [json.loads(x) for x in open(out)]
    worst = max(abs(a["logprobs"][lab] - b["logprobs"][lab]) / len(toks)
                for a, b in zip(got["decoder"], got["library"]) for lab, toks in a["label_token_ids"].items())
    assert deltas.record(f"formers env: CPU decoder vs PaddleFormers layers ({arch}, {mode}, {execution}), per token",
                         worst) <= TOL


FEW_SHOT = "".join(f"Query: {q}\nAnswer: {a}\n" for q, a in [
    ("how much are tomatoes", "goods"), ("my landlord raised the rent", "life"), ("price of a new phone", "goods"),
    ("where to go on holiday", "life"), ("cheap winter boots", "goods"), ("my cat is sick", "life")]) + \
    "Query: {query}\nAnswer:"
# 32 records share a ~60-token prefix: over 2 x CALL_TOKENS token computations saved, which a kept prefix always pays
# for (prefix_reuse.measure_costs); a smaller saving may rightly be recomputed on these tiny models.


@pytest.mark.parametrize("arch,execution", [("llama", "in-ram"), ("ernie4_5", "streamed"), ("ernie4_5", "in-ram")])
def test_prefix_reuse_equals_the_computation_without_it(arch, execution, formers_models, tmp_path, deltas):
    common = ["classify", "--model", formers_models[arch], "--lora", formers_models[f"{arch}_lora"], "--labels", LABELS,
              "--template", FEW_SHOT, "--input", QUERIES, "--limit", 36, "--execution", execution]
    got = {}
    for flag in ("--prefix-reuse", "--no-prefix-reuse"):
        out = tmp_path / f"{flag}.jsonl"
        r = cli(*common, flag, "--output", out)
        assert r.exit_code == 0, r.output
        got[flag] = ([json.loads(x) for x in open(out)], json.loads(out.with_name(out.name + ".meta.json").read_text()))
    (a, meta), (b, _) = got["--prefix-reuse"], got["--no-prefix-reuse"]
    assert meta["prefix_reuse"]["shared_prefixes"] >= 1 and meta["prefix_reuse"]["tokens_saved"] > 35 * 60
    # Per label token, and float32 rounding grows with the log-prob's size: these random tiny models give labels
    # -10 nats a token, where 1e-5 is ~10 float32 steps and the prefix computed in a call of its own (other GEMM
    # shapes: numpy's BLAS sums them in another order) differs by up to 1.5e-5. A log-prob beyond 5 nats a token is
    # held to 1e-5 of every 5 nats; a real error (a wrong mask, a wrong position) is orders of magnitude larger.
    worst = max(abs(x["logprobs"][k] - y["logprobs"][k]) / len(toks)
                / max(1.0, abs(y["logprobs"][k]) / len(toks) / 5)
                for x, y in zip(a, b) for k, toks in x["label_token_ids"].items())
    assert deltas.record(f"formers env: prefix reuse vs none ({arch}, {execution}), per label token (per 5 nats past 5)",
                         worst) <= TOL
