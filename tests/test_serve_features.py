"""serve for real clients, in process (FastAPI's TestClient over the real app, engine and model): streaming (the
chunks add up to the non-streamed answer), n > 1, /v1/classify (= classify), several adapters on one base (= each
served alone), one request's failure isolated from the others of its batch, prefix reuse across requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

import builders
from paddle_scorer.compute.choose_backend import backend_for
from paddle_scorer.model.loader import load
from paddle_scorer.tasks.classify import Classifier, ClassifyOptions
from paddle_scorer.serve.app import create_app
from paddle_scorer.serve.service import ServeOptions, Service

SCORER = builders.DEMO_SCORER
TEMPLATE, LABELS = SCORER["template"], SCORER["labels"]
QUERIES = builders.demo_queries(8)
ATOL = 1e-5


@pytest.fixture(scope="module")
def demo():
    return load(builders.DEMO_BASE, builders.DEMO_LORA, device="cpu")


def client_of(loaded, backend=None, **opts):
    service = Service(loaded, backend or backend_for(loaded), ServeOptions(model_name="demo-lora", **opts))
    return TestClient(create_app(service), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(demo):
    with client_of(demo) as c:
        yield c


@pytest.fixture(scope="module")
def chat_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    builders.copy_tokenizer(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}Answer:{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with client_of(load(builders.DEMO_BASE, builders.DEMO_LORA, device="cpu", tokenizer=folder)) as c:
        yield c


def post(client, path, **body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(client, path, **body) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    out = []
    for block in raw.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    assert out[-1] == "[DONE]"
    return out[:-1]


def prompt_of(q):
    return TEMPLATE.format(query=q["query"])


@pytest.mark.parametrize("body", [
    dict(max_tokens=12, temperature=0, logprobs=2),
    dict(max_tokens=12, temperature=1.1, seed=7, logprobs=1, stop=["e ", "\n"]),  # a stop string across chunks
    dict(max_tokens=6, temperature=0, logprobs=1, echo=True),
    dict(max_tokens=8, temperature=0.9, seed=3, n=3, logprobs=1),
])
def test_streamed_completion_adds_up_to_the_plain_answer(client, body):
    prompts = [prompt_of(q) for q in QUERIES[:2]]
    plain = post(client, "/v1/completions", prompt=prompts, **body)
    chunks = events(client, "/v1/completions", prompt=prompts, stream=True, stream_options={"include_usage": True},
                    **body)
    assert all(c["object"] == "text_completion" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    for ch in plain["choices"]:
        parts = [x for c in chunks[:-1] for x in c["choices"] if x["index"] == ch["index"]]
        assert "".join(p["text"] for p in parts) == ch["text"]
        assert [p["finish_reason"] for p in parts if p["finish_reason"]] == [ch["finish_reason"]]
        got = {k: [v for p in parts if p["logprobs"] for v in p["logprobs"][k]] for k in ch["logprobs"]}
        assert got["tokens"] == ch["logprobs"]["tokens"] and got["text_offset"] == ch["logprobs"]["text_offset"]
        a = [np.nan if v is None else v for v in got["token_logprobs"]]
        b = [np.nan if v is None else v for v in ch["logprobs"]["token_logprobs"]]
        np.testing.assert_allclose(a, b, atol=ATOL)
        assert got["top_logprobs"] == ch["logprobs"]["top_logprobs"] or len(got["top_logprobs"]) == len(
            ch["logprobs"]["top_logprobs"])


def test_n_samples_are_independent_and_reproducible(client):
    body = dict(prompt="the price of", max_tokens=10, temperature=2.0, seed=11, n=4)
    a, b = post(client, "/v1/completions", **body), post(client, "/v1/completions", **body)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    assert len({c["text"] for c in a["choices"]}) > 1  # independent samples
    one = post(client, "/v1/completions", **{**body, "n": 1})
    assert one["choices"][0]["text"] == a["choices"][0]["text"]  # sample 0 is the n=1 answer
    two = post(client, "/v1/completions", prompt=[body["prompt"]] * 2, max_tokens=3, temperature=0, n=2)
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3] and two["usage"]["prompt_tokens"] == 2 * len(
        client.post("/tokenize", json={"prompt": body["prompt"]}).json()["tokens"])


def test_streamed_chat_adds_up_to_the_plain_answer(chat_client):
    msgs = [{"role": "user", "content": "Query: what is the price of cabbage today?"}]
    body = dict(messages=msgs, max_tokens=8, temperature=0.8, seed=5, logprobs=True, top_logprobs=2, n=2)
    plain = post(chat_client, "/v1/chat/completions", **body)
    chunks = events(chat_client, "/v1/chat/completions", stream=True, **body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for ch in plain["choices"]:
        parts = [x for c in chunks for x in c["choices"] if x["index"] == ch["index"]]
        assert parts[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(p["delta"].get("content", "") for p in parts) == ch["message"]["content"]
        entries = [e for p in parts if p["logprobs"] for e in p["logprobs"]["content"]]
        assert [e["token"] for e in entries] == [e["token"] for e in ch["logprobs"]["content"]]
        assert parts[-1]["finish_reason"] == ch["finish_reason"]


def test_classify_route_equals_classify(demo, client):
    records = [{"id": q["id"], "query": q["query"]} for q in QUERIES]
    for calibration in ("none", "contextual"):
        got = post(client, "/v1/classify", labels=LABELS, records=records, template=TEMPLATE, calibration=calibration)
        clf = Classifier(demo, ClassifyOptions(labels=LABELS, template=TEMPLATE, calibration=calibration))
        clf.calibrate()
        want = clf.score([clf.prepare(r, r["id"], r["id"]) for r in records])
        assert got["object"] == "classification" and got["calibration"]["method"] == calibration
        for g, w in zip(got["data"], want, strict=True):
            assert g["id"] == w["id"] and g["prediction"] == w["prediction"]
            assert g["label_token_ids"] == w["label_token_ids"] and g["is_greedy"] == w["is_greedy"]
            for lab in LABELS:
                assert abs(g["probs"][lab] - w["probs"][lab]) <= 1e-6
                assert abs(g["logprobs"][lab] - w["logprobs"][lab]) <= 1e-6
    one = post(client, "/v1/classify", labels="goods,life", prompt="what is the price of cabbage today?")
    assert len(one["data"]) == 1 and set(one["data"][0]["probs"]) == {"goods", "life"}
    for bad, param in (({"labels": ["goods"], "prompt": "x"}, "labels"), ({"labels": LABELS}, "prompt"),
                       ({"labels": LABELS, "records": [{"q": 1}]}, "template"),
                       ({"labels": LABELS, "prompt": "x", "calibration": "magic"}, "calibration"),
                       ({"labels": LABELS, "prompt": "x", "calibration": "contextual", "content_free": []},
                        "content_free"),
                       ({"labels": [f"w{i}" for i in range(1025)], "prompt": "x"}, "labels")):
        r = client.post("/v1/classify", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_thousand_labels_cost_rows_not_the_square_of_a_row(client):
    """Round 4: 2,000 one-word labels packed in one row held the engine for 20-29 s (attention grows with the square
    of a row). A prompt's labels are cut into rows of at most packing.LABEL_ROW_TOKENS tokens; the scores equal those
    of the labels asked a few at a time."""
    from paddle_scorer.compute import packing

    words = [f"label{i} thing" for i in range(300)]  # several tokens each: far more than one row's worth
    got = post(client, "/v1/classify", labels=words, prompt="what is the price of cabbage today?")["data"][0]
    assert sum(len(t) - 1 for t in got["label_token_ids"].values()) > 2 * packing.LABEL_ROW_TOKENS
    for part in (words[:2], words[150:153], words[-2:]):
        few = post(client, "/v1/classify", labels=part, prompt="what is the price of cabbage today?")["data"][0]
        for lab in part:
            assert abs(few["logprobs"][lab] - got["logprobs"][lab]) <= 1e-5
    rows = packing.label_rows([[0] * 4] * 300)
    assert len(rows) == -(-300 * 3 // packing.LABEL_ROW_TOKENS) and all(len(r) * 3 <= packing.LABEL_ROW_TOKENS
                                                                        for r in rows)


def test_several_adapters_on_one_base_equal_each_served_alone(models):
    from paddle_scorer.serve.models import serve_models
    from paddle_scorer.tasks.loading import LoadOptions

    adapters = [("one", models["llama_lora"]), ("two", models["llama_rslora"])]
    served = serve_models(LoadOptions(models["llama"], device="cpu"), adapters, model_name="base",
                          prefix_cache=1 << 26, prefix_reuse=True)
    base, backends, dirs = served.loaded, served.backends, served.adapter_dirs
    service = Service(base, None, ServeOptions(model_name="base", adapters=dirs), backends=backends)
    body = dict(prompt=prompt_of(QUERIES[1]), max_tokens=5, temperature=0, echo=True, logprobs=2)
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "one", "two"]
        got = {name: post(c, "/v1/completions", model=name, **body)["choices"][0] for name in ("base", "one", "two")}
        assert c.post("/v1/completions", json={**body, "model": "three"}).status_code == 404
    for name, lora in (("base", None), ("one", models["llama_lora"]), ("two", models["llama_rslora"])):
        with client_of(load(models["llama"], lora, device="cpu")) as alone:
            want = post(alone, "/v1/completions", **body)["choices"][0]
        assert got[name]["text"] == want["text"]
        np.testing.assert_allclose(got[name]["logprobs"]["token_logprobs"][1:], want["logprobs"]["token_logprobs"][1:],
                                   atol=ATOL)
    assert got["one"]["logprobs"]["token_logprobs"] != got["two"]["logprobs"]["token_logprobs"]


class FailsOnOnePrompt:
    """A backend that fails any batch holding one poisoned token, like a request whose values break a forward."""

    POISON = 7

    def __init__(self, backend):
        self._b = backend

    def __getattr__(self, name):
        return getattr(self._b, name)

    def sequence_logprobs_cached(self, seqs, top_n=0):
        if any(self.POISON in s for s in seqs):
            raise FloatingPointError("the model produced a non-finite log-probability (NaN or inf)")
        return self._b.sequence_logprobs_cached(seqs, top_n)


def test_one_bad_request_fails_alone(demo):
    import concurrent.futures

    with client_of(demo, FailsOnOnePrompt(backend_for(demo)), window_ms=300, max_batch=64) as c:
        good = [dict(prompt=[[5, 6, 8 + i, 9]], max_tokens=0, echo=True, logprobs=1) for i in range(6)]
        bad = dict(prompt=[[5, FailsOnOnePrompt.POISON, 9]], max_tokens=0, echo=True, logprobs=1)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # arrive within one batch window
            futs = [pool.submit(c.post, "/v1/completions", json=b) for b in [*good[:3], bad, *good[3:]]]
            codes = [f.result().status_code for f in futs]
        assert codes == [200, 200, 200, 500, 200, 200, 200]
        stats = c.get("/health").json()["engine"]
        assert stats["failed_requests"] == 1


def test_a_shared_context_is_computed_once_across_requests(client):
    """lm-eval sends one request per choice with the same context: the second reuses the first's prefix."""
    context = "".join(prompt_of(q) + " goods\n" for q in QUERIES[:4]) + prompt_of(QUERIES[4])
    ids = client.post("/tokenize", json={"prompt": context}).json()["tokens"]
    first = post(client, "/v1/completions", prompt=[ids + [258]], max_tokens=0, echo=True, logprobs=1)
    second = post(client, "/v1/completions", prompt=[ids + [263]], max_tokens=0, echo=True, logprobs=1)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(ids) - 1
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < len(ids) - 1
    a, b = first["choices"][0]["logprobs"], second["choices"][0]["logprobs"]
    np.testing.assert_allclose(a["token_logprobs"][1:len(ids)], b["token_logprobs"][1:len(ids)], atol=ATOL)
    assert a["top_logprobs"][1:len(ids)] == b["top_logprobs"][1:len(ids)]


class Broken(FailsOnOnePrompt):
    def sequence_logprobs_cached(self, seqs, top_n=0):
        raise RuntimeError("boom")


def test_a_500_is_logged_with_its_traceback(demo, caplog):
    import logging

    with caplog.at_level(logging.ERROR, logger="paddle_scorer.serve"), client_of(demo, Broken(backend_for(demo))) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 500 and "logged it" in r.json()["error"]["message"] and "Traceback" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert logged and any("boom" in str(rec.exc_info[1]) for rec in logged)
