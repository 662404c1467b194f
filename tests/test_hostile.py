"""Hostile cases, one table: what a careless or adversarial user can throw at paddle-scorer (checkpoints, data,
reports, merges, injected faults; the guarantees of an output run are rows of tests/test_runs_output_file.py). How a
row runs and what it asserts: tests/hostile_table.py.

Faults a table row cannot make in-process (SIGTERM/SIGKILL of a running ``classify`` and ``merge``) run
the CLI as a real subprocess (``python -m paddle_scorer``) at the end of the module; a small
``sitecustomize`` on the subprocess' path pauses it at a known point so the signal lands mid-run.
"""

from __future__ import annotations


import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import builders
import weights_crafted
from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

from hostile_table import (DELETE, SCORER, SRC, WS, Row, Table, changed, classify, cli, default_records,
                            hidden_leftovers, message_lines, read_jsonl, run_row, snapshot)

TABLE = Table()
row = TABLE.row
ROWS = TABLE.rows


# ---------------------------------------------------------------------------- checkpoints


@row("checkpoint", "stale-renamed-adapter-next-to-the-real-one", 4, ("lora_model_state.pdparams", "model_state.pdparams", "stale"))
def _(ws):
    shutil.copy(ws.lora / "lora_model_state.pdparams", ws.lora / "model_state.pdparams")
    return classify(ws, output=None)


@row("checkpoint", "inspect-says-the-same-about-the-stale-copy", 4, ("model_state.pdparams", "stale"), message_from="any")
def _(ws):
    shutil.copy(ws.lora / "lora_model_state.pdparams", ws.lora / "model_state.pdparams")
    return ["inspect", ws.lora]


@row("checkpoint", "two-weight-sets-in-one-model-folder", 4, ("model_state.pdparams", "model.safetensors", "ambiguous"))
def _(ws):
    from paddle_scorer.checkpoint.weights import write_safetensors

    sd = read_pdparams(ws.base / "model_state.pdparams")
    write_safetensors({k: np.zeros_like(v) for k, v in sd.items()}, ws.base / "model.safetensors")
    return classify(ws, output=None)


@row("checkpoint", "all-zero-lora-B-is-a-no-op", 4, ("--allow-noop-adapter",))
def _(ws):
    ws.adapter_tensors(lambda sd: [v.fill(0) for k, v in sd.items() if k.endswith("lora_B")])
    return classify(ws, output=None)


@row("checkpoint", "lora-alpha-zero-is-a-no-op", 4, ("lora_alpha", "--allow-noop-adapter"))
def _(ws):
    ws.lora_config(lora_alpha=0, scaling=DELETE)
    return classify(ws, output=None)


def _noop_allowed(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert {"out.jsonl", "out.jsonl.meta.json"} <= added and not removed and not modified
    meta = json.loads(ws.p("out.jsonl.meta.json").read_text())
    assert meta["identity"]["noop_adapter_allowed"] is True


@row("checkpoint", "no-op-adapter-scored-only-with-the-flag-and-recorded", 0, check=_noop_allowed)
def _(ws):
    ws.adapter_tensors(lambda sd: [v.fill(0) for k, v in sd.items() if k.endswith("lora_B")])
    return classify(ws, "--allow-noop-adapter")


@row("checkpoint", "rslora-not-a-boolean", 4, ("rslora", "true or false", "lora_config.json"))
def _(ws):
    ws.lora_config(rslora="yes")
    return classify(ws, output=None)


@row("checkpoint", "rank-zero", 4, ("`r`", "positive integer"))
def _(ws):
    ws.lora_config(r=0)
    return classify(ws, output=None)


@row("checkpoint", "hand-edited-alpha-disagrees-with-saved-scaling", 4, ("scaling", "disagrees", "lora_alpha"))
def _(ws):
    ws.lora_config(lora_alpha=32)
    return classify(ws, output=None)


def _default_alpha(ws, before, after, r):
    added, _, _ = changed(before, after)
    assert "out.jsonl" in added
    meta = json.loads(ws.p("out.jsonl.meta.json").read_text())
    assert meta["model"]["scaling"] == pytest.approx(8 / 8)  # lora_alpha 8 (default) / r 8


@row("checkpoint", "missing-lora-alpha-uses-paddlenlp-default-8-and-says-so", 0, ("lora_alpha", "default 8"),
     check=_default_alpha, message_from="any")
def _(ws):
    ws.lora_config(lora_alpha=DELETE, scaling=DELETE)
    return classify(ws)


@row("checkpoint", "lora-config-not-json", 4, ("lora_config.json", "not valid JSON"))
def _(ws):
    (ws.lora / "lora_config.json").write_text("{'r': 8,")
    return classify(ws, output=None)


@row("checkpoint", "heads-do-not-divide-hidden-size", 4, ("num_attention_heads", "config.json"))
def _(ws):
    cfg = json.loads((ws.base / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (ws.base / "config.json").write_text(json.dumps(cfg))
    return classify(ws, output=None)


@row("checkpoint", "not-a-causal-lm", 4, ("LlamaForSequenceClassification", "causal language model"))
def _(ws):
    cfg = json.loads((ws.base / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (ws.base / "config.json").write_text(json.dumps(cfg))
    return classify(ws, output=None)


@row("checkpoint", "pickle-bomb-runs-nothing", 4, ("nothing was executed",))
def _(ws):
    builders.make_pickle_bomb(ws.base / "model_state.pdparams", ws.p("PWNED"))
    return classify(ws, output=None)


@row("checkpoint", "169-byte-file-declaring-a-terabyte-allocates-nothing", 4, ("model_state.pdparams",))
def _(ws):
    weights_crafted.huge_declared(ws.base / "model_state.pdparams")
    return ["inspect", ws.base]


@row("checkpoint", "truncated-weights", 4, ("copied completely",))
def _(ws):
    f = ws.lora / "lora_model_state.pdparams"
    f.write_bytes(f.read_bytes()[:-1000])
    return classify(ws, output=None)


@row("checkpoint", "safetensors-header-length-bomb", 4, ("model.safetensors", "header"))
def _(ws):
    (ws.base / "model_state.pdparams").unlink()
    (ws.base / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    return ["inspect", ws.base]


def _sharded_index(ws, weight_map) -> Path:
    (ws.base / "model_state.pdparams").unlink()
    (ws.base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ws.base


@row("checkpoint", "shard-index-pointing-outside-its-folder", 4, ("index.json", "outside its folder"))
def _(ws):
    _sharded_index(ws, {"llama.embed_tokens.weight": "../../elsewhere/model.safetensors"})
    return ["inspect", ws.base]


@row("checkpoint", "shard-index-naming-a-missing-shard", 4, ("index.json", "model-00002-of-00002.safetensors"))
def _(ws):
    _sharded_index(ws, {"llama.embed_tokens.weight": "model-00002-of-00002.safetensors"})
    return classify(ws, output=None)


@row("checkpoint", "shard-index-of-the-wrong-shape", 4, ("index.json", "weight_map"))
def _(ws):
    _sharded_index(ws, {"llama.embed_tokens.weight": ["model-00001-of-00001.safetensors"]})
    return classify(ws, output=None)


@row("checkpoint", "scorer-json-not-json", 4, ("scorer.json", "not valid JSON"))
def _(ws):
    (ws.lora / "scorer.json").write_text('{"labels": ["goods", "life"],}')
    return classify(ws, output=None)


@row("checkpoint", "scorer-json-not-an-object", 4, ("scorer.json", "not a JSON object"))
def _(ws):
    (ws.lora / "scorer.json").write_text('["goods", "life"]')
    return classify(ws, output=None)


@row("checkpoint", "scorer-json-labels-a-string-template-a-number", 4,
     ("scorer.json", "labels must be a list", "template must be a string"))
def _(ws):
    (ws.lora / "scorer.json").write_text('{"labels": "goods,life", "template": 5}')
    return classify(ws, output=None)


@row("checkpoint", "scorer-json-misspelt-key", 4, ("scorer.json", "label_prefx", "unknown key"))
def _(ws):
    (ws.lora / "scorer.json").write_text(json.dumps({**SCORER, "label_prefx": ""}))
    return ["generate", *ws.demo(), "--prompt", "x", "-n", "1"]


@row("checkpoint", "inspect-refuses-a-bad-scorer-json-like-the-loader", 4, ("scorer.json", "labels must be a list"))
def _(ws):
    (ws.lora / "scorer.json").write_text('{"labels": [1, 2]}')
    return ["inspect", ws.lora]


def _chat_template(ws, template: str) -> None:
    path = ws.base / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg))


@row("checkpoint", "chat-template-that-is-not-jinja", 4, ("tokenizer", "chat template", "not valid Jinja"))
def _(ws):
    _chat_template(ws, "{% for m in messages %}{{ m.content }")
    return classify(ws, output=None)


@row("checkpoint", "inspect-refuses-the-broken-chat-template-like-the-loader", 4, ("chat template", "not valid Jinja"))
def _(ws):
    _chat_template(ws, "{% for m in messages %}{{ m.content }")
    return ["inspect", ws.base]


@row("checkpoint", "chat-template-that-raises-on-a-prompt", 4, ("in.jsonl:1", "chat template failed", "--no-chat-template"))
def _(ws):
    _chat_template(ws, "{{ raise_exception('only system prompts') }}")
    return classify(ws, output=None)


@row("checkpoint", "tokenizer-vocab-not-json", 4, ("tokenizer", "vocab.json", "not valid JSON"))
def _(ws):
    (ws.base / "vocab.json").write_text('{"a": 1,')
    return classify(ws, output=None)


# round 3: an adapter applied twice, other formats and dtypes

def _merged(ws, name: str = "merged") -> Path:
    r = cli("merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p(name))
    assert r.exit_code == 0, r.output
    return ws.p(name)


@row("checkpoint", "classify-a-merged-model-with-its-own-adapter-again", 4,
     ("already merged", "paddle_scorer_merge.json", "twice"))
def _(ws):
    return ["classify", "--model", _merged(ws), "--lora", ws.lora, "--input", ws.data()]


@row("checkpoint", "merge-a-merged-model-with-its-own-adapter-again", 4,
     ("already merged", "paddle_scorer_merge.json", "twice"))
def _(ws):
    return ["merge", "--model", _merged(ws), "--lora", ws.lora, "--out", ws.p("twice")]


@row("checkpoint", "classify-a-model-merged-from-a-merge-with-the-first-adapter", 4,
     ("already merged", "paddle_scorer_merge.json"))
def _(ws):
    merged = _merged(ws)  # base + demo-lora, then + a second adapter on top: the record chain keeps the first
    other = ws.p("other-lora")
    shutil.copytree(ws.lora, other)
    sd = read_pdparams(other / "lora_model_state.pdparams")
    write_pdparams({k: (v * np.asarray(0.5, v.dtype) if k.endswith("lora_B") else v) for k, v in sd.items()},
                   other / "lora_model_state.pdparams")
    r = cli("merge", "--model", merged, "--lora", other, "--out", ws.p("merged2"))
    assert r.exit_code == 0, r.output
    return ["classify", "--model", ws.p("merged2"), "--lora", ws.lora, "--input", ws.data()]


def _other_base(ws) -> Path:
    other = ws.p("other-base")
    shutil.copytree(ws.base, other)
    sd = read_pdparams(other / "model_state.pdparams")
    write_pdparams({k: (v * np.asarray(0.9, v.dtype) if v.dtype.kind == "f" else v) for k, v in sd.items()},
                   other / "model_state.pdparams")
    return other


def _merged_other(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert any(a.startswith("merged-other/") for a in added) and not removed and not modified


@row("checkpoint", "merge-onto-another-base-notes-it-like-classify", 0, ("names its base", "another folder"),
     check=_merged_other, message_from="any")
def _(ws):
    ws.notes["note"] = True
    return ["merge", "--model", _other_base(ws), "--lora", ws.lora, "--out", ws.p("merged-other")]


def _write_base_tensor(ws, name_end: str, make) -> None:
    sd = read_pdparams(ws.base / "model_state.pdparams")
    key = next(k for k in sd if k.endswith(name_end))
    sd[key] = make(sd[key])
    write_pdparams(sd, ws.base / "model_state.pdparams")
    ws.notes["tensor"] = key


for _dt, _make in [("int8", lambda v: v.astype(np.int8)), ("bool", lambda v: v > 0),
                   ("complex64", lambda v: v.astype(np.complex64))]:
    def _setup(ws, _make=_make):
        _write_base_tensor(ws, "layers.0.mlp.up_proj.weight", _make)
        return classify(ws, output=None)

    row("checkpoint", f"{_dt}-weight-tensor-refused-by-name", 4,
        ("layers.0.mlp.up_proj.weight", _dt, "float16, bfloat16, float32 or float64"))(_setup)


@row("checkpoint", "float8-weights-refused-by-inspect-too", 4, ("float8_e4m3fn", "float16, bfloat16"))
def _(ws):
    import ml_dtypes
    from paddle_scorer.checkpoint.weights import write_safetensors

    sd = read_pdparams(ws.base / "model_state.pdparams")
    sd = {k: (v.astype(ml_dtypes.float8_e4m3fn) if k.endswith("up_proj.weight") else v) for k, v in sd.items()}
    (ws.base / "model_state.pdparams").unlink()
    write_safetensors(sd, ws.base / "model.safetensors")
    return ["inspect", ws.base]


@row("checkpoint", "float64-tensor-holding-1e300-streamed-names-the-tensor", 4,
     ("layers.1.self_attn.o_proj.weight", "after the cast to float32"), message_from="any")
def _(ws):
    _write_base_tensor(ws, "layers.1.self_attn.o_proj.weight", lambda v: np.full(v.shape, 1e300, np.float64))
    return classify(ws, "--execution", "streamed", output=None)


@row("checkpoint", "float64-tensor-holding-1e300-in-ram-names-the-tensor", 4,
     ("layers.1.self_attn.o_proj.weight", "after the cast to float32"), message_from="any")
def _(ws):
    _write_base_tensor(ws, "layers.1.self_attn.o_proj.weight", lambda v: np.full(v.shape, 1e300, np.float64))
    return classify(ws, output=None)


@row("checkpoint", "a-pytorch-zip-saved-as-pdparams", 4, ("model_state.pdparams", "zip", "torch.save"))
def _(ws):
    import zipfile

    with zipfile.ZipFile(ws.base / "model_state.pdparams", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return classify(ws, output=None)


@row("checkpoint", "a-safetensors-file-saved-as-pdparams", 4, ("lora_model_state.pdparams", "safetensors", "rename"))
def _(ws):
    from paddle_scorer.checkpoint.weights import write_safetensors

    path = ws.lora / "lora_model_state.pdparams"
    sd = read_pdparams(path)
    path.unlink()
    write_safetensors(sd, path)
    return classify(ws, output=None)


# ---------------------------------------------------------------------------- data


def _bad_field(value, words):
    def setup(ws):
        recs = default_records(3)
        recs[1]["query"] = value
        return classify(ws, data=ws.data(records=recs), output=None)

    return setup


for _name, _value, _word in [("null", None, "null"), ("number", 42, "int"), ("list", ["x"], "list"),
                             ("object", {"a": 1}, "object")]:
    row("data", f"{_name}-template-field", 2, ("in.jsonl:2", "query", _word, "--coerce-fields"))(_bad_field(_value, _word))


def _coerced(ws, before, after, r):
    recs = read_jsonl(ws.p("out.jsonl"))
    assert [x["id"] for x in recs] == [x["id"] for x in default_records(3)]
    meta = json.loads(ws.p("out.jsonl.meta.json").read_text())
    assert meta["identity"]["coerce_fields"] is True


@row("data", "coerce-fields-opts-in-and-is-recorded", 0, check=_coerced)
def _(ws):
    recs = default_records(3)
    recs[1]["query"] = 42
    return classify(ws, "--coerce-fields", data=ws.data(records=recs))


@row("data", "not-utf-8", 2, ("in.jsonl:2", "not UTF-8"))
def _(ws):
    return classify(ws, data=ws.data(raw=b'{"id": "a", "query": "ok"}\n{"id": "b", "query": "caf\xe9"}\n'), output=None)


def _bom_ok(ws, before, after, r):
    assert [x["id"] for x in read_jsonl(ws.p("out.jsonl"))] == ["a", "b"]


@row("data", "utf-8-bom-is-read", 0, check=_bom_ok)
def _(ws):
    return classify(ws, data=ws.data(raw=b'\xef\xbb\xbf{"id": "a", "query": "rice"}\n{"id": "b", "query": "visa"}\n'))


@row("data", "duplicate-id", 2, ("in.jsonl:3", '"a"', "already used at", "in.jsonl:1"))
def _(ws):
    return classify(ws, data=ws.data(records=[{"id": "a", "query": "x"}, {"id": "b", "query": "y"},
                                              {"id": "a", "query": "z"}]), output=None)


def _one_vs_string_one(ws, before, after, r):
    recs = read_jsonl(ws.p("out.jsonl"))
    assert [x["id"] for x in recs] == [1, "1"]  # two records, types kept


@row("data", "id-1-and-id-string-1-are-two-records", 0, check=_one_vs_string_one)
def _(ws):
    return classify(ws, data=ws.data(records=[{"id": 1, "query": "x"}, {"id": "1", "query": "y"}]))


@row("data", "key-twice-in-one-object", 2, ("in.jsonl:1", "query", "appears twice"))
def _(ws):
    return classify(ws, data=ws.data(raw=b'{"id": "a", "query": "x", "query": "y"}\n'), output=None)


@row("data", "lone-surrogate-escape", 2, ("in.jsonl:1", "lone surrogate"))
def _(ws):
    return classify(ws, data=ws.data(raw=b'{"id": "a", "query": "x\\ud800y"}\n'), output=None)


@row("data", "id-infinity", 2, ("in.jsonl:1", "finite number"))
def _(ws):
    return classify(ws, data=ws.data(raw=b'{"id": Infinity, "query": "x"}\n'), output=None)


@row("data", "id-a-list", 2, ("in.jsonl:1", "'id'", "string or a finite number"))
def _(ws):
    return classify(ws, data=ws.data(records=[{"id": ["a"], "query": "x"}]), output=None)


@row("data", "gold-label-a-list", 2, ("in.jsonl:1", "gold label", "'label'"))
def _(ws):
    return classify(ws, data=ws.data(records=[{"id": "a", "query": "x", "label": ["goods"]}]), output=None)


@row("data", "empty-input", 2, ("has no records",))
def _(ws):
    return classify(ws, data=ws.data(raw=b"\n\n"), output=None)


@row("data", "input-is-a-directory", 2, ("is a directory",))
def _(ws):
    ws.p("d").mkdir()
    return classify(ws, data=ws.p("d"), output=None)


@row("data", "template-without-fields", 2, ("no {field} placeholder",))
def _(ws):
    return classify(ws, "--template", "Is this about goods or life? Answer:", output=None)


@row("data", "template-with-attribute-access", 2, ("placeholder", "plain field name"))
def _(ws):
    return classify(ws, "--template", "Q: {query.upper} A:", output=None)


@row("data", "template-that-fills-in-the-gold-label", 2, ("{label}", "gold label", "its own answer"))
def _(ws):
    return classify(ws, "--template", "Query: {query} ({label})\nAnswer:", output=None)


@row("data", "two-labels-the-tokenizer-makes-identical", 2, ("'caf\\xe9'", "'cafe\\u0301'", "same tokens"))
def _(ws):
    return classify(ws, "--labels", "caf\u00e9,cafe\u0301", output=None)  # NFC makes them one label


@row("data", "limit-zero", 2, ("--limit", "at least 1"))
def _(ws):
    return classify(ws, "--limit", 0, output=None)


@row("data", "limit-negative", 2, ("--limit", "at least 1"))
def _(ws):
    return classify(ws, "--limit", -3, output=None)


@row("data", "batch-size-zero", 2, ("--batch-size", "at least 1"))
def _(ws):
    return classify(ws, "--batch-size", 0, output=None)


@row("data", "max-length-huge", 2, ("--max-length", "larger than the model's context", "--force-max-length"))
def _(ws):
    return classify(ws, "--max-length", 10**30, output=None)


@row("data", "max-length-negative", 2, ("--max-length", "at least 2"))
def _(ws):
    return classify(ws, "--max-length", -5, output=None)


@row("data", "memory-limit-negative", 2, ("-5GB", "not a memory size"))
def _(ws):
    return classify(ws, "--memory-limit", "-5GB", output=None)


@row("data", "temperature-nan", 2, ("--temperature", "finite"))
def _(ws):
    return ["generate", *ws.demo(), "--prompt", "x", "--sample", "--temperature", "nan"]


@row("data", "temperature-infinite", 2, ("--temperature", "finite"))
def _(ws):
    return ["generate", *ws.demo(), "--prompt", "x", "--sample", "--temperature", "inf"]


@row("data", "seed-negative", 2, ("--seed", "0 or more"))
def _(ws):
    return ["generate", *ws.demo(), "--prompt", "x", "--sample", "--seed", -1]


@row("data", "report-bins-huge", 2, ("--bins", "between 1 and"))
def _(ws):
    return ["report", ws.scored(), "--bins", 10**9]


@row("data", "command-line-text-that-is-not-utf-8", 2, ("--output", "not UTF-8"))
def _(ws):
    return classify(ws, output="caf\udce9.jsonl")


def _markup_literal(ws, before, after, r):
    assert "[/INST]" in r.stdout and "P([bold])" in r.stdout  # the table printed the text itself
    out = ws.p("[red]out.jsonl")
    recs = read_jsonl(out)
    assert recs[0]["id"] == "[/INST]" and set(recs[0]["probs"]) == {"[bold]", "life"}
    assert f"wrote {out}" in r.stdout
    rep = cli("report", out)
    assert rep.exit_code == 0 and "[bold]" in rep.stdout and "Traceback" not in rep.output


@row("data", "rich-markup-in-ids-labels-template-and-paths-is-printed-literally", 0, check=_markup_literal)
def _(ws):
    data = ws.data("[b]in.jsonl", records=[{"id": "[/INST]", "query": "[bold]price of rice[/bold]"},
                                          {"id": "[/]", "query": "visa [/red]"}])
    return ["classify", *ws.demo(), "--labels", "[bold],life", "--template", "[INST] {query} [/INST]",
            "--input", data, "--output", ws.p("[red]out.jsonl"), "--show", 5]


@row("data", "template-conversion-repr-refused", 2, ("{query!r}", "conversion", "plain {query}"))
def _(ws):
    return classify(ws, "--template", "Query: {query!r}\nAnswer:", output=None)


@row("data", "template-format-spec-refused", 2, ("{query:.3}", "format spec", "plain {query}"))
def _(ws):
    return classify(ws, "--template", "Query: {query:.3}\nAnswer:", output=None)


@row("data", "labels-with-spaces-and-an-empty-prefix-say-what-would-be-scored", 2,
     ("--labels", "--label-prefix ''", "'goods'", "'life'"))
def _(ws):
    return classify(ws, "--labels", " goods, life", "--label-prefix", "", output=None)


@row("data", "sampling-temperature-1e-320", 2, ("--temperature", "at least 0.001"))
def _(ws):
    return ["generate", *ws.demo(), "--prompt", "Query: rice\nAnswer:", "-n", "2", "--sample", "--temperature", "1e-320"]


@row("data", "automatic-id-collides-with-a-given-id", 2, ("in.jsonl:2", "no 'id'", "in.jsonl:4", "collide"))
def _(ws):
    return classify(ws, data=ws.data(records=[{"id": 0, "query": "a"}, {"query": "b"}, {"id": 7, "query": "c"},
                                              {"id": 1, "query": "d"}]), output=None)


def _dollar_report(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert "report.html" in added and not removed and not modified
    html = ws.p("report.html").read_text()
    assert "$$$" in html and html.count("Confusion matrix") == 1


@row("data", "labels-with-dollar-signs-report-as-text", 0, check=_dollar_report)
def _(ws):
    recs = [{**r, "label": ["$", "$$", "$$$"][i % 3]} for i, r in enumerate(default_records(6))]
    ws.scored("out.jsonl", "--labels", "$,$$,$$$", data=ws.data(records=recs))
    return ["report", ws.p("out.jsonl"), "--html", ws.p("report.html")]


@row("outputs", "report-html-onto-its-own-results", 2, ("--html", "results file", "destroy"))
def _(ws):
    out = ws.scored()
    return ["report", out, "--html", out]


@row("outputs", "report-html-onto-the-meta", 2, ("--html", ".meta.json"))
def _(ws):
    out = ws.scored()
    return ["report", out, "--html", out.with_name(out.name + ".meta.json")]


@row("outputs", "report-html-onto-the-runs-input", 2, ("--html", "the run's input"))
def _(ws):
    out = ws.scored()
    return ["report", out, "--html", ws.p("in.jsonl")]


@row("outputs", "report-html-is-a-directory", 2, ("--html", "is a directory"))
def _(ws):
    out = ws.scored()
    ws.p("pages").mkdir()
    return ["report", out, "--html", ws.p("pages")]


@row("outputs", "report-html-onto-a-file-that-is-not-a-report", 2, ("--html", "not a paddle-scorer report"))
def _(ws):
    out = ws.scored()
    ws.p("notes.txt").write_text("my notes\n")
    return ["report", out, "--html", ws.p("notes.txt")]


def _html_written(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert added == {"report.html"} and not removed and not modified  # no temporary file left
    mode = stat.S_IMODE(ws.p("report.html").stat().st_mode)
    assert mode == 0o640  # the umask of the row (027), not mkstemp's 0600
    again = cli("report", ws.p("out.jsonl"), "--html", ws.p("report.html"))  # a previous report is replaced
    assert again.exit_code == 0, again.output


@row("outputs", "report-html-atomic-with-umask-permissions", 0, check=_html_written)
def _(ws):
    ws.scored()
    ws.notes["umask"] = 0o027
    return ["report", ws.p("out.jsonl"), "--html", ws.p("report.html")]


def _working_meta(ws, out: Path, pid: int) -> None:
    import socket

    from paddle_scorer.runs.output_file import working_path

    work = working_path(out)
    work.write_text(ws.p("out.jsonl").read_text().splitlines(keepends=True)[0] if ws.p("out.jsonl").exists() else "")
    work.with_name(work.name + ".meta.json").write_text(json.dumps({"status": "running", "pid": pid,
                                                                     "host": socket.gethostname()}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@row("outputs", "report-on-a-killed-run-with-no-output-yet", 5, ("was killed", "--resume"))
def _(ws):
    _working_meta(ws, ws.p("out.jsonl"), _dead_pid())
    return ["report", ws.p("out.jsonl")]


@row("outputs", "report-on-a-killed-rerun-says-so-first", 0, ("note:", "killed", "previous complete output"),
     message_from="first")
def _(ws):
    out = ws.scored()
    _working_meta(ws, out, _dead_pid())
    return ["report", out]


def _live_process(ws) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ws.notes.setdefault("procs", []).append(proc)
    return proc


def _stop_processes(check=None):
    def done(ws, before, after, r):
        try:
            if check is not None:
                check(ws, before, after, r)
            else:
                assert after == before, f"files changed: {changed(before, after)}"
        finally:
            for proc in ws.notes.get("procs", []):
                proc.kill()
                proc.wait()

    return done


@row("outputs", "report-on-a-run-still-writing-says-so-first", 0, ("note:", "still writing", "process"),
     message_from="first", check=_stop_processes())
def _(ws):
    out = ws.scored()
    _working_meta(ws, out, _live_process(ws).pid)
    return ["report", out]


@row("outputs", "a-second-run-on-an-output-being-written-is-refused", 2, ("another paddle-scorer run", "is writing"),
     check=_stop_processes())
def _(ws):
    out = ws.scored()
    _working_meta(ws, out, _live_process(ws).pid)
    return classify(ws, "--overwrite")


@row("outputs", "report-when-the-meta-does-not-describe-the-file", 0, ("note:", "does not describe", "sha256"),
     message_from="first")
def _(ws):
    out = ws.scored()
    recs = read_jsonl(out)
    out.write_text("".join(json.dumps(r) + "\n" for r in recs[:-1]))  # a record lost after the fact
    return ["report", out]


@row("outputs", "report-on-a-record-with-a-non-numeric-probability", 2, ("out.jsonl:2", "not probabilities"))
def _(ws):
    out = ws.scored()
    recs = read_jsonl(out)
    recs[1]["probs"]["goods"] = "0.5"
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["report", out]


@row("outputs", "report-on-an-edited-file-whose-probabilities-sum-to-1.8", 2, ("out.jsonl:2", "sum to 1.8"))
def _(ws):
    out = ws.scored()
    ws.p("out.jsonl.meta.json").unlink()
    recs = read_jsonl(out)
    recs[1]["probs"] = {"goods": 0.9, "life": 0.9}
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["report", out]


@row("outputs", "merge-force-never-replaces-a-folder-of-notes", 2, ("--force", "notes.txt", "not an earlier merge"))
def _(ws):
    ws.p("my-notes").mkdir()
    ws.p("my-notes/notes.txt").write_text("mine\n")
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("my-notes"), "--force"]


@row("outputs", "merge-force-never-replaces-another-model", 2, ("--force", "model_state.pdparams", "not an earlier merge"))
def _(ws):
    shutil.copytree(builders.DEMO_BASE, ws.p("other-model"))
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("other-model"), "--force"]


@row("outputs", "merge-force-never-replaces-a-merge-output-with-added-files", 2,
     ("--force", "notes.txt", "did not write"))
def _(ws):
    r = cli("merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged"))
    assert r.exit_code == 0, r.output
    ws.p("merged/notes.txt").write_text("mine\n")
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged"), "--force"]


def _force_replaced(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert not removed and not added and modified <= {"merged/paddle_scorer_merge.json"}
    assert hidden_leftovers(ws.root) == []


@row("outputs", "merge-force-replaces-an-earlier-merge-output", 0, ("replaced the existing folder",),
     check=_force_replaced, message_from="any")
def _(ws):
    r = cli("merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged"))
    assert r.exit_code == 0, r.output
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged"), "--force"]


# ---------------------------------------------------------------------------- round 4 (the decoder's assumptions, caches)


def _long_query_records(words: int = 70) -> list[dict]:
    return [{"id": "long", "query": " ".join(["cabbage"] * words)}]


@row("data", "force-max-length-past-the-rotary-table", 2, ("position", "rotary table ends at 256", "--max-length 256"))
def _(ws):
    return classify(ws, "--max-length", "600", "--force-max-length", data=ws.data(records=_long_query_records()),
                    output=None)


@row("data", "force-max-length-past-the-rotary-table-library-forward", 2, ("rotary table ends at 256", "--max-length 256"),
     env={"PADDLE_SCORER_CPU_FORWARD": "library"})
def _(ws):
    return classify(ws, "--max-length", "600", "--force-max-length", data=ws.data(records=_long_query_records()),
                    output=None)


@row("data", "cpu-forward-typo-is-refused", 2, ("PADDLE_SCORER_CPU_FORWARD", "'libary'", "set it to library"),
     env={"PADDLE_SCORER_CPU_FORWARD": "libary"})
def _(ws):
    return classify(ws, output=None)


def _damaged_hash_cache(ws):
    ws.notes["umask"] = 0o027
    cache = ws.p("cache")
    cache.mkdir()
    (cache / "file-hashes.json").write_text(json.dumps({
        str(ws.base.resolve() / "model_state.pdparams"): {"key": [1, 2], "sha256": "0" * 64, "used": None},
        "/elsewhere/x": {"key": "nonsense", "sha256": 5, "used": "yesterday"}}))
    return cache


def _hash_cache_rewritten(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert {"out.jsonl", "out.jsonl.meta.json"} <= added and not removed
    entries = json.loads(ws.p("cache/file-hashes.json").read_text())
    assert "/elsewhere/x" not in entries  # the damaged entries were dropped, the weights hashed again
    assert stat.S_IMODE(ws.p("cache/file-hashes.json").stat().st_mode) == 0o640  # follows the umask (0o027)


@row("faults", "a-damaged-hash-cache-entry-is-ignored-not-fatal", 0, check=_hash_cache_rewritten)
def _(ws):
    cache = _damaged_hash_cache(ws)
    time.sleep(2.2)  # the copied weights must be older than fingerprints.RACY_SECONDS to be cached (and saved)
    ws.notes["cache"] = cache
    return classify(ws)


# ---------------------------------------------------------------------------- faults (injected)


def _fail_fsync(at: int, code: int):
    """os.fsync raises OSError(code) on its ``at``-th call (1-based): the disk filled up at that moment."""

    def patch(mp, ws):
        real = os.fsync
        calls = {"n": 0}

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == at:
                raise OSError(code, os.strerror(code))
            return real(fd)

        mp.setattr(os, "fsync", fsync)

    return patch


def _disk_full_while_scoring(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert not removed and not modified  # the old output and its meta are untouched
    assert added <= {".out.jsonl.inprogress", ".out.jsonl.inprogress.meta.json"}  # only the resumable working file
    again = cli(*classify(ws, "--resume", "--batch-size", 2, data=ws.p("in.jsonl")))  # space freed: resume finishes
    assert again.exit_code == 0, again.output
    assert [x["id"] for x in read_jsonl(ws.p("out.jsonl"))] == [x["id"] for x in default_records(6)]
    assert hidden_leftovers(ws.root) == []


@row("faults", "disk-full-while-scoring", 6, ("No space left on device", "disk is full", "--resume"),
     patch=_fail_fsync(3, errno.ENOSPC), check=_disk_full_while_scoring)
def _(ws):
    ws.scored(data=ws.data(records=default_records(3)))
    return classify(ws, "--overwrite", "--batch-size", 2, data=ws.data(records=default_records(6)))


@row("faults", "disk-full-while-publishing-the-output", 6, ("No space left on device", "disk is full"),
     patch=_fail_fsync(5, errno.ENOSPC), check=_disk_full_while_scoring)
def _(ws):
    ws.scored(data=ws.data(records=default_records(3)))
    # fsync calls: 1 working meta, 2-4 three blocks of 2, 5 the rewritten output (publish)
    return classify(ws, "--overwrite", "--batch-size", 2, data=ws.data(records=default_records(6)))


def _read_only_mkstemp(mp, ws):
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve() == (ws.root / "ro").resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **kw)

    mp.setattr(tempfile, "mkstemp", mkstemp)


@row("faults", "read-only-output-folder", 6, ("Read-only file system", "write to another place"),
     patch=_read_only_mkstemp)
def _(ws):
    ws.p("ro").mkdir()
    return classify(ws, output="ro/out.jsonl")


def _merge_disk_full(mp, ws):
    import paddle_scorer.tasks.merge as merging

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(merging, "_write_tensors", full)


@row("faults", "disk-full-during-merge-leaves-nothing", 6, ("No space left on device",), patch=_merge_disk_full)
def _(ws):
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged")]


def _stale_merge_folders(ws, before, after, r):
    assert ws.p("merged/model.safetensors").is_file()
    assert not ws.p(f".merged.tmp-{ws.notes['dead']}").exists()  # a dead process's leftovers are removed
    assert ws.p(f".merged.tmp-{ws.notes['live']}").is_dir()  # a live process's folder is never touched


@row("faults", "merge-removes-stale-temp-folders-of-dead-processes-only", 0,
     ("note:", "removed .merged.tmp-", "is gone"), check=_stop_processes(_stale_merge_folders), message_from="first")
def _(ws):
    dead = _dead_pid()
    (ws.p(f".merged.tmp-{dead}")).mkdir()
    (ws.p(f".merged.tmp-{dead}") / "model.safetensors").write_bytes(b"half")
    live = _live_process(ws).pid
    ws.p(f".merged.tmp-{live}").mkdir()
    ws.notes.update(dead=dead, live=live)
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged")]


def _restored(ws, before, after, r):
    assert ws.p("merged/model.safetensors").read_bytes() == ws.notes["previous"]  # the previous merge is back
    assert hidden_leftovers(ws.root) == []


@row("faults", "merge-killed-between-its-renames-gets-its-previous-output-back", 2,
     ("already exists", "--force"), check=_restored)
def _(ws):
    r = cli("merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged"))
    assert r.exit_code == 0, r.output
    ws.notes["previous"] = ws.p("merged/model.safetensors").read_bytes()
    dead = _dead_pid()  # the state a --force merge leaves when SIGKILLed between rename(out, old) and rename(tmp, out)
    os.rename(ws.p("merged"), ws.p(f".merged.old-{dead}"))
    shutil.copytree(ws.p(f".merged.old-{dead}"), ws.p(f".merged.tmp-{dead}"))
    return ["merge", "--model", ws.base, "--lora", ws.lora, "--out", ws.p("merged")]


def _no_paddle(mp, ws):
    from paddle_scorer.process import environment

    mp.setitem(sys.modules, "paddle", None)  # `import paddle` raises ModuleNotFoundError(name="paddle")
    environment.paddle.cache_clear()
    ws.notes["cache_clear"] = environment.paddle.cache_clear


def _no_paddle_checked(ws, before, after, r):
    ws.notes["cache_clear"]()  # the next row imports the real paddle again
    assert after == before


@row("faults", "an-environment-without-paddle-says-how-to-install-it", 2,
     ("paddle is not installed", "pip install", "gpu"), patch=_no_paddle, check=_no_paddle_checked)
def _(ws):
    return classify(ws, output=None)


# --------------------------------------------------------------------------------------------------
# Running the table
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_hostile(case: Row, tmp_path, monkeypatch):
    run_row(case, tmp_path, monkeypatch)


def test_the_table_is_big_enough():
    assert len(ROWS) >= 40
    assert {r.group for r in ROWS} == {"checkpoint", "data", "outputs", "faults"}


# --------------------------------------------------------------------------------------------------
# Signals to real processes, by pid
# --------------------------------------------------------------------------------------------------

# Put on the subprocess' path: pauses the CLI at a known point (after the first block is flushed, or
# after a merge's files are written and before they are renamed into place) and says so with a file.
SITECUSTOMIZE = '''
import os, time
_where, _marker = os.environ.get("HOSTILE_PAUSE", ""), os.environ.get("HOSTILE_MARKER", "")
if _where == "classify":
    import paddle_scorer.runs.output_file as _o
    _real = _o.RunOutput.write_batch
    def _write_batch(self, records, positions):
        _real(self, records, positions)
        open(_marker, "w").close()
        time.sleep(120)
    _o.RunOutput.write_batch = _write_batch
elif _where == "merge":
    import paddle_scorer.tasks.merge as _m
    _real = _m.write_side_files
    def _write_side_files(*a, **kw):
        out = _real(*a, **kw)
        open(_marker, "w").close()
        time.sleep(120)
        return out
    _m.write_side_files = _write_side_files
elif _where == "verify":  # merge --verify, in the middle of the comparison (paddle and the models loaded)
    import paddle_scorer.tasks.merge as _m
    _real = _m._logprobs
    def _logprobs(*a, **kw):
        open(_marker, "w").close()
        time.sleep(120)
        return _real(*a, **kw)
    _m._logprobs = _logprobs
elif _where.startswith("import-"):  # while a module is being imported (paddle's import installs C handlers)
    import sys
    _name = _where[len("import-"):]
    class _PauseOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == _name:
                sys.meta_path.remove(self)
                open(_marker, "w").close()
                time.sleep(4)  # the signal arrives now; the import then goes on
            return None
    sys.meta_path.insert(0, _PauseOnImport())
'''


def start_paused(tmp: Path, where: str, tag: str, *args) -> tuple[subprocess.Popen, Path]:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp / f"paused-{tag}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(SRC)]), "HOSTILE_PAUSE": where,
           "HOSTILE_MARKER": str(marker)}
    env = {k: v for k, v in env.items() if not k.startswith("PADDLE_TRAINER")}
    proc = subprocess.Popen([sys.executable, "-m", "paddle_scorer", *map(str, args)], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def wait_for(marker: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process ended before pausing: {p.communicate()}")
        assert time.time() < deadline, "the process never reached its pause point"
        time.sleep(0.05)


def test_sigterm_and_sigkill_of_a_running_classify_by_pid(tmp_path):
    """Both signals: the old output survives untouched, the first block is in the hidden working file,
    nothing else appears, and --resume finishes with every id once."""
    ws = WS(tmp_path)
    data = ws.data(records=default_records(6))
    runs = {}
    for sig in ("TERM", "KILL"):
        out = ws.p(f"{sig}.jsonl")
        ws.scored(out.name, data=ws.data(f"old-{sig}.jsonl", records=default_records(2)))
        runs[sig] = out, out.read_bytes(), snapshot(ws.root)
    procs = {sig: start_paused(tmp_path, "classify", sig, "classify", *ws.demo(), "--input", data, "--output",
                               runs[sig][0], "--overwrite", "--batch-size", 2) for sig in runs}
    for sig, (proc, marker) in procs.items():
        wait_for(marker, [p for p, _ in procs.values()])
    procs["TERM"][0].send_signal(signal.SIGTERM)
    procs["KILL"][0].send_signal(signal.SIGKILL)
    results = {sig: (p.wait(timeout=120), p.communicate()) for sig, (p, _) in procs.items()}
    code, (stdout, stderr) = results["TERM"]
    assert code == 130, stderr
    assert "Traceback" not in stderr + stdout
    assert message_lines(stderr) == ["interrupted: existing outputs were not replaced; rerun with --resume to continue."]
    assert results["KILL"][0] == -signal.SIGKILL
    for sig, (out, old_bytes, _) in runs.items():
        assert out.read_bytes() == old_bytes  # the old output, untouched
        work = ws.p(f".{out.name}.inprogress")
        assert len(read_jsonl(work)) == 2  # exactly the flushed block
        r = cli("classify", *ws.demo(), "--input", data, "--output", out, "--resume")
        assert r.exit_code == 0, r.output
        assert "2 already done" in r.stdout
        assert [x["id"] for x in read_jsonl(out)] == [x["id"] for x in default_records(6)]
        assert not work.exists() and not work.with_name(work.name + ".meta.json").exists()
    assert [p for p in hidden_leftovers(tmp_path) if not p.startswith(("hook", "paused"))] == []


def test_sigterm_and_sigkill_of_a_running_merge_by_pid(tmp_path):
    """SIGTERM: nothing visible and nothing hidden left. SIGKILL: nothing visible; the hidden temporary
    folder of the dead process is removed by the next merge to the same --out, which then succeeds."""
    ws = WS(tmp_path)
    base, lora = ws.base, ws.lora
    procs = {sig: start_paused(tmp_path, "merge", sig, "merge", "--model", base, "--lora", lora, "--out",
                               ws.p(f"m-{sig}")) for sig in ("TERM", "KILL")}
    for sig, (proc, marker) in procs.items():
        wait_for(marker, [p for p, _ in procs.values()])
    pids = {sig: p.pid for sig, (p, _) in procs.items()}
    assert ws.p(f".m-TERM.tmp-{pids['TERM']}").is_dir()  # mid-merge: only the hidden folder exists
    procs["TERM"][0].send_signal(signal.SIGTERM)
    procs["KILL"][0].send_signal(signal.SIGKILL)
    term_code, (stdout, stderr) = procs["TERM"][0].wait(timeout=60), procs["TERM"][0].communicate()
    assert term_code == 130 and "Traceback" not in stdout + stderr
    assert message_lines(stderr) and "nothing was written" in message_lines(stderr)[0]
    assert procs["KILL"][0].wait(timeout=60) == -signal.SIGKILL
    assert not ws.p("m-TERM").exists() and not ws.p(f".m-TERM.tmp-{pids['TERM']}").exists()
    assert not ws.p("m-KILL").exists()
    stale = ws.p(f".m-KILL.tmp-{pids['KILL']}")
    assert stale.is_dir()  # SIGKILL cannot be caught: the hidden folder stays, nothing visible
    r = cli("merge", "--model", base, "--lora", lora, "--out", ws.p("m-KILL"))
    assert r.exit_code == 0, r.output
    assert f"removed .m-KILL.tmp-{pids['KILL']}" in r.stderr and "is gone" in r.stderr
    assert not stale.exists() and (ws.p("m-KILL") / "model.safetensors").is_file()
    assert [p for p in hidden_leftovers(tmp_path) if not p.startswith(("hook", "paused"))] == []


@pytest.mark.parametrize("moment", ["import-paddle", "import-paddle.nn", "import-paddlenlp", "verify"])
def test_sigterm_during_merge_verify_at_every_moment(tmp_path, moment):
    """`kill PID` while `merge --verify` imports paddle, imports the model library, or compares the models:
    always "interrupted", exit 130, and neither --out nor the hidden temporary folder is left."""
    ws = WS(tmp_path)
    proc, marker = start_paused(tmp_path, moment, moment, "merge", "--model", ws.base, "--lora", ws.lora, "--out",
                                ws.p("merged"), "--verify")
    wait_for(marker, [proc])
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    stdout, stderr = proc.communicate()
    assert code == 130, stderr
    assert "Traceback" not in stdout + stderr and "internal error" not in stderr
    lines = message_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "nothing was written" in lines[0], stderr
    assert not ws.p("merged").exists()
    assert [p for p in hidden_leftovers(tmp_path) if not p.startswith(("hook", "paused"))] == []


@pytest.mark.parametrize("failing", ["nlp", "formers", "both", "none"])
def test_make_test_runs_both_suites_and_fails_if_either_fails(tmp_path, failing):
    """`make test`'s last step with stand-in interpreters: both suites run whatever the first one did, the
    summary line gives both exit codes, and make fails exactly when one of them failed."""
    if shutil.which("make") is None:
        pytest.fail("make is needed: the README's test command is `make test`")
    fakes = {}
    for suite in ("nlp", "formers"):
        code = 3 if failing in (suite, "both") else 0
        fake = tmp_path / f"python-{suite}"
        fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / ('ran-' + suite)}\nexit {code}\n")
        fake.chmod(0o755)
        fakes[suite] = fake
    p = subprocess.run(["make", "--no-print-directory", "-C", str(SRC.parent), "test-suites", f"PY={fakes['nlp']}",
                        f"FPY={fakes['formers']}"], capture_output=True, text=True, timeout=60)
    assert (tmp_path / "ran-nlp").read_text().split()[:2] == ["-m", "pytest"]
    assert "tests/formers" in (tmp_path / "ran-formers").read_text()
    nlp, formers = (3 if failing in (s, "both") else 0 for s in ("nlp", "formers"))
    assert f"PaddleNLP suite (.venv) exit {nlp}, PaddleFormers suite (.venv-formers) exit {formers}" in p.stdout
    assert (p.returncode != 0) == (failing != "none"), p.stdout + p.stderr
