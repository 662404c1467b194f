"""classify: exact label probabilities checked against plain forward passes, through the real CLI."""

import contextlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.model.loader import load
from paddle_scorer.tasks.prompts import encode_pair, parse_labels
from paddle_scorer.process.environment import paddle
from paddle_scorer.tasks.classify import Classifier, ClassifyOptions
from paddle_scorer.errors import UsageError

runner = CliRunner()
DEMO = ["--model", str(builders.DEMO_BASE), "--lora", str(builders.DEMO_LORA)]
TEMPLATE = builders.DEMO_SCORER["template"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def demo():
    return load(builders.DEMO_BASE, builders.DEMO_LORA)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "scores.jsonl"
    res = cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--output", out)
    assert res.exit_code == 0, res.output
    return out, res


def plain_logprobs(loaded, ids):
    pd = paddle()
    with pd.no_grad():
        logits = loaded.model(pd.to_tensor([ids]), return_dict=True).logits.astype("float32")
    return pd.nn.functional.log_softmax(logits, axis=-1).numpy()[0].astype(np.float64)


def test_demo_accuracy_matches_the_build_script(demo_run):
    out, res = demo_run
    metrics = json.loads((builders.REPO / "checkpoints" / "demo-metrics.json").read_text())
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["status"] == "complete"
    assert meta["metrics"]["accuracy"] == pytest.approx(metrics["heldout_accuracy_with_adapter"], abs=0.01)
    assert f"accuracy {meta['metrics']['accuracy']:.4f}" in res.stdout
    recs = read_jsonl(out)
    ids = [json.loads(line)["id"] for line in open(builders.DEMO_QUERIES)]
    assert [r["id"] for r in recs] == ids  # input order, every id once
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-9 for r in recs)


def test_single_token_labels_equal_softmax_of_next_token_logits(demo, demo_run):
    out, _ = demo_run
    for rec in read_jsonl(out)[:5]:
        lp = plain_logprobs(demo, rec["prompt_token_ids"])[-1]
        toks = [rec["label_token_ids"][lab] for lab in ("goods", "life")]
        assert all(len(t) == 1 for t in toks)
        restricted = np.array([lp[t[0]] for t in toks])
        expect = np.exp(restricted - np.logaddexp.reduce(restricted))
        np.testing.assert_allclose([rec["probs"]["goods"], rec["probs"]["life"]], expect, atol=1e-6)
        np.testing.assert_allclose([rec["logprobs"]["goods"], rec["logprobs"]["life"]], restricted, atol=1e-5)
        greedy = int(np.argmax(lp))
        assert rec["is_greedy"]["goods"] == (greedy == toks[0][0])


def test_base_alone_is_near_chance_and_adapter_is_what_classifies(tmp_path):
    out = tmp_path / "base.jsonl"
    res = cli("classify", "--model", builders.DEMO_BASE, "--labels", "goods,life", "--template", TEMPLATE,
              "--input", builders.DEMO_QUERIES, "--output", out)
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_name("base.jsonl.meta.json").read_text())
    assert meta["metrics"]["accuracy"] < 0.75


MULTI = ["price of cabbage", "renew my licence", "x", "goods and life together"]


@pytest.fixture(scope="module")
def tiny(models):
    return load(models["llama"], models["llama_lora"])


def test_multi_token_label_logprobs_equal_sum_of_plain_forward_steps(tiny):
    clf = Classifier(tiny, ClassifyOptions(labels=MULTI, template="Q: {query}\nA:", batch_size=3))
    preps = [clf.prepare({"query": q}, i, f"#{i}") for i, q in enumerate(["what now?", "a much longer question here ok", "hm"])]
    recs = clf.score(preps)
    for prep, rec in zip(preps, recs):
        for lab in MULTI:
            cont = rec["label_token_ids"][lab]
            full = plain_logprobs(tiny, prep.context + cont)
            n = len(prep.context)
            expect = sum(full[n - 1 + t, cont[t]] for t in range(len(cont)))
            assert rec["logprobs"][lab] == pytest.approx(expect, abs=1e-4)
            greedy = all(int(np.argmax(full[n - 1 + t])) == cont[t] for t in range(len(cont)))
            assert rec["is_greedy"][lab] == greedy
        assert max(rec["label_num_tokens"].values()) > 1


def test_batched_equals_one_at_a_time(models, tmp_path):
    data = tmp_path / "d.jsonl"
    qs = ["short", "a medium length query about cabbage", "x y", "what is the price of bread and milk today in town?"]
    data.write_text("".join(json.dumps({"id": f"r{i}", "query": q}) + "\n" for i, q in enumerate(qs * 2)))
    outs = {}
    for bs in (1, 3, 8, None):  # None: the default, batches cut by padded tokens
        out = tmp_path / f"b{bs}.jsonl"
        res = cli("classify", "--model", models["llama"], "--lora", models["llama_lora"], "--labels", ",".join(MULTI),
                  "--input", data, "--output", out, *(["--batch-size", bs] if bs else []))
        assert res.exit_code == 0, res.output
        outs[bs] = read_jsonl(out)
    for bs in (3, 8, None):
        for a, b in zip(outs[1], outs[bs], strict=True):
            assert a["id"] == b["id"] and a["prompt_token_ids"] == b["prompt_token_ids"]
            np.testing.assert_allclose(list(a["logprobs"].values()), list(b["logprobs"].values()), atol=1e-5)


def test_default_batches_are_cut_by_padded_tokens(tiny, monkeypatch):
    """Without --batch-size, length-sorted prompts share a forward up to CALL_TOKENS padded tokens."""
    from paddle_scorer.compute import packing

    clf = Classifier(tiny, ClassifyOptions(labels=["goods", "life"], template="Q: {query}\nA:"))
    qs = ["a much longer question about the price of things", "short one", "mid size query here", "hm", "ok then"]
    preps = [clf.prepare({"query": q}, i, f"#{i}") for i, q in enumerate(qs)]
    widths = sorted((len(p.context) for p in preps), reverse=True)
    seen = []
    monkeypatch.setattr(clf.backend, "score_many", lambda batches: seen.extend(len(b[0]) for b in batches) or
                        [[None] * len(b[0]) for b in batches])
    clf._score_prepared(preps)
    assert seen == [5]  # all five in one forward: 5 x widest << 1024
    seen.clear()
    monkeypatch.setattr(packing, "CALL_TOKENS", 2 * widths[0])
    clf._score_prepared(preps)
    assert seen[0] == 2 and sum(seen) == 5  # the two longest fill 2 x widest; the rest are shorter
    assert clf.records_per_flush(preps) >= 8
    assert Classifier(tiny, ClassifyOptions(labels=["goods"], batch_size=3)).records_per_flush(preps) == 3


def test_attach_equals_merge_through_the_cli(tmp_path):
    res = {}
    for mode in ("attach", "merge"):
        out = tmp_path / f"{mode}.jsonl"
        r = cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--limit", 20, "--output", out, "--mode", mode)
        assert r.exit_code == 0, r.output
        res[mode] = read_jsonl(out)
    for a, m in zip(res["attach"], res["merge"], strict=True):
        np.testing.assert_allclose(list(a["logprobs"].values()), list(m["logprobs"].values()), atol=1e-5)


def test_prompt_ids_and_json_stdout(demo):
    r = cli("classify", *DEMO, "--prompt", "what is the price of cabbage today?", "--prompt", "how do I renew my passport?", "--json")
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["id"] for x in recs] == [0, 1]
    assert [x["prediction"] for x in recs] == ["goods", "life"]
    prompt = TEMPLATE.format(query="what is the price of cabbage today?")
    assert recs[0]["prompt_token_ids"] == demo.tokenizer(prompt)["input_ids"]


def test_leading_space_and_boundary_are_explicit(demo):
    tok = demo.tokenizer
    # trailing prompt whitespace moves into the label
    a = encode_pair(tok, "Answer: ", "goods", True)
    b = encode_pair(tok, "Answer:", " goods", True)
    assert a == b
    # a label whose text merges into the prompt's last token is refused, not silently mis-split
    assert encode_pair(tok, "Answer: goo", "ds", True).continuation == []
    clf = Classifier(demo, ClassifyOptions(labels=["ds", "life"], label_prefix=""))
    with pytest.raises(UsageError, match="label 'ds' tokenizes to nothing"):
        clf.encode("Answer: goo", "#0")


def test_contextual_calibration_divides_by_content_free_probs(tmp_path):
    out = tmp_path / "c.jsonl"
    r = cli("classify", "--model", builders.DEMO_BASE, "--labels", "goods,life", "--template", TEMPLATE,
            "--input", builders.DEMO_QUERIES, "--limit", 10, "--output", out, "--calibration", "contextual",
            "--content-free", "N/A", "--content-free", "")
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_name("c.jsonl.meta.json").read_text())
    cf = meta["calibration"]["content_free_probs"]
    # independent: classify the content-free inputs without calibration and average
    r2 = cli("classify", "--model", builders.DEMO_BASE, "--labels", "goods,life", "--template", TEMPLATE,
             "--prompt", "N/A", "--prompt", "", "--json")
    cf_recs = [json.loads(x) for x in r2.stdout.splitlines() if x.startswith("{")]
    for lab in ("goods", "life"):
        assert cf[lab] == pytest.approx(np.mean([x["probs"][lab] for x in cf_recs]), abs=1e-9)
    for rec in read_jsonl(out):
        q = np.array([rec["uncalibrated_probs"][lab] / cf[lab] for lab in ("goods", "life")])
        np.testing.assert_allclose([rec["probs"]["goods"], rec["probs"]["life"]], q / q.sum(), atol=1e-9)


def test_pmi_subtracts_domain_premise_logprobs(tmp_path):
    out = tmp_path / "p.jsonl"
    r = cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--limit", 5, "--output", out, "--calibration", "pmi")
    assert r.exit_code == 0, r.output
    cal = json.loads(out.with_name("p.jsonl.meta.json").read_text())["calibration"]
    assert cal["domain_premise"] == TEMPLATE[TEMPLATE.rfind("}") + 1:].lstrip()
    for rec in read_jsonl(out):
        s = np.array([rec["logprobs"][lab] - cal["domain_logprobs"][lab] for lab in ("goods", "life")])
        np.testing.assert_allclose([rec["probs"]["goods"], rec["probs"]["life"]], np.exp(s - np.logaddexp.reduce(s)), atol=1e-9)


def test_chat_template_is_applied_when_present(models, copy_of):
    folder = copy_of(models["llama"], "chat")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    on = cli("classify", "--model", folder, "--labels", "goods,life", "--prompt", "cabbage", "--json")
    off = cli("classify", "--model", folder, "--labels", "goods,life", "--prompt", "cabbage", "--json", "--no-chat-template")
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    ids_on = json.loads(on.stdout.splitlines()[0])["prompt_token_ids"]
    ids_off = json.loads(off.stdout.splitlines()[0])["prompt_token_ids"]
    loaded = load(folder)
    assert ids_on == loaded.tokenizer("<s>user: cabbage\nassistant:", add_special_tokens=False)["input_ids"]
    assert ids_off == loaded.tokenizer("cabbage")["input_ids"]


# ---------------------------------------------------------------- resume


def test_interrupted_run_resumes_with_every_id_exactly_once(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    calls = {"n": 0}
    real = Classifier.score

    def flaky(self, preps):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, preps)

    monkeypatch.setattr(Classifier, "score", flaky)
    r = cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--output", out, "--batch-size", 10)
    assert r.exit_code == 130
    assert not out.exists()  # the output appears only when complete
    working = tmp_path / ".r.jsonl.inprogress"
    partial = read_jsonl(working)
    assert len(partial) == 30  # three complete batches survived, in the hidden working file
    with open(working, "a") as fh:
        fh.write('{"id": "torn')  # a torn last line from a kill
    monkeypatch.setattr(Classifier, "score", real)
    r = cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--output", out, "--batch-size", 10, "--resume")
    assert r.exit_code == 0, r.output
    assert "120 record(s), 30 already done" in r.stdout
    recs = read_jsonl(out)
    ids = [json.loads(line)["id"] for line in open(builders.DEMO_QUERIES)]
    assert [x["id"] for x in recs] == ids
    fresh = tmp_path / "fresh.jsonl"
    assert cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--output", fresh).exit_code == 0
    for a, b in zip(recs, read_jsonl(fresh), strict=True):
        np.testing.assert_allclose(list(a["logprobs"].values()), list(b["logprobs"].values()), atol=1e-5)


def test_resume_with_other_labels_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    assert cli("classify", *DEMO, "--input", builders.DEMO_QUERIES, "--limit", 3, "--output", out).exit_code == 0
    before = out.read_bytes()
    r = cli("classify", *DEMO, "--labels", "life,goods,other", "--input", builders.DEMO_QUERIES, "--limit", 3,
            "--output", out, "--resume")
    assert r.exit_code == 2 and "different configuration (labels differ)" in r.stderr
    assert out.read_bytes() == before


# ---------------------------------------------------------------- bad input


OLD_META = '{"tool": "paddle-scorer 0.1.0", "status": "complete"}\n'


@pytest.fixture
def existing(tmp_path):
    """An earlier output (--overwrite replaces only files with paddle-scorer's .meta.json next to them)."""
    out = tmp_path / "keep.jsonl"
    out.write_text('{"id": "old"}\n')
    out.with_name(out.name + ".meta.json").write_text(OLD_META)
    return out


def bad(existing, *args):
    r = cli("classify", *DEMO, "--output", existing, "--overwrite", *args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert existing.read_text() == '{"id": "old"}\n'  # untouched
    assert existing.with_name(existing.name + ".meta.json").read_text() == OLD_META
    return r.stderr


def test_malformed_jsonl_names_file_and_line(existing, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "ok"}\n{"query": "broken"\n')
    assert f"{data}:2: malformed JSON" in bad(existing, "--input", data)


def test_missing_template_field(existing, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "ok"}\n{"text": "no query"}\n')
    msg = bad(existing, "--input", data)
    assert f"{data}:2: the template needs field(s) query" in msg


@pytest.mark.parametrize("labels,expect", [("goods,", "empty label"), ("goods,goods", "more than once"), ("goods", "at least two")])
def test_bad_labels(existing, labels, expect):
    assert expect in bad(existing, "--labels", labels, "--prompt", "x")


def test_prompt_longer_than_context(existing, tmp_path, models):
    long = "cabbage " * 400
    msg = bad(existing, "--prompt", long)
    assert "--prompt #1: the prompt and what follows it is" in msg and "--truncate left" in msg
    r = cli("classify", *DEMO, "--prompt", long, "--truncate", "left", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["truncated_tokens"] > 0 and len(rec["prompt_token_ids"]) == 256  # label is 1 token: fed length 256


def test_existing_output_needs_resume_or_overwrite(existing):
    r = cli("classify", *DEMO, "--prompt", "x", "--output", existing)
    assert r.exit_code == 2 and "already exists; pass --resume" in r.stderr
    assert existing.read_text() == '{"id": "old"}\n'


def test_non_finite_probabilities_are_refused_loudly(models, copy_of, tmp_path):
    from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

    folder = copy_of(models["llama"], "overflow")
    sd = read_pdparams(folder / "model_state.pdparams")
    sd["lm_head.weight"][:] = 3e38  # finite weights whose logits overflow to inf
    write_pdparams(sd, folder / "model_state.pdparams")
    out = tmp_path / "nan.jsonl"
    r = cli("classify", "--model", folder, "--labels", "goods,life", "--prompt", "x", "--output", out)
    assert r.exit_code != 0
    assert "non-finite log-probabilities" in r.stderr and "never a score" in r.stderr
    assert not out.exists() or "NaN" not in out.read_text()


def test_parse_labels_keeps_order():
    assert parse_labels("goods, life ,other") == ["goods", "life", "other"]


def test_a_resumable_classify_of_a_file_from_python_equals_the_cli(tmp_path):
    """tasks.classify.classify_file is the classify pipeline: interrupted after its first block and resumed from
    Python, its output equals the CLI's, record for record."""
    from paddle_scorer import Destination, Hooks, LoadOptions, Source, classify_file
    from paddle_scorer.tasks.classify import options_with_defaults

    cli_out, py_out = tmp_path / "cli.jsonl", tmp_path / "py.jsonl"
    r = runner.invoke(app, ["classify", "--model", str(builders.DEMO_BASE), "--lora", str(builders.DEMO_LORA), "--input",
                            str(builders.DEMO_QUERIES), "--limit", "40", "--batch-size", "8", "--output", str(cli_out)])
    assert r.exit_code == 0, r.output
    load = LoadOptions(builders.DEMO_BASE, builders.DEMO_LORA)
    opts, source_of_template = options_with_defaults(builders.DEMO_BASE, builders.DEMO_LORA, batch_size=8)
    source = Source(input=builders.DEMO_QUERIES, limit=40)
    notes = []

    @contextlib.contextmanager
    def stop_after_first_block(what, total):
        def advance(n):
            raise KeyboardInterrupt

        yield advance

    with pytest.raises(KeyboardInterrupt):
        classify_file(load, opts, source, Destination(py_out), Hooks(note=notes.append, progress=stop_after_first_block),
                      template_source=source_of_template, argv=[])
    assert not py_out.exists() and (tmp_path / ".py.jsonl.inprogress").is_file()
    run = classify_file(load, opts, source, Destination(py_out, resume=True), template_source=source_of_template,
                        argv=[])
    assert run.stats.skipped == 8 and run.stats.scored == 32 and run.written == py_out
    assert [json.loads(x) for x in open(py_out)] == [json.loads(x) for x in open(cli_out)]
    assert run.metrics["n"] == 40 and run.metrics == json.loads((tmp_path / "cli.jsonl.meta.json").read_text())["metrics"]
