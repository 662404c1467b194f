"""Blocked attention with an online softmax (#30): queries and keys in blocks, masked blocks skipped, unmasked blocks
without a mask, equal to the exact softmax — against a float64 reference on random inputs (causal, padding, the tree
mask of packed labels, a per-row KV cache, a shared prefix, grouped KV heads) and against the library's forward
through the CLI, with blocks made small so that every length crosses several of them."""

from __future__ import annotations

import numpy as np
import pytest

import builders
from cli_runs import classify, logprobs, run
from paddle_scorer.compute.decoder import batch as batch_mod
from paddle_scorer.compute.decoder import forward as forward_mod
from paddle_scorer.compute.decoder.batch import MASKED, Batch
from paddle_scorer.compute.decoder.spec import ArchSpec
from paddle_scorer.compute.gemm import NumpyKernel

LABELS = "goods,life,goods and things"  # single-token labels and a 3-token one (the tree mask)
SHOTS = "".join(f"Query: {q}\nAnswer: {a}\n" for q, a in [
    ("how much are tomatoes", "goods"), ("my landlord raised the rent", "life"), ("price of a new phone", "goods"),
    ("where to go on holiday", "life"), ("cheap winter boots", "goods"), ("my cat is sick", "life")])


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 query rows (4 per KV head of two) and 8-16 keys: a 45-token input crosses a dozen query blocks and
    several key blocks, with and without masks."""
    monkeypatch.setattr(forward_mod, "ATTENTION_ROWS", 8)
    monkeypatch.setattr(batch_mod, "BLOCK_SCORES", 1024)
    monkeypatch.setattr(batch_mod, "KEY_BLOCK_STEP", 8)


def spec(heads=4, kv=2, d=8, qk_scale="scores"):
    return ArchSpec("paddlenlp", "LlamaForCausalLM", heads * d, heads, kv, d, 1e-6, "half", qk_scale, False, "llama")


def reference(q, k, v, keep, scale, past=None, prefix=None):
    """float64 softmax(q k^T * scale + mask) v per row and head; ``keep [B, T, S+T]``; ``past``: (K, V)
    ``[B, kv, S, d]``; ``prefix``: (K, V) ``[kv, P, d]`` seen by every query."""
    B, T, H, d = q.shape
    kv = k.shape[2]
    G = H // kv
    out = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        keys = k[b].transpose(1, 0, 2)  # [kv, T, d]
        vals = v[b].transpose(1, 0, 2)
        mask = keep[b]
        if past is not None:
            keys = np.concatenate([past[0][b], keys], axis=1)
            vals = np.concatenate([past[1][b], vals], axis=1)
        if prefix is not None:
            keys = np.concatenate([prefix[0], keys], axis=1)
            vals = np.concatenate([prefix[1], vals], axis=1)
            mask = np.concatenate([np.ones((T, prefix[0].shape[1]), bool), mask], axis=1)
        for h in range(H):
            s = q[b, :, h].astype(np.float64) @ keys[h // G].T.astype(np.float64) * scale
            s = np.where(mask, s, -np.inf)
            s -= s.max(axis=1, keepdims=True)
            p = np.exp(s)
            out[b, :, h] = (p / p.sum(axis=1, keepdims=True)) @ vals[h // G].astype(np.float64)
    return out


def run_attention(sp, q, k, v, bt, past=None, prefix=None):
    f = forward_mod.Forward(sp, NumpyKernel(), rope=None)
    flat = lambda a: bt.pick(a)  # noqa: E731 - [B, T, ...] -> the real tokens
    o = f.attention(flat(q), flat(k), flat(v), bt, *(past or (None, None)), prefix=prefix)
    return bt.spread(o.reshape(-1, sp.heads, sp.value_dim))


@pytest.mark.parametrize("qk_scale", ["scores", "divide-q", "multiply-q"])
@pytest.mark.parametrize("case", ["causal", "padded", "tree", "past", "prefix"])
def test_blocked_attention_equals_the_exact_softmax(small_blocks, case, qk_scale):
    rng = np.random.default_rng(7)
    sp = spec(qk_scale=qk_scale)
    B, T = 3, 45
    q = rng.standard_normal((B, T, sp.heads, sp.head_dim), dtype=np.float32) * 2
    k = rng.standard_normal((B, T, sp.kv_heads, sp.head_dim), dtype=np.float32) * 2
    v = rng.standard_normal((B, T, sp.kv_heads, sp.head_dim), dtype=np.float32)
    lengths = [45, 30, 12] if case == "padded" else [45] * B
    mask = np.zeros((B, T), np.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    past = prefix = None
    if case == "tree":  # 3 labels of 5 tokens packed behind a 30-token prompt, each seeing the prompt and itself
        keep = np.tril(np.ones((T, T), bool))
        for a in range(3):
            for c in range(3):
                if a != c:
                    keep[30 + 5 * a:35 + 5 * a, 30 + 5 * c:35 + 5 * c] = False
        bt = Batch.from_mask(np.broadcast_to(keep[None, None], (B, 1, T, T)).astype(np.int64), T)
    elif case == "past":
        S = 50
        past = (rng.standard_normal((B, sp.kv_heads, S, sp.head_dim), dtype=np.float32),
                rng.standard_normal((B, sp.kv_heads, S, sp.head_dim), dtype=np.float32))
        pm = np.ones((B, S + T), np.int64)
        pm[1, :20] = 0  # a row whose cache starts with padding
        bt = Batch.from_mask(pm, T, past=S)
    else:
        bt = Batch.from_mask(mask, T)
        if case == "prefix":
            prefix = (rng.standard_normal((sp.kv_heads, 70, sp.head_dim), dtype=np.float32),
                      rng.standard_normal((sp.kv_heads, 70, sp.head_dim), dtype=np.float32))
    plan = bt.attention_plan(forward_mod.ATTENTION_ROWS // sp.group, B * sp.heads, prefix[0].shape[1] if prefix else 0)
    assert len(plan) > 5 and max(len(blocks) for _, _, blocks, _ in plan) >= 3  # several query and key blocks
    assert any(not masked for _, _, blocks, _ in plan for _, _, masked in blocks)  # keys every query sees: no mask
    got = run_attention(sp, q, k, v, bt, past, prefix)
    keep = bt.bias() > MASKED
    want = reference(q, k, v, keep, sp.head_dim ** -0.5, past, prefix)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=2e-6, rtol=1e-5)


def test_the_plan_skips_what_no_query_sees_and_masks_only_the_diagonal(monkeypatch):
    monkeypatch.setattr(batch_mod, "BLOCK_SCORES", 16 * 16)
    monkeypatch.setattr(batch_mod, "KEY_BLOCK_STEP", 16)
    bt = Batch.from_mask(np.ones((1, 64), np.int64), 64)
    plan = bt.attention_plan(16, 1)
    assert [(t0, t1) for t0, t1, _, _ in plan] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    # causal: the keys before the block need no mask, the diagonal does, nothing past the block is computed
    assert plan[2][2] == [(0, 16, False), (16, 32, False), (32, 48, True)]
    monkeypatch.setattr(batch_mod, "BLOCK_SCORES", 1 << 20)
    bt = Batch.from_mask(np.ones((1, 64), np.int64), 64)
    assert bt.attention_plan(16, 1)[3][2] == [(0, 48, False), (48, 64, True)]  # it fits: before and diagonal
    padded = np.ones((2, 64), np.int64)
    padded[1, 40:] = 0  # the second row is 40 tokens: past its end, its queries are padding
    bt = Batch.from_mask(padded, 64)
    assert bt.attention_plan(16, 2)[3][2] == [(0, 32, False), (32, 64, True)]  # unmasked runs: multiples of 16


@pytest.mark.parametrize("reuse", ["--prefix-reuse", "--no-prefix-reuse"])
def test_long_prompts_in_small_blocks_equal_the_library_forward(models, tmp_path, small_blocks, reuse, deltas):
    common = ["--model", models["qwen2"], "--lora", models["qwen2_lora"], "--labels", LABELS, "--template",
              SHOTS + "Query: {query}\nAnswer:", "--input", builders.DEMO_QUERIES, "--limit", 6, reuse]
    ours, meta = classify(tmp_path, "ours", *common)
    lib, _ = classify(tmp_path, "lib", *common, env={"PADDLE_SCORER_CPU_FORWARD": "library"})
    assert min(len(r["prompt_token_ids"]) for r in ours) > 60 and meta["model"]["compute"]["forward"] == \
        "paddle-scorer decoder"
    per_token = np.abs(logprobs(ours) - logprobs(lib)) / np.array(
        [[len(t) for t in r["label_token_ids"].values()] for r in ours])
    assert deltas.record(f"nlp env: blocked attention ({reuse}) vs library forward, per label token",
                         per_token.max()) <= 1e-5


def test_generation_over_a_long_cache_in_small_blocks_equals_the_library(models, small_blocks):
    common = ["generate", "--model", models["llama"], "--lora", models["llama_lora"], "--prompt",
              SHOTS + "Query: where can I buy cheap rice\nAnswer:", "--raw", "--max-new-tokens", 8, "--top-k", 3,
              "--json"]
    ours = [x for x in run(*common).stdout.splitlines() if x.startswith("{")]
    lib = [x for x in run(*common, env={"PADDLE_SCORER_CPU_FORWARD": "library"}).stdout.splitlines()
           if x.startswith("{")]
    import json

    a, b = json.loads(ours[0]), json.loads(lib[0])
    assert len(a["prompt_token_ids"]) > 60
    assert [s["token_id"] for s in a["steps"]] == [s["token_id"] for s in b["steps"]]
    assert max(abs(s["logprob"] - t["logprob"]) for s, t in zip(a["steps"], b["steps"])) <= 1e-5
