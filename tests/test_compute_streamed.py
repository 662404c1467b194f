"""Layer-streamed classify (models bigger than RAM) equals the in-RAM path, through the real CLI: Llama and
Qwen2 (tied embeddings too), single- and multi-token labels, adapter attached and merged, calibration, chat
template, several blocks, resume after a kill; and the memory rule's refusals."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.model.memory_budget import INTERPRETER_BYTES, STREAM_WORKING_BYTES, MemoryBudgetError, plan_memory

runner = CliRunner()
TEMPLATE = builders.DEMO_SCORER["template"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def read(path):
    return [json.loads(line) for line in open(path)]


def classify(tmp_path, name, *args):
    out = tmp_path / f"{name}.jsonl"
    r = cli("classify", *args, "--output", out)
    assert r.exit_code == 0, r.output
    return read(out), json.loads(out.with_name(out.name + ".meta.json").read_text()), r


def logprobs(recs):
    return np.array([[v for v in r["logprobs"].values()] for r in recs])


@pytest.mark.parametrize("call_tokens", [1, 200])
def test_layer_calls_cut_differently_from_batches_give_the_same_scores(models, tmp_path, monkeypatch, call_tokens):
    """A block's records are re-cut into layer calls of ~CALL_TOKENS padded tokens; scores must not depend
    on the cut (1 token: every record alone; 200: a few records of mixed lengths padded together)."""
    from paddle_scorer.compute import streamed as streamed_module

    common = ["--model", models["llama"], "--lora", models["llama_lora"], "--labels", "goods and things,life",
              "--template", TEMPLATE, "--input", builders.DEMO_QUERIES, "--limit", 12, "--batch-size", 3]
    ram, _, _ = classify(tmp_path, "ram", *common, "--execution", "in-ram")
    calls = []
    original = streamed_module.pack
    monkeypatch.setattr(streamed_module, "pack", lambda *a, **kw: calls.append(len(a[0])) or original(*a, **kw))
    monkeypatch.setattr(streamed_module, "CALL_TOKENS", call_tokens)
    streamed, _, _ = classify(tmp_path, "streamed", *common, "--execution", "streamed")
    np.testing.assert_allclose(logprobs(streamed), logprobs(ram), atol=1e-5)
    assert sum(calls) == 12
    if call_tokens == 1:
        assert calls == [1] * 12
    else:
        assert 1 < len(calls) < 12 and max(calls) > 3  # not the batches of 3 it was given


def test_regroup_cuts_by_padded_tokens_in_order():
    from paddle_scorer.compute.packing import regroup

    items = [([1] * 10, [[5]]), ([1] * 9, [[5]]), ([1] * 9, [[5]]), ([1] * 4, [[5]]), ([1] * 30, [[5]])]
    assert regroup(items, 30) == [[0, 1, 2], [3], [4]]  # 3 x 10 fits; then 4 x 10 would not; 30 alone
    assert regroup(items, 1000) == [[0, 1, 2, 3, 4]]
    # multi-token labels widen every row by the other tokens of each label
    multi = [([1] * 4, [[5, 6, 7], [8]]), ([1] * 4, [[5, 6, 7], [8]])]
    assert regroup(multi, 12) == [[0, 1]] and regroup(multi, 11) == [[0], [1]]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A Qwen2 whose LM head is its embedding table (tied), with an adapter."""
    root = tmp_path_factory.mktemp("tied")
    model = builders.build_model("qwen2", seed=7, tie_word_embeddings=True)
    base = builders.save_model(model, root / "qwen2-tied")
    lora = builders.save_lora(model, root / "qwen2-tied-lora", base_ref=str(base),
                              targets=(".*q_proj.*", ".*v_proj.*", ".*gate_proj.*"))
    return base, lora


CASES = [
    ("llama", "goods,life", "attach"),
    ("llama", "goods and things,life stuff here,other", "merge"),  # multi-token labels: the packed tree mask
    ("qwen2", "goods,life and death", "attach"),
]


@pytest.mark.parametrize("arch,labels,mode", CASES)
def test_streamed_equals_in_ram(models, tmp_path, arch, labels, mode):
    common = ["--model", models[arch], "--lora", models[f"{arch}_lora"], "--labels", labels, "--template", TEMPLATE,
              "--input", builders.DEMO_QUERIES, "--limit", 24, "--mode", mode, "--batch-size", 5]
    ram, ram_meta, _ = classify(tmp_path, "ram", *common, "--execution", "in-ram")
    streamed, meta, r = classify(tmp_path, "streamed", *common, "--execution", "streamed", "--stream-block-records", 10)
    assert [x["id"] for x in streamed] == [x["id"] for x in ram]
    np.testing.assert_allclose(logprobs(streamed), logprobs(ram), atol=1e-5)
    assert [x["prediction"] for x in streamed] == [x["prediction"] for x in ram]
    assert ram_meta["execution"] == "in-ram" and meta["execution"] == "streamed"
    s = meta["streaming"]
    assert meta["block_records"] == 10 and meta["blocks"] == 3 and s["blocks"] == 3
    assert s["layer_passes"] == 3 * 2  # each of the 2 decoder layers once per block, not once per batch
    assert len(s["block_seconds"]) == 3 and all(t > 0 for t in s["block_seconds"])  # each block's pass, timed
    assert s["bytes_read"] > 0 and "streaming: blocks of up to 10 record(s)" in r.stderr


def test_streamed_tied_embeddings_with_calibration_and_chat_template(tied, tmp_path):
    base, lora = tied
    tok = tmp_path / "tok"
    tok.mkdir()
    builders.copy_tokenizer(tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    common = ["--model", base, "--lora", lora, "--tokenizer", tok, "--labels", "goods,life", "--template", TEMPLATE,
              "--input", builders.DEMO_QUERIES, "--limit", 9, "--calibration", "contextual"]
    ram, ram_meta, _ = classify(tmp_path, "ram", *common, "--execution", "in-ram")
    streamed, meta, _ = classify(tmp_path, "streamed", *common, "--execution", "streamed")
    assert meta["identity"]["chat_template"] is True
    np.testing.assert_allclose(logprobs(streamed), logprobs(ram), atol=1e-5)
    np.testing.assert_allclose([list(x["probs"].values()) for x in streamed],
                               [list(x["probs"].values()) for x in ram], atol=1e-5)
    cf_ram = ram_meta["calibration"]["content_free_probs"]
    cf = meta["calibration"]["content_free_probs"]
    assert cf == pytest.approx(cf_ram, abs=1e-6)


def test_a_memory_limit_below_the_model_streams_automatically(tmp_path):
    """The memory rule, not a flag, picks streaming: a 150 MB model under a budget it does not fit."""
    model = builders.build_model("llama", seed=2, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                                 num_attention_heads=8, num_key_value_heads=8)
    base = builders.save_model(model, tmp_path / "wide")
    weights = sum(int(np.prod(p.shape)) for p in model.parameters()) * 4
    layer = sum(int(np.prod(p.shape)) for n, p in model.named_parameters() if ".layers.0." in n) * 4
    fits = int(weights * 1.1) + INTERPRETER_BYTES
    stream_min = 3 * layer + 512 * 512 * 4 + INTERPRETER_BYTES + STREAM_WORKING_BYTES
    assert stream_min < fits
    limit = (stream_min + fits) // 2
    args = ["--model", base, "--labels", "goods,life", "--template", TEMPLATE, "--input", builders.DEMO_QUERIES,
            "--limit", 6]
    streamed, meta, r = classify(tmp_path, "auto", *args, "--memory-limit", f"{limit // 1024}KB")
    assert meta["execution"] == "streamed" and "scoring layer by layer (streamed)" in r.stderr
    ram, _, _ = classify(tmp_path, "ram", *args)
    # hidden 512 with x5 weights: log-probs of ~10 agree to float32 noise (2e-6 relative), not 1e-5 absolute
    np.testing.assert_allclose(logprobs(streamed), logprobs(ram), rtol=1e-5, atol=1e-5)


def test_budget_too_small_even_to_stream_names_the_minimum(models):
    r = cli("classify", "--model", models["llama"], "--labels", "a,b", "--prompt", "x", "--memory-limit", "100MB")
    assert r.exit_code == 4 and "too small even to stream" in r.stderr and "the minimum is about" in r.stderr
    assert "Traceback" not in r.output


def test_generate_under_a_budget_too_small_even_to_stream_names_the_minimum(models):
    r = cli("generate", "--model", models["llama"], "--prompt", "x", "--memory-limit", "600MB")
    assert r.exit_code == 4 and "too small even to stream" in r.stderr and "the minimum is about" in r.stderr


def test_plan_memory_rule():
    mb = 1024**2
    layers = {i: 100 * mb for i in range(8)} | {None: 50 * mb}
    assert plan_memory(layers, 40 * mb, "cpu", limit=10**10).execution == "in-ram"
    p = plan_memory(layers, 40 * mb, "cpu", limit=INTERPRETER_BYTES + 500 * mb)
    assert p.execution == "streamed"
    assert p.stream_fixed == 3 * 100 * mb + 40 * mb + INTERPRETER_BYTES + STREAM_WORKING_BYTES
    with pytest.raises(MemoryBudgetError, match="minimum is about"):
        plan_memory(layers, 40 * mb, "cpu", limit=INTERPRETER_BYTES)
    with pytest.raises(MemoryBudgetError, match="needs about"):
        plan_memory(layers, 40 * mb, "cpu", limit=INTERPRETER_BYTES + 500 * mb, execution="in-ram")
    assert plan_memory(layers, 40 * mb, "gpu:0").execution == "in-ram"


def test_unexpected_key_layout_cannot_be_streamed(models, copy_of):
    from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

    folder = copy_of(models["llama"])
    sd = read_pdparams(folder / "model_state.pdparams")
    write_pdparams({k.replace(".layers.", ".blocks."): v for k, v in sd.items()}, folder / "model_state.pdparams")
    r = cli("classify", "--model", folder, "--labels", "a,b", "--prompt", "x", "--execution", "streamed")
    assert r.exit_code == 4 and "no decoder layers" in r.stderr and "Traceback" not in r.output


def test_killed_mid_stream_resumes_from_the_last_flushed_block(models, tmp_path):
    data = tmp_path / "many.jsonl"
    base = [json.loads(line) for line in open(builders.DEMO_QUERIES)]
    with open(data, "w") as fh:
        for k in range(4):
            for rec in base:
                fh.write(json.dumps({**rec, "id": f"{rec['id']}-{k}"}) + "\n")
    out = tmp_path / "s.jsonl"
    args = [sys.executable, "-m", "paddle_scorer.cli", "classify", "--model", str(models["llama"]), "--lora",
            str(models["llama_lora"]), "--labels", "goods,life", "--template", TEMPLATE, "--input", str(data),
            "--output", str(out), "--execution", "streamed", "--stream-block-records", "40"]
    working = tmp_path / ".s.jsonl.inprogress"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if working.exists() and sum(1 for _ in open(working)) >= 80:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = sum(1 for _ in open(working))
    assert done % 40 == 0 and 80 <= done < 600 and not out.exists()  # whole blocks only, no output yet
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{600 - done} record(s), {done} already done" in r.stdout
    recs = read(out)
    assert [x["id"] for x in recs] == [json.loads(line)["id"] for line in open(data)]
    fresh, _, _ = classify(tmp_path, "fresh", "--model", models["llama"], "--lora", models["llama_lora"], "--labels",
                           "goods,life", "--template", TEMPLATE, "--input", data)
    np.testing.assert_allclose(logprobs(recs), logprobs(fresh), atol=1e-5)


def test_widening_is_exact_for_half_precision_in_any_layout():
    """bfloat16 (a shift of its bits) and float16, contiguous or a transposed view, into a new array or a column range:
    equal to numpy's own conversion, NaN/inf kept (the finite check after it sees them)."""
    import ml_dtypes

    from paddle_scorer.model.arrays import widen

    rng = np.random.default_rng(0)
    src = rng.standard_normal((300, 70), dtype=np.float32) * 1e3
    src[3, 5], src[7, 1] = np.nan, np.inf
    for dtype in (ml_dtypes.bfloat16, np.float16):
        half = src.astype(dtype)
        for view in (half, half.T, half[:, 10:40]):
            got = widen(view)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, view.astype(np.float32))
        out = np.zeros((70, 600), np.float32)
        widen(half.T, out[:, 300:])
        np.testing.assert_array_equal(out[:, 300:], half.T.astype(np.float32))
        assert not out[:, :300].any()


def test_a_layer_arena_hands_the_same_memory_to_the_layer_two_later():
    from paddle_scorer.compute.layer_arena import LayerArena

    arena = LayerArena()
    first = [arena.take((64, 48)), arena.take((1000,))]
    assert not np.shares_memory(first[0], first[1])
    arena.reset()
    again = [arena.take((64, 48)), arena.take((1000,))]
    assert all(np.shares_memory(a, b) for a, b in zip(first, again))  # reused: no fresh pages
    big = arena.take((5000, 4000))  # a bigger layer grows the arena (a new chunk), the rest is kept
    assert big.shape == (5000, 4000) and len(arena.chunks) == 2
