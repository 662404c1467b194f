"""serve as a real process, used the way chat UIs, SDKs and hostile clients use it: the openai SDK streaming,
/health answering while big requests are tokenized and answered, a client that goes away, start-up refusals,
logging, and a bounded load test (>= 32 concurrent clients, mixed and hostile requests)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest

import builders
from test_serve_server import QUERIES, SCORER, Server, env

REPO = builders.REPO


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "32").wait()
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def prompt_of(q: str) -> str:
    return SCORER["template"].format(query=q)


def test_openai_sdk_streaming_equals_the_plain_answer(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    body = dict(model="demo-lora", prompt="the price of", max_tokens=12, temperature=1.2, seed=4, logprobs=1,
                stop=[" e"])
    plain = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == plain.choices[0].logprobs.tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]


def _health_latencies(url: str, seconds: float, stop: threading.Event) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as c:
        end = time.time() + seconds
        while time.time() < end and not stop.is_set():
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            out.append(time.perf_counter() - t)
            time.sleep(0.02)
    return out


def test_health_answers_while_a_huge_prompt_is_tokenized_and_a_huge_answer_built(server):
    stop = threading.Event()
    lat: list = []
    t = threading.Thread(target=lambda: lat.extend(_health_latencies(server.url, 30, stop)))
    t.start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/tokenize", json={"prompt": "a" * 500_000})  # one 500 KB word
            assert r.status_code == 200
            ids = [5 + (i % 200) for i in range(250)]
            r = c.post("/v1/completions", json={"prompt": [ids] * 64, "max_tokens": 0, "echo": True, "logprobs": 20})
            assert r.status_code == 200 and len(r.content) > 1_000_000
    finally:
        stop.set()
        t.join()
    assert len(lat) >= 10 and max(lat) < 0.5 and np.percentile(lat, 99) < 0.1, sorted(lat)[-5:]


def test_a_client_that_goes_away_is_cancelled(server):
    prompts = [q["query"] for q in QUERIES[:64]]  # untemplated, hot: ~4,000 tokens, ~5 s of decoding when left running
    try:
        httpx.post(server.url + "/v1/completions", json={"prompt": prompts, "max_tokens": 200, "temperature": 2.0,
                                                          "seed": 1}, timeout=0.6)
    except httpx.TimeoutException:
        pass
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=60)
    waited = time.perf_counter() - t0
    assert r.status_code == 200
    stats = httpx.get(server.url + "/health").json()["engine"]
    assert stats["cancelled_requests"] >= 1 and waited < 2.5, (waited, stats)


class BareServer(Server):
    """A server with only the given --model/--lora (the Server helper always adds the demo's)."""

    def __init__(self, *args):
        cmd = [sys.executable, "-m", "paddle_scorer", "serve", "--port", "0", "--device", "cpu", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.url = None
        self.lines = []


def test_several_adapters_and_the_startup_refusals(models, tmp_path):
    s = BareServer("--model", str(models["llama"]), "--lora", f"one={models['llama_lora']}", "--lora",
                   f"two={models['llama_rslora']}", "--model-name", "base").wait()
    try:
        got = httpx.get(s.url + "/v1/models").json()
        assert [m["id"] for m in got["data"]] == ["base", "one", "two"]
        r = httpx.post(s.url + "/v1/completions", json={"model": "two", "prompt": "a b", "max_tokens": 2,
                                                       "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "two"
    finally:
        s.proc.kill()
        s.proc.wait()
    for args, words in (
        (["--model", str(models["llama"]), "--lora", f"bad={models['qwen2_lora']}"], "adapter"),
        (["--api-key", ""], "--api-key is empty"),
        (["--lora", f"x={builders.DEMO_LORA}", "--lora", f"x={builders.DEMO_LORA}"], "given to two adapters"),
        # round 4: bare numbers were read as gigabytes (a 1 PiB body limit, a 512 GiB cache on a 24 GB machine)
        (["--max-body", "1048576"], "--max-body '1048576' has no unit"),
        (["--prefix-cache", "512"], "--prefix-cache '512' has no unit"),
        (["--prefix-cache", "512TB"], "more than the memory budget leaves after the model"),
    ):
        cmd = [sys.executable, "-m", "paddle_scorer", "serve", "--port", "0", "--device", "cpu", "--model",
               str(builders.DEMO_BASE), *args]
        p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
        lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert p.returncode != 0 and len(lines) == 1 and words in lines[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr


def test_warnings_and_failures_reach_stderr(tmp_path):
    s = Server().wait()
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "frobnicate": 3}, timeout=60)
        assert r.status_code == 200
    finally:
        code, err = s.stop(2)  # SIGINT
    assert "frobnicate" in err and "WARNING" in err


# ------------------------------------------------------------------------------------------------ load test

N_CLIENTS = 36
LOAD_SECONDS = 20


def _mixed(i: int) -> tuple[str, dict, bool]:
    """Request ``i`` of the mix: (route, body, valid). Every 9th is hostile."""
    i %= 36  # the mix repeats every 36 requests (what "alone" records)
    q = QUERIES[i]["query"]
    kind = i % 9
    if kind == 8:
        bad = [{"prompt": "x", "temperature": 1e-320}, {"prompt": "x", "n": 99}, {"prompt": ""},
               {"prompt": [[1, 2], [99999]]}][i % 4]
        return "/v1/completions", bad, False
    if kind in (0, 1):
        return "/v1/completions", {"prompt": prompt_of(q) + " goods", "max_tokens": 0, "echo": True, "logprobs": 1}, True
    if kind in (2, 3):
        return "/v1/completions", {"prompt": q, "max_tokens": 8, "temperature": 0.8, "seed": i, "logprobs": 1}, True
    if kind in (4, 5):
        return "/v1/completions", {"prompt": prompt_of(q), "max_tokens": 6, "temperature": 0, "stream": True}, True
    return "/v1/classify", {"labels": SCORER["labels"], "prompt": q}, True


def _send(c: httpx.Client, route: str, body: dict):
    if body.get("stream"):
        with c.stream("POST", route, json=body) as r:
            text = "".join(r.iter_text())
        chunks = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
        return r.status_code, "".join(x["text"] for ch in chunks for x in ch.get("choices", []))
    r = c.post(route, json=body)
    return r.status_code, r.json()


def _comparable(route, body, result):
    if body.get("stream") or isinstance(result, str):
        return result
    if route == "/v1/classify":
        return [d["prediction"] for d in result["data"]], [d["probs"][SCORER["labels"][0]] for d in result["data"]]
    ch = result["choices"][0]
    return ch["text"], [np.nan if v is None else v for v in (ch["logprobs"] or {}).get("token_logprobs", [])]


def _same(a, b) -> bool:
    """Equal text (or predictions) and numbers within float32 batching noise."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a[0] == b[0] and len(a[1]) == len(b[1]) and np.allclose(a[1], b[1], atol=1e-5, equal_nan=True)


def test_load_many_clients_mixed_and_hostile(server, tmp_path):
    proc = psutil.Process(server.proc.pid)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        alone = {}
        for i in range(9 * 4):
            route, body, valid = _mixed(i)
            if valid:
                code, res = _send(c, route, body)
                assert code == 200
                alone[i % 36] = _comparable(route, body, res)
        time.sleep(0.5)
        rss_before = proc.memory_info().rss
    results: list = []
    latency: list = []
    stop = threading.Event()
    end = time.time() + LOAD_SECONDS

    def worker(k: int):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            i = k
            while time.time() < end:
                route, body, valid = _mixed(i)
                t = time.perf_counter()
                code, res = _send(c, route, body)
                results.append((i % 36, route, body, valid, code, res, time.perf_counter() - t))
                i += N_CLIENTS + 1  # 37: each client goes through every kind of request

    health: list = []
    h = threading.Thread(target=lambda: health.extend(_health_latencies(server.url, LOAD_SECONDS, stop)))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_CLIENTS)]
    t0 = time.time()
    h.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    h.join()
    wall = time.time() - t0
    valid = [r for r in results if r[3]]
    hostile = [r for r in results if not r[3]]
    assert all(r[4] == 200 for r in valid), [r[4] for r in valid if r[4] != 200][:5]
    assert hostile and all(400 <= r[4] < 500 for r in hostile)
    for i, route, body, _, _, res, _ in valid:
        assert _same(_comparable(route, body, res), alone[i]), (route, body)
    latency = [r[6] for r in valid]
    assert np.percentile(health, 99) < 0.1, sorted(health)[-5:]
    time.sleep(1.0)
    rss_after = proc.memory_info().rss
    assert rss_after < rss_before * 1.25 + 64 * 2**20, (rss_before, rss_after)
    summary = {"clients": N_CLIENTS, "seconds": round(wall, 1), "requests": len(results), "valid": len(valid),
               "hostile": len(hostile), "requests_per_s": round(len(results) / wall, 2),
               "p50_s": round(statistics.median(latency), 3), "p99_s": round(float(np.percentile(latency, 99)), 3),
               "health_p50_ms": round(1000 * statistics.median(health), 1),
               "health_p99_ms": round(1000 * float(np.percentile(health, 99)), 1),
               "rss_before_mib": round(rss_before / 2**20), "rss_after_mib": round(rss_after / 2**20)}
    out = os.environ.get("PADDLE_SCORER_LOAD_RESULT")  # benchmarks/bench_serve_load.py records it
    if out:
        with open(out, "w") as fh:
            json.dump(summary, fh)
    print("load:", summary)
