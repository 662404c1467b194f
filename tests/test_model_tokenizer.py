"""The fast tokenizer (#29): used where the checkpoint's files give one that encodes exactly as the slow one, checked
at load and on a run's first prompts; a difference keeps the slow one, said in a note, never used silently."""

import json

import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.model.tokenizer import TOKENIZER_CHECKS, Encoder, encode

runner = CliRunner()
DEMO = ["--model", str(builders.DEMO_BASE), "--lora", str(builders.DEMO_LORA)]


def tokenizer_folder(tmp_path, name, replace):
    """The demo tokenizer's files plus a ``tokenizer.json`` (what the fast class reads first) whose normaliser also
    replaces ``replace[0]`` with ``replace[1]``: a fast tokenizer that disagrees with the slow one on that text."""
    from paddlenlp.transformers import AutoTokenizer
    from tokenizers import normalizers

    folder = tmp_path / name
    folder.mkdir()
    builders.copy_tokenizer(folder)
    fast = AutoTokenizer.from_pretrained(str(builders.DEMO_BASE), use_fast=True)
    fast._tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(*replace)])
    fast._tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def demo_loaded():
    from paddle_scorer import LoadOptions
    from paddle_scorer.tasks.loading import load_model

    return load_model(LoadOptions(builders.DEMO_BASE, builders.DEMO_LORA))


def test_the_demo_runs_on_the_fast_tokenizer_with_the_slow_ones_ids(demo_loaded):
    tok = demo_loaded.tokenizer
    assert demo_loaded.facts.tokenizer == {"class": "Qwen2TokenizerFast", "fast": True,
                                           "checked_against": "Qwen2Tokenizer", "note": None}
    slow = tok.paddle_scorer_slow
    texts = [q["query"] for q in builders.demo_queries()] + list(TOKENIZER_CHECKS)
    for special in (True, False):
        batch = Encoder(tok).many(texts, special)
        assert batch == [encode(slow, t, special) for t in texts]


def test_a_fast_tokenizer_that_differs_at_load_is_not_used(tmp_path):
    folder = tokenizer_folder(tmp_path, "tok-a", ("a", "b"))  # every check text with an "a" differs
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["classify", *DEMO, "--tokenizer", str(folder), "--input", str(builders.DEMO_QUERIES),
                            "--limit", "6", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "note: the fast tokenizer (Qwen2TokenizerFast) is not used: it encodes" in r.stderr
    assert "otherwise than the slow one (Qwen2Tokenizer)" in r.stderr
    meta = json.loads(out.with_name("o.jsonl.meta.json").read_text())
    assert meta["model"]["tokenizer"]["fast"] is False and meta["model"]["tokenizer"]["class"] == "Qwen2Tokenizer"


def test_a_difference_on_the_runs_own_prompts_switches_to_the_slow_one(tmp_path):
    """A fast tokenizer that agrees on every check text but not on a letter of this run's prompts: the run's first
    prompts find it, the slow one scores the run, and the ids are the slow tokenizer's."""
    folder = tokenizer_folder(tmp_path, "tok-zh", ("ж", "x"))
    data = tmp_path / "in.jsonl"
    recs = [{"id": f"z{i}", "query": q} for i, q in enumerate(["где купить жёлтый чайник?", "how do I renew a licence?",
                                                               "buy a жакет online"])]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    got, want = tmp_path / "got.jsonl", tmp_path / "want.jsonl"
    r = runner.invoke(app, ["classify", *DEMO, "--tokenizer", str(folder), "--input", str(data), "--output", str(got)])
    assert r.exit_code == 0, r.output
    assert "is not used: on this run's prompts it encodes" in r.stderr
    r = runner.invoke(app, ["classify", *DEMO, "--input", str(data), "--output", str(want)])  # the demo's own files
    assert r.exit_code == 0 and "not used" not in r.stderr
    a = [json.loads(x) for x in open(got)]
    b = [json.loads(x) for x in open(want)]
    assert [x["prompt_token_ids"] for x in a] == [x["prompt_token_ids"] for x in b]
    assert [x["label_token_ids"] for x in a] == [x["label_token_ids"] for x in b]
    meta = json.loads((tmp_path / "got.jsonl.meta.json").read_text())
    assert meta["model"]["tokenizer"]["fast"] is False and "on this run's prompts" in meta["model"]["tokenizer"]["note"]


def test_the_label_boundary_needs_two_batched_calls_per_window(demo_loaded, monkeypatch):
    """Prompts of a window go to the tokenizer in two batches (prompts; prompts with each label), not four calls a
    record; the boundary rule (a label's first characters merging with the prompt's end) is as strict as before."""
    from paddle_scorer.tasks.classify import Classifier, options_with_defaults

    opts, _ = options_with_defaults(builders.DEMO_BASE, builders.DEMO_LORA)
    clf = Classifier(demo_loaded, opts)
    calls = []
    real = Encoder.many

    def many(self, texts, special):
        calls.append(len(texts))
        return real(self, texts, special)

    monkeypatch.setattr(Encoder, "many", many)
    rows = [(q["id"], q, f"x:{i}") for i, q in enumerate(builders.demo_queries(40))]
    preps = clf.prepare_many(rows)
    assert calls == [40, 80]
    one_by_one = [clf.prepare(rec, rid, where) for rid, rec, where in rows]
    assert [(p.context, p.label_ids) for p in preps] == [(p.context, p.label_ids) for p in one_by_one]
    # a prompt that ends inside a word: the label's first characters merge with it, the split stays honest
    p = clf.encode("Query: which shop sells running shoes?\nAnswer: goo", "merged")
    whole = encode(demo_loaded.tokenizer, "Query: which shop sells running shoes?\nAnswer: goo goods", True)
    assert p.context + p.label_ids[0] == whole
