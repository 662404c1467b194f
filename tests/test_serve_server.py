"""serve as a real process on a loopback port, driven by real clients: lm-evaluation-harness (offline),
the openai package, 32 parallel clients; API key; clean SIGINT/SIGTERM; startup errors."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import builders
from paddle_scorer.model.loader import load
from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

REPO = builders.REPO
SCORER = builders.DEMO_SCORER
QUERIES = builders.demo_queries()
KEY = "test-key-123"
ATOL = 1e-5


def env():
    e = os.environ.copy()
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    def __init__(self, *args):
        cmd = [sys.executable, "-m", "paddle_scorer", "serve", "--model", str(builders.DEMO_BASE), "--lora",
               str(builders.DEMO_LORA), "--port", "0", "--device", "cpu", *args]
        # A test run started as a background job of a non-interactive shell inherits SIGINT as ignored (POSIX),
        # and the server rightly keeps that; Ctrl-C is what this child is meant to get, so it starts with the
        # default disposition, as from a terminal.
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=_sigint_default)
        self.url = None
        self.lines: list[str] = []

    def wait(self, timeout=240) -> "Server":
        deadline = time.time() + timeout
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"serve exited ({self.proc.wait()}): {self.proc.stderr.read()}")
            self.lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
            if time.time() > deadline:
                raise TimeoutError("serve did not start")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
        return self

    def stop(self, sig) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def servers():
    """Two servers loading in parallel: `open` (no key, as the README's lm-eval command) and `keyed`."""
    a, b = Server(), Server("--api-key", KEY, "--max-batch", "16")
    try:
        yield {"open": a.wait(), "keyed": b.wait()}
    finally:
        for s in (a, b):
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


@pytest.fixture(scope="module")
def server(servers):
    return servers["open"]


@pytest.fixture(scope="module")
def classified():
    loaded = load(builders.DEMO_BASE, builders.DEMO_LORA, device="cpu")
    clf = Classifier(loaded, ClassifyOptions(labels=SCORER["labels"], template=SCORER["template"]))
    recs = clf.score([clf.prepare(q, q["id"], q["id"]) for q in QUERIES])
    return loaded, {r["id"]: r for r in recs}


def run_lm_eval(url, out_dir, tasks, *extra):
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", f"base_url={url}/v1/completions,max_length=256,num_concurrent=4",
           "--batch_size", "8", "--tasks", tasks, "--include_path", "tests/lm_eval", "--log_samples",
           "--output_path", str(out_dir), *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    results = json.loads(open(glob.glob(f"{out_dir}/**/results_*.json", recursive=True)[0]).read())["results"]
    samples = {}
    for path in glob.glob(f"{out_dir}/**/samples_*.jsonl", recursive=True):
        task = re.match(r"samples_(.+)_\d{4}-", os.path.basename(path)).group(1)
        samples[task] = [json.loads(line) for line in open(path)]
    return results, samples


def test_lm_eval_multiple_choice_equals_classify_and_generation_and_rolling_run(server, classified, tmp_path):
    results, samples = run_lm_eval(server.url, tmp_path / "lm_eval",
                                   "demo_goods_life,demo_goods_life_gen,demo_queries_rolling")
    loaded, recs = classified
    labels = SCORER["labels"]
    mc = samples["demo_goods_life"]
    assert len(mc) == len(QUERIES) == len(recs)
    for s in mc:
        rec = recs[s["doc"]["id"]]
        ll = [float(r[0]) for r in s["filtered_resps"]]
        np.testing.assert_allclose(ll, [rec["logprobs"][lab] for lab in labels], atol=ATOL, rtol=0)
        assert [r[1] == "True" for r in s["filtered_resps"]] == [rec["is_greedy"][lab] for lab in labels]
    accuracy = np.mean([r["prediction"] == r["gold"] for r in recs.values()])
    assert results["demo_goods_life"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)

    gen = samples["demo_goods_life_gen"]
    assert len(gen) == 20 and results["demo_goods_life_gen"]["exact_match,none"] >= 0.9  # the demo answers the label
    rolling = samples["demo_queries_rolling"]
    assert len(rolling) == 20 and np.isfinite(results["demo_queries_rolling"]["word_perplexity,none"])
    for s in rolling[:5]:  # the rolling log-likelihood is log P(text | BOS), token by token
        ids = loaded.tokenizer(s["doc"]["query"], add_special_tokens=False)["input_ids"]
        full = builders.plain_logprobs(loaded, [loaded.tokenizer.bos_token_id] + ids)
        expect = sum(full[i, t] for i, t in enumerate(ids))
        got = float(np.ravel(s["filtered_resps"])[0])
        assert got == pytest.approx(expect, abs=1e-4)


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["demo-lora"]
    prompt = SCORER["template"].format(query="what is the price of cabbage today?")
    r = client.completions.create(model="demo-lora", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    ch = r.choices[0]
    assert ch.text.startswith(prompt + " goods") and ch.logprobs.token_logprobs[0] is None
    assert len(ch.logprobs.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    batch = client.completions.create(model="demo-lora", prompt=[prompt, "how do I"], max_tokens=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo-lora", prompt="x", logprobs=99)
    assert "logprobs" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):  # the demo tokenizer has no chat template
        client.chat.completions.create(model="demo-lora", messages=[{"role": "user", "content": "hi"}])


def _requests(tok):
    """32 requests mixing lm-eval scoring, echo, greedy and seeded generation with stop strings, batches."""
    reqs = []
    for i in range(32):
        q = QUERIES[i]["query"]
        prompt = SCORER["template"].format(query=q)
        kind = i % 4
        if kind == 0:
            ids = tok(prompt + " " + SCORER["labels"][i % 2])
            reqs.append({"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234})
        elif kind == 1:
            reqs.append({"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0})
        elif kind == 2:
            reqs.append({"prompt": q, "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": i, "stop": [" o", "?"],
                         "logprobs": 1})
        else:
            reqs.append({"prompt": [q, prompt], "max_tokens": 6, "temperature": 0, "stop": "\n"})
    return reqs


def test_32_parallel_clients_get_what_each_gets_alone(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        tok = lambda text: c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
        reqs = _requests(tok)
        alone = [c.post("/v1/completions", json=r).json() for r in reqs]
        before = c.get("/health").json()["engine"]
    together: list = [None] * len(reqs)
    start = threading.Barrier(len(reqs))

    def client(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            start.wait()
            together[i] = c.post("/v1/completions", json=reqs[i]).json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(server.url + "/health").json()["engine"]
    assert after["largest_score_pass"] > 1 or after["largest_decode_step"] > 1  # they did share forwards
    n_prompts = sum(len(r["prompt"]) if isinstance(r["prompt"], list) and isinstance(r["prompt"][0], (str, list)) else 1
                    for r in reqs)
    assert after["sequences"] - before["sequences"] == n_prompts
    for a, b in zip(alone, together):
        assert "error" not in b, b
        for ca, cb in zip(a["choices"], b["choices"], strict=True):
            assert ca["text"] == cb["text"] and ca["finish_reason"] == cb["finish_reason"]
            if ca["logprobs"] is not None:
                assert ca["logprobs"]["tokens"] == cb["logprobs"]["tokens"]
                assert ca["logprobs"]["text_offset"] == cb["logprobs"]["text_offset"]
                va = [np.nan if v is None else v for v in ca["logprobs"]["token_logprobs"]]
                vb = [np.nan if v is None else v for v in cb["logprobs"]["token_logprobs"]]
                np.testing.assert_allclose(va, vb, atol=ATOL, rtol=0)


def test_bad_requests_over_http_then_still_serving(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for body in (b"{", b'{"prompt": []}', b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "' + b"w " * 400 + b'"}'):
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "error" in r.json() and "Traceback" not in r.text
        r = c.post("/v1/completions", content=b"x" * (9 * 2**20))
        assert r.status_code == 413
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_a_client_hanging_up_mid_body_is_not_a_server_error(server):
    """A client that closes its connection while sending its body: nothing to answer, and no "unexpected error" with a
    traceback in the server's log (test_ctrl_c_stops_cleanly reads the log of this server when it stops)."""
    import socket

    host, port = server.url.split("//")[1].split(":")
    for _ in range(3):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"half a bo")
        time.sleep(0.2)
        s.close()
    time.sleep(0.5)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_api_key_over_http(servers):
    import openai

    url = servers["keyed"].url
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model="demo-lora", prompt="hi", max_tokens=1, temperature=0).choices[0].index == 0


def test_sigterm_stops_cleanly(servers):
    code, err = servers["keyed"].stop(signal.SIGTERM)
    assert code == 0 and "SIGTERM: the server stopped." in err and "Traceback" not in err


def test_ctrl_c_stops_cleanly(servers):
    code, err = servers["open"].stop(signal.SIGINT)
    assert code == 0 and "interrupted: the server stopped." in err and "Traceback" not in err
    assert "unexpected error" not in err  # the clients that hung up mid-body (above) were no server error


def test_startup_errors_are_one_sentence_and_a_nonzero_exit(tmp_path):
    def serve(*args, extra_env=None):
        return subprocess.run([sys.executable, "-m", "paddle_scorer", "serve", *args], cwd=REPO,
                              env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=120)

    empty = tmp_path / "empty"
    empty.mkdir()
    p = serve("--model", str(empty), "--device", "cpu", "--port", "0")
    assert p.returncode != 0 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    holder = __import__("socket").socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        p = serve("--model", str(builders.DEMO_BASE), "--port", str(port))
        assert p.returncode == 2 and "port is in use" in p.stderr and "Traceback" not in p.stderr
    finally:
        holder.close()
    p = serve("--model", str(builders.DEMO_BASE), "--max-batch", "0")
    assert p.returncode == 2 and "--max-batch" in p.stderr
    for how in ({"args": ["--api-key", ""]}, {"extra_env": {"PADDLE_SCORER_API_KEY": ""}},
                {"extra_env": {"PADDLE_SCORER_API_KEY": "  "}}):  # an unset variable must not turn the key off
        p = serve("--model", str(builders.DEMO_BASE), "--port", "0", *how.get("args", []), extra_env=how.get("extra_env"))
        assert p.returncode == 2 and "--api-key is empty" in p.stderr and "Traceback" not in p.stderr, (how, p.stderr)
