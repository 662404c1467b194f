"""The CPU decoder forward (compute/decoder, compute/numpy_runner.py): the same scores as the library's own forward
through the real CLI (Llama and Qwen2, LoRA attached and merged, in RAM and streamed, multi-token labels, generation,
dynamic-NTK RoPE past the trained context), the fallback to the library with its reason, padding never computed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import builders
from cli_runs import classify, logprobs, run
from paddle_scorer.compute import decoder

TEMPLATE = builders.DEMO_SCORER["template"]
LABELS = "goods,life,goods and things"  # single-token labels and a 3-token one (the tree mask)


@pytest.mark.parametrize("arch,mode,execution", [
    ("llama", "attach", "in-ram"), ("llama", "merge", "in-ram"), ("qwen2", "attach", "in-ram"),
    ("llama", "attach", "streamed"), ("qwen2", "merge", "streamed"),
])
def test_decoder_forward_equals_the_library_forward(models, tmp_path, arch, mode, execution, deltas):
    common = ["--model", models[arch], "--lora", models[f"{arch}_lora"], "--mode", mode, "--labels", LABELS,
              "--template", TEMPLATE, "--input", builders.DEMO_QUERIES, "--limit", 10, "--execution", execution]
    ours, meta = classify(tmp_path, "ours", *common)
    lib, lib_meta = classify(tmp_path, "lib", *common, env={"PADDLE_SCORER_CPU_FORWARD": "library"})
    assert meta["model"]["compute"]["forward"] == "paddle-scorer decoder"
    assert lib_meta["model"]["compute"] == {"forward": "library", "why": "PADDLE_SCORER_CPU_FORWARD=library"}
    per_token = np.abs(logprobs(ours) - logprobs(lib)) / np.array(
        [[len(t) for t in r["label_token_ids"].values()] for r in ours])
    d = deltas.record(f"nlp env: CPU decoder vs library forward ({arch}, {mode}, {execution}), per label token",
                      per_token.max())
    assert d <= 1e-5
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in lib]


def test_generation_traces_equal_the_library_forward(models, tmp_path):
    common = ["generate", "--model", models["qwen2"], "--lora", models["qwen2_lora"], "--prompt", "what is the price",
              "--prompt", "cabbage", "--max-new-tokens", 6, "--top-k", 3, "--json"]
    ours = [json.loads(x) for x in run(*common).stdout.splitlines() if x.startswith("{")]
    lib = [json.loads(x) for x in run(*common, env={"PADDLE_SCORER_CPU_FORWARD": "library"}).stdout.splitlines()
           if x.startswith("{")]
    assert len(ours) == len(lib) == 2
    for a, b in zip(ours, lib):
        assert [s["token_id"] for s in a["steps"]] == [s["token_id"] for s in b["steps"]]
        assert max(abs(s["logprob"] - t["logprob"]) for s, t in zip(a["steps"], b["steps"])) <= 1e-5


def test_unsupported_settings_fall_back_to_the_library_with_the_reason():
    class Cfg:
        hidden_size, num_attention_heads, num_key_value_heads, rms_norm_eps = 32, 4, 2, 1e-6
        alibi = True

    spec, why = decoder.spec_for("paddlenlp", "LlamaForCausalLM", "llama", Cfg())
    assert spec is None and "alibi" in why
    spec, why = decoder.spec_for("paddlenlp", "GPT2LMHeadModel", "gpt", Cfg())
    assert spec is None and "no CPU fast path" in why
    Cfg.alibi = False
    spec, why = decoder.spec_for("paddlenlp", "Qwen2ForCausalLM", "qwen2", Cfg())
    assert why is None and spec.qk_scale == "divide-q" and spec.group == 2 and spec.rotation == "half"


def test_padding_slots_are_not_computed():
    """Right-padded rows: only the real tokens go through the GEMMs; a tree mask's pad slots are found too."""
    from paddle_scorer.compute.packing import pack

    p = pack([[1, 2, 3, 4], [5, 6]], [[[7], [8, 9, 10]], [[7], [8, 9, 10]]], pad_id=0)
    b = decoder.Batch.from_mask(p.mask, p.ids.shape[1])
    assert list(decoder.real_lengths(p.mask, p.ids.shape[1])) == [6, 4] and b.size == 10
    x = np.arange(b.size * 2, dtype=np.float32).reshape(b.size, 2)
    assert np.array_equal(b.pick(b.spread(x)), x) and b.spread(x).shape == (2, 6, 2)
    assert (b.spread(x)[1, 4:] == 0).all()
    flat = decoder.Batch.from_mask(np.ones((2, 3), np.int64), 3)
    assert flat.index is None and flat.size == 6


@pytest.fixture(scope="module")
def dynamic_ntk(tmp_path_factory):
    """A Llama whose RoPE is dynamic-NTK scaled past a 48-token trained context (round 4: the decoder's rotary table
    grew past it to another length than the library's, and every rotation differed)."""
    model = builders.build_model("llama", seed=13, max_position_embeddings=48, rope_scaling_type="dynamic_ntk",
                                 rope_scaling_factor=2.0)
    return builders.save_model(model, tmp_path_factory.mktemp("ntk") / "llama-ntk")


def test_dynamic_ntk_equals_the_library_past_the_trained_context(dynamic_ntk, tmp_path, deltas):
    shots = "Query: how much are apples today? Answer: goods\nQuery: where do I renew a passport? Answer: life\n"
    common = ["--model", dynamic_ntk, "--labels", LABELS, "--template", shots + TEMPLATE, "--input",
              builders.DEMO_QUERIES, "--limit", 4, "--max-length", 200, "--force-max-length"]
    ours, meta = classify(tmp_path, "ours", *common)
    lib, _ = classify(tmp_path, "lib", *common, env={"PADDLE_SCORER_CPU_FORWARD": "library"})
    assert min(len(r["prompt_token_ids"]) for r in ours) > 48  # every prompt passes the trained context
    assert meta["model"]["compute"]["forward"] == "paddle-scorer decoder"
    assert meta["prefix_reuse"]["enabled"] is False and "dynamic RoPE" in meta["prefix_reuse"]["why"]
    d = deltas.record("nlp env: dynamic-NTK Llama past its context, decoder vs library", np.abs(
        logprobs(ours) - logprobs(lib)).max())
    assert d <= 1e-5


def test_dynamic_ntk_generation_equals_the_library_step_by_step(dynamic_ntk, deltas):
    common = ["generate", "--model", dynamic_ntk, "--prompt", "what is the price of cabbage and of apples today",
              "--raw", "--max-new-tokens", 40, "--top-k", 2, "--json"]
    ours = [json.loads(x) for x in run(*common).stdout.splitlines() if x.startswith("{")][0]
    lib = [json.loads(x) for x in run(*common, env={"PADDLE_SCORER_CPU_FORWARD": "library"}).stdout.splitlines()
           if x.startswith("{")][0]
    # generation stops at the 48-token context; a table grown to 64 rows (the old rule) was scaled for 64 already
    assert len(ours["prompt_token_ids"]) + len(ours["steps"]) == 48
    assert [s["token_id"] for s in ours["steps"]] == [s["token_id"] for s in lib["steps"]]
    d = deltas.record("nlp env: dynamic-NTK Llama generation, decoder vs library", max(
        abs(s["logprob"] - t["logprob"]) for s, t in zip(ours["steps"], lib["steps"])))
    assert d <= 1e-5
