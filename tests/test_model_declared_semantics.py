"""What config.json declares is what is computed (model/rope_config.py, model/families.py, libraries.choose): every
rotary dialect read into one declaration, contradictions refused naming both fields, the installed library used only
where it computes the declaration (PaddleNLP 3.0.0b4's Llama and Qwen2 readings), the decoder elsewhere, a refusal on
a GPU; the same Llama in transformers 4.x's spelling runs on PaddleNLP's model and equals transformers; a sliding
window exact up to its length and refused past it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import builders
import family_fixtures as ff
from cli_runs import run
from hostile_table import cli
from paddle_scorer.checkpoint.describe import describe
from paddle_scorer.errors import UnsupportedModelError
from paddle_scorer.model import families, libraries, rope_config

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


# ---------------------------------------------------------------------------- the dialects, pure


@pytest.mark.parametrize("cfg", [
    {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}},  # transformers 5
    {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)},  # transformers 4.x, rope_type
    {"rope_theta": 500000.0, "rope_scaling": {**{k: v for k, v in LLAMA3.items() if k != "rope_type"},
                                              "type": "llama3"}},  # 4.x, the older `type`
    {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3), "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}},
], ids=["v5", "v4-rope_type", "v4-type", "both-agreeing"])
def test_every_dialect_reads_to_one_declaration(cfg):
    d = rope_config.declared(cfg, "m")
    assert d["rope_type"] == "llama3" and d["rope_theta"] == 500000.0 and d["factor"] == 8.0
    assert d["original_max_position_embeddings"] == 16


def test_paddlenlp_dialect_reads_as_the_transformers_types():
    d = rope_config.declared({"rope_theta": 10000.0, "rope_scaling_type": "linear", "rope_scaling_factor": 2.0}, "m")
    assert (d["rope_type"], d["factor"]) == ("linear", 2.0)
    d = rope_config.declared({"rope_scaling_type": "dynamic_ntk", "rope_scaling_factor": 4.0}, "m")
    assert (d["rope_type"], d["factor"], d["rope_theta"]) == ("dynamic", 4.0, 10000.0)
    d = rope_config.declared({"rope_scaling_type": None, "rope_scaling_factor": 1.0}, "m")  # what PaddleNLP saves
    assert d["rope_type"] == "default"


@pytest.mark.parametrize("cfg, words", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     ("rope_parameters.factor 2.0", "rope_scaling.factor 4.0")),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"type": "yarn", "factor": 2.0}},
     ("rope_parameters.rope_type 'linear'", "rope_scaling type 'yarn'")),
    ({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
     ("rope_theta 10000.0", "rope_parameters.rope_theta 500000.0")),
    ({"rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0}},
     ("rope_scaling.type 'linear'", "rope_scaling.rope_type 'yarn'")),
    ({"rope_scaling_type": "linear", "rope_scaling_factor": 2.0, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     ("rope_scaling_type 'linear'", "'yarn' rope type")),
    ({"rope_scaling_type": "ntk", "rope_scaling_factor": 2.0, "rope_scaling": {"rope_type": "ntk", "factor": 3.0}},
     ("rope_scaling_factor 2.0", "rope factor 3.0")),
    ({"rope_scaling_type": "dynamic"}, ("rope_scaling_type 'dynamic'", "linear, ntk, dynamic_ntk")),
    ({"rope_scaling": "yarn"}, ("rope_scaling 'yarn'", "not an object")),
])
def test_contradictions_are_refused_naming_both_fields(cfg, words):
    with pytest.raises(UnsupportedModelError) as e:
        rope_config.declared(cfg, "m")
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("cfg, differs", [
    ({"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}, "'llama3' rotary scaling, which it would compute as "
                                                               "'default'"),
    ({"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)}, None),  # PaddleNLP's Llama reads llama3 this way
    ({"rope_theta": 500000.0, "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}},
     "'llama3' rotary scaling"),  # ... but not with the older `type` key
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear' rotary scaling"),
    ({"rope_theta": 10000.0, "rope_scaling_type": "linear", "rope_scaling_factor": 2.0}, None),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rope_parameters.rope_theta declares base "
                                                                           "500000.0, where it would use 10000.0"),
    ({"rope_theta": 500000.0}, None),
])
def test_paddlenlp_llama_reading_against_the_declaration(cfg, differs):
    why = families.library_differs("paddlenlp", "llama", cfg, "m")
    assert (why is None) if differs is None else (differs in why), why
    assert families.library_differs("paddleformers", "llama", cfg, "m") is None


def test_paddlenlp_qwen2_has_no_rotary_scaling():
    yarn = {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    assert "'yarn' rotary scaling" in families.library_differs("paddlenlp", "qwen2", yarn, "m")
    assert families.library_differs("paddlenlp", "qwen2", {"rope_theta": 1e6}, "m") is None


# ---------------------------------------------------------------------------- which forward runs it


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The same Llama 3.1-style weights twice: config in transformers 5's spelling and in 4.x's (no biases, so
    PaddleNLP's Llama builds it), with transformers' forward as the reference."""
    root = tmp_path_factory.mktemp("declared")
    v4 = root / "v4"
    model = ff.build_hf("llama", v4, attention_bias=False, mlp_bias=False)
    cfg = json.loads((v4 / "config.json").read_text())  # build_hf wrote transformers 5's spelling
    v5 = root / "v5"
    shutil.copytree(v4, v5)
    assert "rope_parameters" in cfg and "rope_scaling" not in cfg
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (v4 / "config.json").write_text(json.dumps(cfg))
    return model, v4, v5


def _classify(tmp_path, folder, *extra):
    out = tmp_path / "out.jsonl"
    run("classify", "--model", folder, "--labels", "goods,life,goods and things", "--template",
        builders.DEMO_SCORER["template"], "--input", builders.DEMO_QUERIES, "--limit", 3, "--output", out,
        "--overwrite", *extra)
    return [json.loads(x) for x in open(out)], json.loads(out.with_name(out.name + ".meta.json").read_text())


def _worst(records, model) -> float:
    return max(abs(lp - ff.label_logprobs(model, rec)[label]) / len(rec["label_token_ids"][label])
               for rec in records for label, lp in rec["logprobs"].items())


def test_both_spellings_equal_transformers_one_on_paddlenlps_model_one_on_the_decoder(llama, tmp_path, deltas):
    model, v4, v5 = llama
    recs4, meta4 = _classify(tmp_path, v4)
    assert meta4["model"]["library"] == "paddlenlp"  # PaddleNLP's Llama computes llama3 from rope_scaling
    recs5, meta5 = _classify(tmp_path, v5)
    assert meta5["model"]["library"] == "paddle-scorer" and meta5["model"]["compute"]["family"] == "llama"
    assert any("PaddleNLP 3.0.0b4 would not compute what config.json declares" in n and "rope_parameters" in n
               for n in meta5["model"]["notes"])
    assert deltas.record("nlp env: llama3 rope, 4.x spelling on PaddleNLP's model vs transformers",
                         _worst(recs4, model)) <= 1e-5
    assert deltas.record("nlp env: llama3 rope, transformers 5 spelling on the decoder vs transformers",
                         _worst(recs5, model)) <= 1e-5


def test_what_plain_rope_would_have_scored_is_far_off(llama, tmp_path):
    """The silent error this replaces: the v5 config read as PaddleNLP reads it (plain RoPE, base 10000)."""
    model, v4, _ = llama
    plain = tmp_path / "plain"
    shutil.copytree(v4, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("rope_scaling")
    cfg["rope_theta"] = 10000.0
    (plain / "config.json").write_text(json.dumps(cfg))
    recs, _ = _classify(tmp_path, plain)
    assert _worst(recs, model) > 1e-2


def test_on_a_gpu_or_with_the_library_forced_it_is_refused(llama):
    _, _, v5 = llama
    info = describe(v5)
    with pytest.raises(UnsupportedModelError, match="would not compute what config.json declares.*--device cpu"):
        libraries.choose(info, device="gpu")
    with pytest.raises(UnsupportedModelError, match="leave out --library paddlenlp"):
        libraries.choose(info, requested="paddlenlp")
    assert libraries.choose(info, device="cpu").native


def test_inspect_says_the_decoder_runs_it_and_why(llama):
    _, _, v5 = llama
    r = cli("inspect", v5, "--json")
    a = json.loads(r.stdout)["assessment"]
    assert r.exit_code == 0 and a["library"] == "paddle-scorer" and a["family"]["family"] == "llama"


# ---------------------------------------------------------------------------- sliding windows


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """Models whose sliding window (8 tokens) is far shorter than the test prompts: every layer (Mistral), the layers
    from max_window_layers on (Qwen2, Qwen3 with use_sliding_window), the local layers with their own rotary table
    (Gemma 3), alternate layers with attention sinks (GPT-OSS)."""
    root = tmp_path_factory.mktemp("windowed")
    return {
        "mistral": (root / "mistral", ff.build_hf("mistral", root / "mistral", sliding_window=8)),
        "qwen2": (root / "qwen2", ff.build_hf("qwen2", root / "qwen2", use_sliding_window=True, sliding_window=8,
                                              max_window_layers=1)),
        "gemma3": (root / "gemma3", ff.build_hf("gemma3", root / "gemma3", sliding_window=8)),
        "qwen3": (root / "qwen3", ff.build_hf("qwen3", root / "qwen3", use_sliding_window=True, sliding_window=8,
                                              max_window_layers=1, rope_scaling=None)),
        "gpt_oss": (root / "gpt_oss", ff.build_hf("gpt_oss", root / "gpt_oss", sliding_window=8)),
    }


@pytest.mark.parametrize("extra", [("--execution", "in-ram"), ("--execution", "streamed"), ("--no-prefix-reuse",)],
                         ids=["in-ram", "streamed", "no-prefix-reuse"])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3", "gpt_oss"])
def test_prompts_longer_than_the_sliding_window_equal_transformers(windowed, tmp_path, family, extra, deltas):
    folder, model = windowed[family]
    recs, meta = _classify(tmp_path, folder, *extra)
    assert min(len(r["prompt_token_ids"]) for r in recs) > 3 * 8  # far past the window
    assert meta["model"]["library"] == "paddle-scorer"
    assert deltas.record(f"nlp env: {family}, window 8, classify {' '.join(extra)} vs transformers",
                         _worst(recs, model)) <= 1e-5


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma3", "gpt_oss"])
def test_generation_past_the_sliding_window_equals_transformers(windowed, family, deltas):
    folder, model = windowed[family]
    r = run("generate", "--model", folder, "--prompt", "what is the price of cabbage", "--raw", "--max-new-tokens", 6,
            "--top-k", 2, "--json")
    rec = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")][0]
    assert len(rec["prompt_token_ids"]) > 8
    want, lps = ff.greedy(model, rec["prompt_token_ids"], len(rec["steps"]))
    assert [s["token_id"] for s in rec["steps"]] == want
    assert deltas.record(f"nlp env: {family}, window 8, generate (KV cache) vs transformers greedy",
                         max(abs(s["logprob"] - lp) for s, lp in zip(rec["steps"], lps))) <= 1e-5


def test_a_shared_prefix_longer_than_the_window_is_reused_exactly(windowed, tmp_path, deltas):
    """Few-shot records share a prefix much longer than the window: computed once and continued, the window masks
    the prefix's keys too."""
    folder, model = windowed["mistral"]
    shots = "".join(f"Query: {w} price\nAnswer: goods\n" for w in ("apple", "bread", "milk", "rice"))
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"id": i, "query": q}) + "\n" for i, q in
                            enumerate(["cabbage", "rent", "train ticket", "salt", "haircut", "a sofa"] * 3)))
    out = tmp_path / "few.out.jsonl"
    run("classify", "--model", folder, "--labels", "goods,life", "--template", shots + "Query: {query}\nAnswer:",
        "--input", data, "--output", out)
    recs = [json.loads(x) for x in open(out)]
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["prefix_reuse"]["shared_prefixes"] >= 1  # the prefix was computed once and reused
    assert deltas.record("nlp env: mistral, window 8, a 60-token shared prefix reused vs transformers",
                         _worst(recs, model)) <= 1e-5


def test_qwen_sliding_layers_are_read_from_every_spelling():
    from paddle_scorer.model import families

    base = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
            "vocab_size": 8, "sliding_window": 32}
    assert families.read({**base, "use_sliding_window": False}, "m").window is None
    assert families.read({**base, "use_sliding_window": True, "max_window_layers": 4}, "m").window is None
    fc = families.read({**base, "use_sliding_window": True, "max_window_layers": 2}, "m")
    assert fc.window == 32 and fc.local_layers == frozenset({2, 3})
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    fc = families.read({**base, "layer_types": types}, "m")
    assert fc.window == 32 and fc.local_layers == frozenset({1, 3})
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        families.read({**base, "layer_types": ["chunked_attention"] * 4}, "m")
    assert np.isfinite(families.read(base, "m").rope.theta)


def test_longrope_past_its_original_context_is_refused_and_max_length_defaults_to_it(tmp_path):
    m = tmp_path / "phi3"
    ff.build_hf("phi3", m, sliding_window=None)  # LongRoPE with original_max_position_embeddings 64
    r = cli("classify", "--model", m, "--labels", "goods,life", "--prompt", "cabbage " * 40)
    assert r.exit_code == 2 and "longer than the context of 64" in r.stderr, r.output
    r = cli("classify", "--model", m, "--labels", "goods,life", "--prompt", "cabbage " * 15, "--max-length", "200",
            "--force-max-length")
    assert r.exit_code == 2 and "LongRoPE switches every position to its long factors" in r.stderr, r.output
    assert "--max-length 64" in r.stderr and "Traceback" not in r.output


def test_gemma3_rotary_per_layer_type_reads_the_same_in_both_spellings():
    """transformers 5 writes Gemma 3's rotary settings per layer type; 4.x as rope_theta + rope_scaling (global) and
    rope_local_base_freq (local): one reading."""
    from paddle_scorer.model import families

    base = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
            "head_dim": 16, "vocab_size": 8, "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    v4 = families.read({**base, "rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                        "rope_local_base_freq": 10000.0}, "m")
    v5 = families.read({**base, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}, "m")
    assert v4.rope == v5.rope and v4.local_rope == v5.local_rope
    assert (v5.rope.type, v5.rope.factor, v5.rope.theta, v5.local_rope.theta) == ("linear", 8.0, 1e6, 10000.0)
    assert v5.local_layers == frozenset({0, 2}) and v5.window == 32
    with pytest.raises(UnsupportedModelError, match=r"rope_parameters per layer type \(chunked_attention\)"):
        families.read({**base, "rope_parameters": {"chunked_attention": {"rope_type": "default"}}}, "m")
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping 50.0"):
        families.read({**base, "attn_logit_softcapping": 50.0}, "m")


def test_the_window_changes_the_scores_so_the_tests_above_see_it(windowed, tmp_path):
    folder, model = windowed["mistral"]
    full = tmp_path / "no-window"
    shutil.copytree(folder, full)
    cfg = json.loads((full / "config.json").read_text())
    cfg["sliding_window"] = None
    (full / "config.json").write_text(json.dumps(cfg))
    recs, _ = _classify(tmp_path, full)
    assert _worst(recs, model) > 1e-3


def test_review_round_windows_and_defaults():
    """Qwen3-MoE slides every layer when use_sliding_window is on (transformers passes the window to each); Qwen2-MoE's
    sliding layers differ between transformers 4.55 and 5 (refused); a sliding Qwen2 is not PaddleNLP's to run; Gemma
    3's local layers default to rope_local_base_freq (else 10000) in transformers 5's spelling too; GPT-OSS clamps at
    7.0 whatever swiglu_limit says (another value refused); a null partial_rotary_factor means none."""
    from paddle_scorer.model import families as fam

    moe = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 4, "vocab_size": 8, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 8, "sliding_window": 8}
    assert fam.read({**moe, "use_sliding_window": True, "max_window_layers": 4}, "m").local_layers == frozenset(range(4))
    assert fam.read({**moe, "use_sliding_window": False}, "m").window is None
    with pytest.raises(UnsupportedModelError, match="use_sliding_window true"):
        fam.read({**moe, "architectures": ["Qwen2MoeForCausalLM"], "use_sliding_window": True}, "m")
    qwen2 = {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2,
             "rope_theta": 1e6}
    assert "no sliding window" in fam.library_differs("paddlenlp", "qwen2", qwen2, "m")
    assert fam.library_differs("paddlenlp", "qwen2", {**qwen2, "max_window_layers": 4}, "m") is None
    gemma = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "num_hidden_layers": 2, "head_dim": 16, "vocab_size": 8, "sliding_window": 8,
             "layer_types": ["sliding_attention", "full_attention"],
             "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default"}}}
    assert fam.read(gemma, "m").local_rope.theta == 10000.0
    assert fam.read({**gemma, "rope_local_base_freq": 20000.0}, "m").local_rope.theta == 20000.0
    oss = {"architectures": ["GptOssForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "head_dim": 16, "vocab_size": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}
    with pytest.raises(UnsupportedModelError, match="swiglu_limit 5"):
        fam.read({**oss, "swiglu_limit": 5.0}, "m")
    assert fam.read({**oss, "swiglu_limit": 7.0}, "m").moe.swiglu_limit == 7.0
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
               "num_hidden_layers": 2, "vocab_size": 8, "partial_rotary_factor": None}
    assert fam.read(mistral, "m").rope.dim == 16


def test_the_lock_covers_a_new_output_folder_and_removes_it_when_left_empty(tmp_path):
    from paddle_scorer.errors import UsageError
    from paddle_scorer.runs.output_lock import lock_path, output_held

    out = tmp_path / "new" / "deeper" / "out.jsonl"
    with output_held(out):
        assert lock_path(out).exists()
        with pytest.raises(UsageError, match="another paddle-scorer run is writing"):
            with output_held(out):
                pass
    assert not (tmp_path / "new").exists()  # made for the lock, left empty: removed
