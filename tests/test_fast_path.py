"""The fast scoring path (one batched forward with multi-token labels packed behind their prompt under
a tree attention mask, LM head only where needed, log-softmax as x - logsumexp) equals plain full
forwards within 1e-5, on Llama and Qwen2; so does the earlier KV-cache variant."""

import numpy as np

from paddle_scorer.backend import Backend, log_softmax
from paddle_scorer.loader import load
from paddle_scorer.runtime import paddle


import pytest


@pytest.mark.parametrize("arch,tails", [("llama", "packed"), ("qwen2", "packed"), ("llama", "kv-cache")])
def test_fast_path_equals_plain_full_forward_teacher_forcing(models, arch, tails):
    loaded = load(models[arch], models[f"{arch}_lora"])
    backend = Backend(loaded.model, pad_id=0)
    backend.tails = tails
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 500, size=n)) for n in (9, 3, 17, 1)]  # ragged: padding and masks matter
    conts = [[[7], [11, 12], [40, 41, 42, 43]], [[7], [5], [300]], [[1, 2, 3], [8]], [[9, 9], [10]]]
    first, results = backend.score(prompts, conts)
    assert backend.forward_calls == (1 if tails == "packed" else 2)  # the whole batch, all labels
    for b, prompt in enumerate(prompts):
        for j, cont in enumerate(conts[b]):
            full = backend.full_logprobs(prompt + cont)
            n = len(prompt)
            expect = [float(full[n - 1 + t, tok]) for t, tok in enumerate(cont)]
            np.testing.assert_allclose(results[b][j].token_logprobs, expect, atol=1e-5)
            greedy = all(int(np.argmax(full[n - 1 + t])) == tok for t, tok in enumerate(cont))
            assert results[b][j].greedy == greedy
        np.testing.assert_allclose(first[b], backend.full_logprobs(prompt)[-1], atol=1e-5)


def test_logsumexp_log_softmax_equals_paddles_kernel_on_wide_rows():
    pd = paddle()
    x = np.random.default_rng(1).normal(0, 8, size=(3, 4000)).astype("float32")
    ours = log_softmax(pd, pd.to_tensor(x)).numpy()
    kernel = pd.nn.functional.log_softmax(pd.to_tensor(x), axis=-1).numpy()
    np.testing.assert_allclose(ours, kernel, atol=1e-5)
    exact = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64) - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    np.testing.assert_allclose(ours, exact, atol=1e-5)
