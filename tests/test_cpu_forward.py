"""The CPU decoder forward (decoder.py, cpu_runner.py) and its GEMM kernel (gemm.py): the same scores as the
library's own forward through the real CLI (Llama and Qwen2, LoRA attached and merged, in RAM and streamed,
multi-token labels, generation), the kernel choice with its self-check, and what provenance and doctor say."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.compute import decoder
from paddle_scorer.compute import gemm
from paddle_scorer.cli.app import app

runner = CliRunner()
TEMPLATE = builders.DEMO_SCORER["template"]
LABELS = "goods,life,goods and things"  # single-token labels and a 3-token one (the tree mask)


def run(*args, env=None):
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code == 0, r.output
    return r


def classify(tmp_path, name, *args, env=None):
    out = tmp_path / f"{name}.jsonl"
    run("classify", *args, "--output", out, env=env)
    recs = [json.loads(line) for line in open(out)]
    return recs, json.loads(out.with_name(out.name + ".meta.json").read_text())


def logprobs(recs):
    return np.array([list(r["logprobs"].values()) for r in recs])


@pytest.fixture
def fresh_kernel():
    """The kernel choice is cached per process: clear it around tests that change the environment."""
    gemm.gemm.cache_clear()
    yield
    gemm.gemm.cache_clear()


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


def test_provenance_names_the_gemm_kernel_and_its_speed(models, tmp_path):
    _, meta = classify(tmp_path, "p", "--model", models["llama"], "--labels", "goods,life", "--prompt", "a b c")
    choice = meta["model"]["compute"]["gemm"]
    assert choice["path"] in gemm.CANDIDATES and choice["gflops"] > 0
    assert set(choice["measured"]) <= set(gemm.CANDIDATES) and choice["path"] in choice["measured"]
    assert choice["gflops"] == choice["measured"][choice["path"]]
    others = [g for n, g in choice["measured"].items() if n != "paddle"]
    # Paddle's kernel unless another is clearly faster: the choice does not flip between runs on timing noise
    assert choice["path"] == "paddle" or choice["gflops"] >= gemm.MARGIN * choice["measured"]["paddle"]
    assert choice["path"] != "paddle" or all(g < gemm.MARGIN * choice["gflops"] for g in others)


def test_both_gemm_kernels_give_the_same_scores(models, tmp_path, monkeypatch, fresh_kernel):
    common = ["--model", models["llama"], "--lora", models["llama_lora"], "--labels", LABELS, "--template", TEMPLATE,
              "--input", builders.DEMO_QUERIES, "--limit", 6]
    got = {}
    for name in gemm.CANDIDATES:
        monkeypatch.setenv(gemm.ENV, name)
        gemm.gemm.cache_clear()
        got[name], meta = classify(tmp_path, name, *common)
        assert meta["model"]["compute"]["gemm"]["path"] == name and meta["model"]["compute"]["gemm"]["forced"]
    np.testing.assert_allclose(logprobs(got["numpy"]), logprobs(got["paddle"]), atol=1e-5)


class _Wrong(gemm.NumpyKernel):
    name = "numpy"

    def mm(self, x, w, trans_w=False):
        return super().mm(x, w, trans_w) + np.float32(1e-3)


def test_a_kernel_that_fails_its_self_check_is_not_used(monkeypatch, models, tmp_path, fresh_kernel):
    real = gemm.make
    monkeypatch.setattr(gemm, "make", lambda name: _Wrong() if name == "numpy" else real(name))
    _, choice = gemm.choose((64, 64, 64), {})
    assert choice.path == "paddle" and "numpy" not in choice.measured
    assert "wrong result" in choice.excluded["numpy"] and any("numpy GEMM kernel is not used" in n for n in choice.notes)
    # forced onto the broken kernel: it is still refused, the other one runs, and the CLI says so in one line
    monkeypatch.setenv(gemm.ENV, "numpy")
    r = run("classify", "--model", models["llama"], "--labels", "goods,life", "--prompt", "x y", "--json")
    notes = [line for line in r.stderr.splitlines() if "numpy GEMM kernel is not used" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ")


def test_the_choice_prefers_paddle_unless_clearly_beaten(monkeypatch, fresh_kernel):
    speeds = {"paddle": 100.0, "numpy": 110.0}
    monkeypatch.setattr(gemm, "measure_all", lambda ks, shape, rounds=5: {n: speeds[n] for n in ks})
    assert gemm.choose((64, 64, 64), {}, keep=False)[1].path == "paddle"  # 1.1x: noise, not a reason to switch
    speeds["numpy"] = 200.0
    assert gemm.choose((64, 64, 64), {}, keep=False)[1].path == "numpy"  # 2x (numpy's OpenBLAS on AMD): switch


def test_the_choice_is_kept_for_the_machine_so_processes_agree(monkeypatch, tmp_path, fresh_kernel):
    """Round 4: under load 3 of ~21 processes chose another kernel; the first decision is kept and reused."""
    monkeypatch.setenv("PADDLE_SCORER_CACHE_DIR", str(tmp_path))
    speeds = {"paddle": 100.0, "numpy": 300.0}
    monkeypatch.setattr(gemm, "measure_all", lambda ks, shape, rounds=5: {n: speeds[n] for n in ks})
    _, first = gemm.choose((64, 64, 64), {})
    assert first.path == "numpy" and first.decided == "measured" and first.record
    speeds.update(paddle=400.0)  # a later process under other load would measure the opposite
    _, later = gemm.choose((64, 64, 64), {})
    assert later.path == "numpy" and later.decided == "kept" and later.decided_at == first.decided_at
    assert gemm.choose((128, 64, 64), {})[1].path == "paddle"  # another shape is its own decision
    # a damaged record is ignored (measured again), never fatal; the file follows the umask
    record = tmp_path / gemm.DECISIONS_FILE
    data = json.loads(record.read_text())
    data[next(iter(data))] = {"path": "numpy", "measured": {"numpy": None}}
    record.write_text(json.dumps(data))
    _, again = gemm.choose((64, 64, 64), {})
    assert again.decided == "measured" and again.path == "paddle"
    record.write_text("{not json")
    assert gemm.choose((64, 64, 64), {})[1].decided == "measured"
    assert oct(record.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_unknown_forced_kernel_is_said_and_ignored(fresh_kernel):
    _, choice = gemm.choose((64, 64, 64), {gemm.ENV: "blis"})
    assert not choice.forced and choice.path in gemm.CANDIDATES
    assert any("'blis' is not one of" in n for n in choice.notes)


def test_zero_copy_views_share_memory_both_ways():
    from paddle_scorer.process.environment import paddle

    pd = paddle()
    t = pd.to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    a = gemm.to_numpy(t)
    a[0, 0] = 42.0
    assert a.flags.writeable and float(t.numpy()[0, 0]) == 42.0
    m = gemm.Mat(np.ones((3, 2), np.float32))
    m.np[1, 1] = 7.0
    assert float(m.pd.numpy()[1, 1]) == 7.0


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


def test_doctor_reports_the_gemm_kernel():
    r = run("doctor", "--json")
    facts = json.loads(r.stdout)
    choice = facts["cpu"]["gemm"]
    assert choice["path"] in gemm.CANDIDATES and choice["gflops"] > 0
    assert "OPENBLAS_NUM_THREADS" in facts["cpu"]["settings"]
    assert "float32 GEMM" in run("doctor").stdout


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
