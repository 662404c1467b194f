"""generate past RAM: a streamed model generates a block of records with one pass over the layers per step (their KV
caches in RAM), each record computed as in RAM (its own shapes): token for token the in-RAM run, every step's
probabilities within 1e-6 (measured: equal), dense and MoE, with an adapter attached, greedy and sampled, stop strings,
top-k traces, resumed runs; the block sized by the memory plan, or refused with the numbers. The in-RAM reference is
run without prefix reuse (with it, a shared prefix is computed in another order: float32 noise, ~1e-6)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import peft_fixtures as pf
from cli_runs import run
from paddle_scorer.cli.app import app

TOL = 1e-6  # per-step probabilities (the log-probs: within a few float32 ulps, 1e-5)
PROMPTS = ["what is the price of cabbage", "how do I renew my driving licence?", "hello", "the rent is due on the"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A dense model (Llama 3.1 with a peft DoRA adapter and a trained head) and a MoE (Qwen3-MoE with a peft DoRA
    adapter on its experts), both computed by the decoder."""
    root = tmp_path_factory.mktemp("gen-streamed")
    out = {}
    for name in ("llama_dora", "qwen3_moe_dora"):
        family, overrides, config = pf.ADAPTERS[name]
        base = pf.build_base(family, root / name / "base", overrides)
        pf.build_adapter(base, root / name / "peft", config)
        out[name] = (root / name / "base", root / name / "peft")
    return out


def generate(model, lora, *extra):
    args = ["generate", "--model", model, "--lora", lora, "--raw", "--json", "--top-k", 3]
    for p in PROMPTS:
        args += ["--prompt", p]
    r = run(*args, *extra)
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def worst_step(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Same tokens, texts, finish reasons and top-k ids; the largest difference of a step's probabilities (the chosen
    token's and the top-k's) and of its log-probs and entropy."""
    probs = logs = 0.0
    for x, y in zip(a, b, strict=True):
        assert x["generated_token_ids"] == y["generated_token_ids"] and x["finish_reason"] == y["finish_reason"]
        assert x["text"] == y["text"]
        for s, t in zip(x["steps"], y["steps"], strict=True):
            assert [c["token_id"] for c in s["top"]] == [c["token_id"] for c in t["top"]]
            probs = max(probs, abs(s["prob"] - t["prob"]), *(abs(c["prob"] - d["prob"]) for c, d in zip(s["top"], t["top"])))
            logs = max(logs, abs(s["logprob"] - t["logprob"]), abs(s["entropy"] - t["entropy"]),
                       *(abs(c["logprob"] - d["logprob"]) for c, d in zip(s["top"], t["top"])))
    return probs, logs


@pytest.mark.parametrize("name", ["llama_dora", "qwen3_moe_dora"])
@pytest.mark.parametrize("decoding", ["greedy", "sampled", "stop"])
def test_streamed_generation_equals_in_ram(bases, name, decoding, deltas):
    base, lora = bases[name]
    extra = {"greedy": ("-n", 8), "sampled": ("-n", 8, "--sample", "--temperature", 1.5, "--seed", 3),
             "stop": ("-n", 8, "--sample", "--seed", 1)}[decoding]
    extra = (*extra, "--no-prefix-reuse")  # in RAM, each record computed alone: the computation streaming repeats
    in_ram = generate(base, lora, *extra, "--execution", "in-ram")
    if decoding == "stop":  # a string one sampled text contains and another does not: they finish at different steps
        texts = [r["text"] for r in in_ram]
        stop = next(t[i:i + 2] for t in texts for i in range(1, len(t) - 1)
                    if t[i:i + 2].strip() and any(t[i:i + 2] not in u for u in texts))
        extra = (*extra, "--stop", stop)
        in_ram = generate(base, lora, *extra, "--execution", "in-ram")
        assert any(r["finish_reason"] == "stop" for r in in_ram) and any(r["finish_reason"] != "stop" for r in in_ram)
        assert all(stop not in r["text"] for r in in_ram)
    streamed = generate(base, lora, *extra, "--execution", "streamed")
    probs, logs = worst_step(streamed, in_ram)
    assert deltas.record(f"nlp env: generate streamed vs in RAM ({name}, {decoding}), step probabilities", probs) <= TOL
    assert deltas.record(f"nlp env: generate streamed vs in RAM ({name}, {decoding}), step log-probs", logs) <= 1e-5


def test_one_pass_per_step_for_a_block_and_a_resumed_run_skips_finished_records(bases, tmp_path, monkeypatch):
    """Blocks of 3 records: a run killed in its second block is resumed from there; each block costs a prefill pass and
    one pass per further step over the layers (not one per record), and the records equal in-RAM generation."""
    from paddle_scorer.tasks.generate import Generator, generate_file, options_with_defaults
    from paddle_scorer.tasks.job import Destination, Source
    from paddle_scorer.tasks.loading import LoadOptions

    base, lora = bases["qwen3_moe_dora"]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "query": p}) + "\n" for i, p in enumerate(PROMPTS * 2)))
    out = tmp_path / "out.jsonl"
    opts, _ = options_with_defaults(base, lora, template="{query}", max_new_tokens=5, stop_at_eos=False)
    load = LoadOptions(base, lora, execution="streamed")
    monkeypatch.setattr(Generator, "records_per_block", lambda self, items: 3)
    real, calls = Generator.generate_block, []

    def killed(self, items):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(Generator, "generate_block", killed)
    with pytest.raises(KeyboardInterrupt):
        generate_file(load, opts, Source(input=data), Destination(out), argv=[])
    monkeypatch.setattr(Generator, "generate_block", real)
    resumed = generate_file(load, opts, Source(input=data), Destination(out, resume=True), argv=[])
    assert resumed.stats.skipped == 3 and resumed.stats.scored == 5
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["model"]["execution"]["execution"] == "streamed"
    # two blocks (3 + 2 records) x (a prefill + 4 steps) x 3 layers: one pass per step for the whole block
    assert meta["streaming"]["layer_passes"] == 2 * 5 * 3
    in_ram = generate_file(LoadOptions(base, lora, execution="in-ram"), dataclasses.replace(opts, prefix_reuse=False),
                           Source(input=data),
                           Destination(tmp_path / "ram.jsonl"), argv=[])
    got = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in got] == list(range(8))
    assert [r["generated_token_ids"] for r in got] == [r["generated_token_ids"] for r in in_ram.records]


def test_kv_caches_that_do_not_fit_are_refused_with_the_numbers(bases, tmp_path):
    from paddle_scorer.model.load_plan import make_plan

    base, lora = bases["llama_dora"]
    fixed = make_plan(base, lora, device="cpu", execution="streamed").memory.stream_fixed
    limit = fixed + (3 << 20)  # room for three layers, the head and the embedding, not for 2,000-token records
    r = CliRunner().invoke(app, ["generate", "--model", str(base), "--lora", str(lora), "--raw", "--prompt", "hi",
                                 "-n", "2000", "--memory-limit", f"{limit}B", "--execution", "streamed",
                                 "--output", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2, r.output
    assert "keeps each record's keys and values in RAM" in r.output and "raise --memory-limit" in r.output
    assert not (tmp_path / "o.jsonl").exists()


def test_a_moe_step_reads_only_the_experts_its_tokens_choose(bases, deltas):
    """One record: each step's token chooses 2 of the 8 experts of a Qwen3-MoE layer; the streamed pass reads only
    those (the router runs first), with the adapter's DoRA merged into each as it is read; the same tokens."""
    base, lora = bases["qwen3_moe_dora"]
    args = ["generate", "--model", base, "--lora", lora, "--raw", "--json", "--top-k", 3, "-n", 5, "--prompt", PROMPTS[0]]
    in_ram = [json.loads(x) for x in run(*args, "--no-prefix-reuse", "--execution", "in-ram").stdout.splitlines()
              if x.startswith("{")]
    r = run(*args, "--execution", "streamed")
    streamed = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    probs, _ = worst_step(streamed, in_ram)
    assert deltas.record("nlp env: generate streamed, experts read when chosen (qwen3_moe), step probabilities",
                         probs) <= TOL


def test_lazy_experts_are_counted_in_the_provenance(bases, tmp_path):
    base, lora = bases["qwen3_moe_dora"]
    out = tmp_path / "o.jsonl"
    run("generate", "--model", base, "--lora", lora, "--raw", "-n", 4, "--prompt", PROMPTS[2], "--output", out,
        "--execution", "streamed")
    s = json.loads(out.with_name(out.name + ".meta.json").read_text())["streaming"]
    prompt = len(json.loads(out.read_text())["prompt_token_ids"])
    lazy = 3 + (prompt * 2 < 8)  # the 3 step passes (one token, 2 of 8 experts), and the prompt's if it is short too
    # x 2 MoE layers (layer 1 is dense) x 8 experts: each token chose 2, the rest were never read
    assert s["experts_read"] + s["experts_skipped"] == lazy * 2 * 8
    assert 0 < s["experts_read"] <= 3 * 2 * 2 + (lazy - 3) * 2 * 2 * prompt


def test_lazy_experts_carry_their_attached_pairs(bases, tmp_path, deltas):
    """A plain LoRA on every expert (attached, not merged): an expert read when chosen gets its own pairs."""
    import family_fixtures as ff

    base = tmp_path / "base"
    model = pf.build_base("qwen3_moe", base, {})
    lora = tmp_path / "lora"
    pf.build_adapter(model, lora, dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    args = ["generate", "--model", base, "--lora", lora, "--raw", "--json", "--top-k", 3, "-n", 5, "--prompt", PROMPTS[0]]
    in_ram = [json.loads(x) for x in run(*args, "--no-prefix-reuse", "--execution", "in-ram").stdout.splitlines()
              if x.startswith("{")]
    streamed = [json.loads(x) for x in run(*args, "--execution", "streamed").stdout.splitlines() if x.startswith("{")]
    probs, _ = worst_step(streamed, in_ram)
    assert deltas.record("nlp env: generate streamed, lazy experts with attached pairs, step probabilities",
                         probs) <= TOL
    want, _ = ff.greedy(model, in_ram[0]["prompt_token_ids"], 5)  # and the adapter is really there: peft's tokens
    assert in_ram[0]["generated_token_ids"] == want
