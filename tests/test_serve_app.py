"""serve, in process (FastAPI TestClient): the completions contract lm-eval relies on, checked against
classify, generate and plain forwards; batching; chat; tokenizer routes; errors; auth."""

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

import builders
from paddle_scorer.compute.choose_backend import backend_for
from paddle_scorer.tasks.generate import GenerateOptions, Generator
from paddle_scorer.model.loader import load
from paddle_scorer.tasks.classify import Classifier, ClassifyOptions
from paddle_scorer.serve.app import create_app
from paddle_scorer.serve.engine import GenSpec, Work
from paddle_scorer.serve.protocol import Sampling
from paddle_scorer.serve.service import ServeOptions, Service

SCORER = builders.DEMO_SCORER
TEMPLATE, LABELS = SCORER["template"], SCORER["labels"]
QUERIES = builders.demo_queries(12)
ATOL = 1e-5


@pytest.fixture(scope="module")
def demo():
    return load(builders.DEMO_BASE, builders.DEMO_LORA, device="cpu")


def make_client(loaded, backend=None, api_key=None, **opts):
    service = Service(loaded, backend or backend_for(loaded), ServeOptions(model_name="demo-lora", **opts))
    return TestClient(create_app(service, api_key=api_key), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(demo):
    with make_client(demo) as c:
        yield c


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def prompt_of(q):
    return TEMPLATE.format(query=q["query"])


def test_lm_eval_scoring_request_matches_classify(demo, client):
    """lm-eval's loglikelihood request (token ids of context + continuation, max_tokens 1, echo, logprobs 1)
    gives, at token_logprobs[ctxlen:-1], classify's log P(label | prompt)."""
    clf = Classifier(demo, ClassifyOptions(labels=LABELS, template=TEMPLATE))
    preps = [clf.prepare(q, q["id"], q["id"]) for q in QUERIES]
    recs = clf.score(preps)
    tok = lambda text: client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    for q, prep, rec in zip(QUERIES, preps, recs):
        for label in LABELS:
            ctx_text, cont_text = prompt_of(q), " " + label  # lm-eval: doc_to_text, target_delimiter + choice
            whole, ctx = tok(ctx_text + cont_text), tok(ctx_text)
            assert ctx == prep.context and whole[len(ctx):] == prep.label_ids[LABELS.index(label)]
            out = complete(client, prompt=[whole], max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234)
            lp = out["choices"][0]["logprobs"]
            assert len(lp["token_logprobs"]) == len(whole) + 1  # the prompt AND the generated token
            value = sum(lp["token_logprobs"][len(ctx):-1])
            assert value == pytest.approx(rec["logprobs"][label], abs=ATOL)
            greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx):-1],
                                                                  lp["top_logprobs"][len(ctx):-1]))
            assert greedy == rec["is_greedy"][label]


def test_echo_logprobs_shape_offsets_and_bit_identical_top(client, demo):
    text = prompt_of(QUERIES[0])
    ids = demo.tokenizer(text)["input_ids"]
    full = builders.plain_logprobs(demo, ids)
    out = complete(client, prompt=text, max_tokens=3, echo=True, logprobs=3, temperature=0)
    ch = out["choices"][0]
    lp = ch["logprobs"]
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) > n and ch["text"].startswith(text)
    for i, (t, off) in enumerate(zip(lp["tokens"], lp["text_offset"])):
        if i < n or off < len(ch["text"]):
            assert ch["text"][off:off + len(t)] == t
    for i in range(1, n):
        assert lp["token_logprobs"][i] == pytest.approx(full[i - 1, ids[i]], abs=ATOL)
        top = lp["top_logprobs"][i]
        assert lp["token_logprobs"][i] in top.values()  # the very same float, not a near copy
        assert len(top) <= 4 and list(top.values()) == sorted(top.values(), reverse=True)[:len(top)] or len(top) == 4
    gen = lp["token_logprobs"][n:]
    assert len(gen) == out["usage"]["completion_tokens"] and all(v in top.values() for v, top in zip(gen, lp["top_logprobs"][n:]))
    assert out["usage"]["prompt_tokens"] == n


def test_max_tokens_zero_echoes_the_prompt_only(client, demo):
    ids = demo.tokenizer("what is the price of cabbage today?")["input_ids"]
    out = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    ch = out["choices"][0]
    assert len(ch["logprobs"]["token_logprobs"]) == len(ids) and ch["text"] == "what is the price of cabbage today?"
    assert all(len(t) == 1 for t in ch["logprobs"]["top_logprobs"][1:])  # logprobs 0: just the token itself
    assert out["usage"]["completion_tokens"] == 0
    plain = complete(client, prompt="hello", max_tokens=0)
    assert plain["choices"][0]["text"] == "" and plain["choices"][0]["logprobs"] is None


def test_token_id_prompts_are_used_as_given(client, demo):
    ids = demo.tokenizer("goods or life")["input_ids"]
    a = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
    b = complete(client, prompt=[demo.tokenizer.bos_token_id] + ids, max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
    assert len(a["tokens"]) == len(ids) and len(b["tokens"]) == len(ids) + 1 and b["tokens"][0] == "<s>"
    assert a["token_logprobs"][1] != pytest.approx(b["token_logprobs"][2], abs=1e-3)  # BOS changes the scores


def test_text_prompts_follow_classifys_special_token_rule(client, demo):
    text = "what is the price of cabbage today?"
    with_special = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert with_special == demo.tokenizer(text, add_special_tokens=True)["input_ids"]
    out = complete(client, prompt=text, max_tokens=0, echo=True, logprobs=0)
    assert out["usage"]["prompt_tokens"] == len(with_special)


def test_greedy_generation_equals_generate(client, demo):
    gen = Generator(demo, GenerateOptions(max_new_tokens=6, top_k=2))
    for q in QUERIES[:3]:
        ids = demo.tokenizer(prompt_of(q))["input_ids"]
        rec = gen.generate(q["id"], prompt_of(q), ids)
        ch = complete(client, prompt=prompt_of(q), max_tokens=6, temperature=0, logprobs=2)["choices"][0]
        assert ch["text"] == rec["text"] and ch["finish_reason"] == "stop"  # the demo answers, then EOS
        assert ch["logprobs"]["token_logprobs"] == pytest.approx([s["logprob"] for s in rec["steps"]], abs=ATOL)
        assert ch["logprobs"]["tokens"][-1] == "</s>" and ch["logprobs"]["text_offset"][-1] == len(ch["text"])


def test_seeded_sampling_equals_generate_sample_and_is_reproducible(client, demo):
    prompt = "how do I"
    ids = demo.tokenizer(prompt)["input_ids"]
    rec = Generator(demo, GenerateOptions(max_new_tokens=8, sample=True, temperature=1.5, seed=7,
                                          stop_at_eos=True)).generate(0, prompt, ids)
    body = dict(prompt=prompt, max_tokens=8, temperature=1.5, seed=7, logprobs=0)
    a, b = complete(client, **body), complete(client, **body)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == rec["text"]
    c = complete(client, **{**body, "seed": 8})
    d = complete(client, **{**body, "seed": 9})
    assert len({a["choices"][0]["text"], c["choices"][0]["text"], d["choices"][0]["text"]}) > 1


def test_stop_strings_are_applied_by_the_server(client):
    base = dict(prompt="what is the price of", max_tokens=12, temperature=0, logprobs=1)
    free = complete(client, **base)["choices"][0]
    text = free["text"]
    assert len(text) > 3
    stop = text[2:4]
    ch = complete(client, **base, stop=["zzz", stop])["choices"][0]
    assert ch["text"] == text[: text.index(stop)] and ch["finish_reason"] == "stop"
    assert all(o < len(ch["text"]) for o in ch["logprobs"]["text_offset"])
    assert len(ch["logprobs"]["tokens"]) <= len(free["logprobs"]["tokens"])
    lim = complete(client, prompt="what is the price of", max_tokens=1, temperature=0)["choices"][0]
    assert lim["finish_reason"] in ("length", "stop")


def test_several_prompts_in_one_request_equal_each_alone(client):
    prompts = [prompt_of(q) for q in QUERIES[:4]]
    together = complete(client, prompt=prompts, max_tokens=4, temperature=0, echo=True, logprobs=2)
    assert [c["index"] for c in together["choices"]] == [0, 1, 2, 3]
    for p, ch in zip(prompts, together["choices"]):
        alone = complete(client, prompt=p, max_tokens=4, temperature=0, echo=True, logprobs=2)["choices"][0]
        assert ch["text"] == alone["text"] and ch["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        np.testing.assert_allclose(ch["logprobs"]["token_logprobs"][1:], alone["logprobs"]["token_logprobs"][1:], atol=ATOL)


def test_engine_batches_concurrent_requests_and_answers_equal_alone(demo):
    service = Service(demo, backend_for(demo), ServeOptions(model_name="demo", max_batch=8, window_ms=20))
    works = []
    for i, q in enumerate(QUERIES[:10]):
        ids = demo.tokenizer(prompt_of(q))["input_ids"]
        if i % 3 == 0:
            works.append(Work(ids + [279], score_top=1, gen=GenSpec(1, Sampling(0.0), (), 1)))  # lm-eval scoring
        elif i % 3 == 1:
            works.append(Work(ids, gen=GenSpec(5, Sampling(0.0), ("\n",), 2)))  # greedy generation
        else:
            works.append(Work(ids[:-3], gen=GenSpec(6, Sampling(1.2, 0.9, i), (), 0)))  # seeded sampling
    service.engine.start()
    try:
        alone = [asyncio.run(service.engine.run([w]))[0] for w in works]

        async def together():
            return await asyncio.gather(*(service.engine.run([w]) for w in works))

        batched = [r[0] for r in asyncio.run(together())]
    finally:
        service.engine.stop()
    assert service.engine.stats["largest_score_pass"] > 1 and service.engine.stats["largest_decode_step"] > 1
    for a, b in zip(alone, batched):
        if a.scored is not None:
            np.testing.assert_allclose(a.scored.token_logprobs[1:], b.scored.token_logprobs[1:], atol=ATOL)
        assert a.generation.ids == b.generation.ids and a.generation.text == b.generation.text
        np.testing.assert_allclose(a.generation.logprobs, b.generation.logprobs, atol=ATOL)


class NoBatchedDecode:
    """A backend without decode_start/decode_step: the engine decodes one sequence at a time."""

    def __init__(self, backend):
        self._b = backend

    def __getattr__(self, name):
        if name in ("sequence_logprobs", "next_token_logprobs", "start", "step"):
            return getattr(self._b, name)
        raise AttributeError(name)


def test_sequential_fallback_gives_the_same_answers(demo, client):
    with make_client(demo, backend=NoBatchedDecode(backend_for(demo))) as slow:
        assert slow.get("/health").json()["batched_decode"] is False
        body = dict(prompt=[prompt_of(q) for q in QUERIES[:3]], max_tokens=5, temperature=0, logprobs=1)
        a, b = complete(client, **body), complete(slow, **body)
    for x, y in zip(a["choices"], b["choices"]):
        assert x["text"] == y["text"]
        np.testing.assert_allclose(x["logprobs"]["token_logprobs"], y["logprobs"]["token_logprobs"], atol=ATOL)


BAD = [
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2049}, 400),
    ("/v1/completions", {"prompt": [[1, 2], [600]]}, 400),
    ("/v1/completions", {"prompt": "word " * 300, "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "x", "temperature": 1e-320}, 400),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400),  # a lone surrogate (raw JSON: clients cannot encode it)
    ("/tokenize", b'{"prompt": "a\\ud800b"}', 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e400}', 400),  # beyond a float: inf
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),  # nested 100k deep
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400),  # no chat template
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/tokenize", {"prompt": 5}, 400),
    ("/detokenize", {"tokens": ["a"]}, 400),
    ("/detokenize", {"tokens": [99999]}, 400),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_serving(client, path, body, status):
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    assert complete(client, prompt="hi", max_tokens=1, temperature=0)["choices"][0]["index"] == 0


def test_http_level_errors(demo, client):
    assert client.post("/v1/completions", content=b"{not json").status_code == 400
    assert client.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}').status_code == 400
    assert client.post("/v1/completions", content=b"[]").status_code == 400
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for route in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
                  "POST /tokenize", "POST /detokenize", "GET /tokenizer_info"):  # the list is built from the app
        assert route in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/v1/models/other").status_code == 404
    with make_client(demo, max_body_bytes=2048) as small:
        r = small.post("/v1/completions", json={"prompt": "x" * 3000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert small.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


class Exploding(NoBatchedDecode):
    def sequence_logprobs(self, seqs, top_n=0):
        raise RuntimeError("boom")


def test_a_failing_forward_is_a_500_without_traceback_and_the_server_keeps_serving(demo):
    with make_client(demo, backend=Exploding(backend_for(demo))) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0}).status_code == 200
        assert c.get("/health").json()["engine"]["failed_batches"] == 1


def test_api_key(demo):
    with make_client(demo, api_key="s3cret") as c:
        assert c.get("/health").status_code == 200  # open for probes
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.post("/tokenize", json={"prompt": "x"}, headers=headers).status_code == 401
            assert c.get("/no/such/route", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=ok).status_code == 200


def test_models_health_and_tokenizer_routes(client, demo):
    models = client.get("/v1/models").json()
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == "demo-lora" and card["max_model_len"] == 256
    facts = card["paddle_scorer"]["model"]
    assert facts["adapter_sha256"] == demo.facts.adapter_sha256 and facts["policy"]["dtype"] == "float32"
    assert client.get("/v1/models/demo-lora").json()["id"] == "demo-lora"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["batched_decode"] is True
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["chat_template"] is None
    assert client.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [2]
    ids = client.post("/tokenize", json={"prompt": "héllo, 你好"}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "héllo, 你好"
    assert client.post("/detokenize", json={"tokens": []}).json()["prompt"] == ""


@pytest.fixture(scope="module")
def chat_loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    builders.copy_tokenizer(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}Answer:{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load(builders.DEMO_BASE, builders.DEMO_LORA, device="cpu", tokenizer=folder)


def test_chat_uses_the_tokenizers_template(chat_loaded):
    with make_client(chat_loaded) as c:
        assert "messages" in c.get("/tokenizer_info").json()["chat_template"]
        msgs = [{"role": "user", "content": "Query: what is the price of cabbage today?"}]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0,
                                                 "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        ch = out["choices"][0]
        assert out["object"] == "chat.completion" and ch["message"]["role"] == "assistant"
        prompt = "user: Query: what is the price of cabbage today?\nAnswer:"
        ids = chat_loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        same = c.post("/v1/completions", json={"prompt": [ids], "max_tokens": 4, "temperature": 0, "logprobs": 2}).json()
        assert ch["message"]["content"] == same["choices"][0]["text"] and out["usage"]["prompt_tokens"] == len(ids)
        content = ch["logprobs"]["content"]
        assert [e["logprob"] for e in content] == pytest.approx(same["choices"][0]["logprobs"]["token_logprobs"], abs=ATOL)
        assert all(len(e["top_logprobs"]) == 2 and e["bytes"] == list(e["token"].encode()) for e in content)
        default = c.post("/v1/chat/completions", json={"messages": msgs, "temperature": 0}).json()
        assert ch["finish_reason"] == "length" and default["choices"][0]["finish_reason"] == "stop"  # no cap: up to EOS
        assert default["choices"][0]["message"]["content"].startswith(ch["message"]["content"])


@pytest.mark.parametrize("base, lora", [("llama", "llama_lora"), ("qwen2", "qwen2_lora")])
def test_batched_decoding_equals_one_sequence_at_a_time(models, base, lora):
    """Backend.decode_start/step/keep (right-padded prompts, one KV cache) against start/step per sequence."""
    loaded = load(models[base], models[lora], device="cpu")
    b = backend_for(loaded)
    prompts = [loaded.tokenizer(t)["input_ids"] for t in ("what is the price of cabbage", "hi", "how do I renew it?")]
    steps = 5
    ref = []
    for p in prompts:
        lp, state = b.start(p)
        rows, toks = [lp], []
        for _ in range(steps):
            toks.append(int(np.argmax(lp)))
            lp, state = b.step(toks[-1], state)
            rows.append(lp)
        ref.append((toks, rows))
    lp, state = b.decode_start(prompts)
    live = [0, 1, 2]
    for i in range(steps + 1):
        for r, k in enumerate(live):
            np.testing.assert_allclose(lp[r], ref[k][1][i], atol=ATOL, rtol=1e-6)
        if i == steps:
            break
        if i == 2:  # the middle sequence finishes: its row leaves the cache
            state, live, lp = b.decode_keep(state, [0, 2]), [0, 2], lp[[0, 2]]
        lp, state = b.decode_step([ref[k][0][i] for k in live], state)
