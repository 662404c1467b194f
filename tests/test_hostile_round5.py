"""Hostile cases, round 5: checkpoints that contradict themselves (declared biases missing, undeclared ones, a tied
head that differs, two rotary dialects that disagree, top-k past the experts, config sizes nothing backs, safetensors
entries that share bytes or a name), adapters whose target_modules disagree with their tensors, a fused projection's
missing part named in the file's own names, two runs on one output, lines that never end. Same table and promises as
tests/test_hostile.py (tests/hostile_table.py): exit code, one message line with the key words, no traceback, and
nothing changed on disk by a refusal."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import family_fixtures as ff
from hostile_table import WS, Row, Table, changed, classify, run_row
from paddle_scorer.runs.output_lock import lock_path

TABLE = Table()
row = TABLE.row
ROWS = TABLE.rows
_BUILT: dict = {}


def family(ws: WS, name: str, **overrides) -> Path:
    """A copy (in the row's workspace) of the tiny transformers-saved model of ``name`` (built once per session)."""
    key = (name, json.dumps(overrides, sort_keys=True))
    if key not in _BUILT:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix=f"hostile5-{name}-"))
        ff.build_hf(name, folder / "m", **overrides)
        _BUILT[key] = folder / "m"
    dst = ws.root / name
    shutil.copytree(_BUILT[key], dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def scored(folder: Path, ws: WS, *extra) -> list:
    return ["classify", "--model", folder, "--labels", "goods,life", "--input", ws.data(), *extra]


def rewrite_header(path: Path, change) -> None:
    """Rewrite a safetensors header (``change(header_text) -> text``), its data block untouched."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    text = change(raw[8:8 + n].decode())
    body = text.encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def _same_shape_pair(header: dict) -> tuple[str, str]:
    names = sorted(k for k, v in header.items() if k != "__metadata__" and k.endswith("layernorm.weight"))
    return names[0], names[1]


# ---------------------------------------------------------------------------- tensors the config accounts for


@row("checkpoint", "declared-qkv-bias-missing-in-one-layer", 4,
     ("model.layers.1.self_attn.k_proj.bias", "missing", "declares this bias"), message_from="any")
def _(ws):
    m = family(ws, "qwen2")
    edit_tensors(m, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    return scored(m, ws)


@row("checkpoint", "undeclared-bias-on-a-mixtral", 4, ("model.layers.0.self_attn.q_proj.bias", "does not declare"), message_from="any")
def _(ws):
    m = family(ws, "mixtral")
    edit_tensors(m, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.ones(64, np.float32)))
    return scored(m, ws)


@row("checkpoint", "tied-head-that-differs-from-the-embedding", 4,
     ("tie_word_embeddings true", "lm_head.weight", "differs from model.embed_tokens.weight"))
def _(ws):
    m = family(ws, "qwen2")  # tie_word_embeddings: true, saved without a head
    edit_tensors(m, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + np.float32(0.01)))
    return scored(m, ws)


def _scored_ok(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert not removed and not modified and added == set(), (added, removed, modified)
    assert '"prediction"' in r.stdout


@row("checkpoint", "tied-head-stored-equal-to-the-embedding-is-fine", 0, check=_scored_ok)
def _(ws):
    m = family(ws, "qwen2")
    edit_tensors(m, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    return scored(m, ws, "--json")


@row("checkpoint", "fused-projection-part-missing-named-in-the-files-names", 4,
     ("model.layers.0.self_attn.k_proj.bias: missing", "q_proj.bias and v_proj.bias are there"), message_from="any")
def _(ws):
    m = family(ws, "glm4_moe")  # attention_bias: q/k/v biases, fused into qkv_proj at run time
    edit_tensors(m, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    return ["inspect", m]


@row("checkpoint", "one-experts-up-proj-missing-named-in-the-files-names", 4,
     ("experts.3.up_proj.weight: missing", "gate_proj.weight is there"), message_from="any")
def _(ws):
    m = family(ws, "qwen3_moe")
    edit_tensors(m, lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    return scored(m, ws)


# ---------------------------------------------------------------------------- config.json contradicting itself


@row("checkpoint", "rope-parameters-and-rope-scaling-disagree", 7,
     ("rope_parameters.factor 2.0", "rope_scaling.factor 4.0", "says one thing"))
def _(ws):
    m = family(ws, "qwen2")
    edit_config(m, rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 1000000.0})
    return scored(m, ws)


@row("checkpoint", "rope-theta-at-the-top-and-in-rope-parameters-disagree", 7,
     ("rope_theta 10000.0", "rope_parameters.rope_theta 500000.0"))
def _(ws):
    m = family(ws, "llama")  # saved in transformers 5's spelling
    edit_config(m, rope_theta=10000.0)
    return scored(m, ws)


@row("checkpoint", "paddlenlp-rope-scaling-type-against-a-transformers-rope-type", 7,
     ("rope_scaling_type 'linear'", "'yarn' rope type"))
def _(ws):
    m = family(ws, "qwen2")
    edit_config(m, rope_scaling_type="linear", rope_scaling_factor=2.0)
    return scored(m, ws)


@row("checkpoint", "a-rope-type-the-decoder-does-not-compute", 7, ("rope type 'dynamic'",))
def _(ws):
    m = family(ws, "qwen2")
    edit_config(m, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    return scored(m, ws)


@row("checkpoint", "longrope-factors-of-the-wrong-length", 7, ("longrope short_factor", "one positive number per rotated "
                                                                 "frequency: 8"))
def _(ws):
    m = family(ws, "qwen2")
    edit_config(m, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
                original_max_position_embeddings=64)
    return scored(m, ws)


@row("checkpoint", "gpt-oss-mxfp4-scales-of-the-wrong-shape", 4, ("gate_up_proj_scales", "shape"))
def _(ws):
    m = family(ws, "gpt_oss")

    def quantize(t):
        w = t.pop("model.layers.0.mlp.experts.gate_up_proj")
        E, n_in, n_out = w.shape
        t["model.layers.0.mlp.experts.gate_up_proj_blocks"] = np.zeros((E, n_out, n_in // 32, 16), np.uint8)
        t["model.layers.0.mlp.experts.gate_up_proj_scales"] = np.zeros((E, n_out, n_in // 32 + 1), np.uint8)
    edit_tensors(m, quantize)
    return scored(m, ws)


@row("checkpoint", "top-k-above-the-expert-count", 7, ("num_experts_per_tok 5", "4 experts"))
def _(ws):
    m = family(ws, "mixtral")
    edit_config(m, num_experts_per_tok=5)
    return scored(m, ws)


@row("checkpoint", "absurd-hidden-size", 4, ("hidden_size 1,000,000,000", "embedding"))
def _(ws):
    edit_config(ws.base, hidden_size=10**9)
    return classify(ws, output=None)


@row("checkpoint", "absurd-layer-count-inspect", 4, ("num_hidden_layers 1,000,000", "4 decoder layer(s)"))
def _(ws):
    edit_config(ws.base, num_hidden_layers=10**6)
    return ["inspect", ws.base]


@row("checkpoint", "absurd-layer-count-classify", 4, ("num_hidden_layers 10,000,000",))
def _(ws):
    edit_config(ws.base, num_hidden_layers=10**7)
    return classify(ws, output=None)


@row("checkpoint", "a-layer-missing-between-the-ones-held-names-the-layer", 4,
     ("num_hidden_layers 4", "without layer(s) 1", "add the missing shards"))
def _(ws):
    from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

    path = ws.base / "model_state.pdparams"
    sd = read_pdparams(path)
    write_pdparams({k: v for k, v in sd.items() if ".layers.1." not in k}, path)
    return ["inspect", ws.base]


@row("checkpoint", "absurd-context", 4, ("max_position_embeddings 1,000,000,000,000",))
def _(ws):
    edit_config(ws.base, max_position_embeddings=10**12)
    return classify(ws, output=None)


# ---------------------------------------------------------------------------- safetensors that lie


@row("checkpoint", "safetensors-two-entries-on-the-same-bytes", 4, ("shares bytes", "corrupt or crafted"))
def _(ws):
    m = family(ws, "mistral")

    def change(text):
        header = json.loads(text)
        a, b = _same_shape_pair(header)
        header[b]["data_offsets"] = header[a]["data_offsets"]
        return json.dumps(header)

    rewrite_header(m / "model.safetensors", change)
    return ["inspect", m]


@row("checkpoint", "safetensors-a-name-twice-in-the-header", 4, ("named twice", "corrupt or crafted"))
def _(ws):
    m = family(ws, "mistral")

    def change(text):
        header = json.loads(text)
        a, b = _same_shape_pair(header)
        return text.rstrip()[:-1] + f', "{a}": {json.dumps(header[b])}' + "}"

    rewrite_header(m / "model.safetensors", change)
    return scored(m, ws)


# ---------------------------------------------------------------------------- adapters


@row("checkpoint", "lora-target-modules-match-nothing", 4, ("target_modules", "match no module"), message_from="any")
def _(ws):
    ws.lora_config(target_modules=[".*query_key_value.*"])
    return classify(ws, output=None)


@row("checkpoint", "lora-targets-only-q-proj-while-the-file-adapts-seven", 4,
     ("do not match it", "PaddleNLP's LoRAModel would not apply them"), message_from="any")
def _(ws):
    ws.lora_config(target_modules=[".*q_proj.*"])
    return classify(ws, output=None)


# ---------------------------------------------------------------------------- runs and inputs


def _hold_the_output(monkeypatch, ws):
    """Another run holds the output (started a moment ago: nothing of it on disk yet but its lock)."""
    fd = os.open(lock_path(ws.p("out.jsonl")), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ws.notes["held"] = fd


def _nothing_touched_then_release(ws, before, after, r):
    assert after == before, changed(before, after)
    os.close(ws.notes["held"])


@row("outputs", "a-second-run-on-an-output-another-run-holds", 2, ("another paddle-scorer run is writing", "out.jsonl"),
     patch=_hold_the_output, check=_nothing_touched_then_release)
def _(ws):
    return classify(ws)


@row("data", "a-line-longer-than-max-line-size", 2, ("in.jsonl:2", "longer than 1,048,576 bytes", "--max-line-size"))
def _(ws):
    big = json.dumps({"id": "big", "query": "cabbage " * 200_000}).encode()
    data = ws.data(raw=b'{"id": "a", "query": "apples"}\n' + big + b"\n")
    return classify(ws, "--max-line-size", "1MB", data=data, output=None)


@row("data", "a-line-past-the-default-limit-without-a-newline", 2, ("in.jsonl:1", "longer than 8,388,608 bytes"))
def _(ws):
    data = ws.data(raw=b'{"id": "x", "query": "' + b"a" * (9 << 20))
    return classify(ws, data=data, output=None)


@row("data", "max-line-size-without-a-unit", 2, ("--max-line-size", "has no unit"))
def _(ws):
    return classify(ws, "--max-line-size", "1000", output=None)


def test_the_lock_is_gone_after_a_run_and_a_stale_one_is_taken(tmp_path):
    from hostile_table import cli, hidden_leftovers

    ws = WS(tmp_path / "ws")
    ws.root.mkdir()
    lock_path(ws.p("out.jsonl")).write_text("")  # left by a killed run: nobody holds it
    r = cli(*classify(ws))
    assert r.exit_code == 0, r.output
    assert not lock_path(ws.p("out.jsonl")).exists() and hidden_leftovers(ws.root) == []


@row("checkpoint", "safetensors-an-entry-running-into-its-neighbour", 4, ("shares bytes", "corrupt or crafted"))
def _(ws):
    m = family(ws, "mistral")

    def change(text):
        header = json.loads(text)
        entries = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
        (b0, first), (_b1, second) = entries[0], entries[1]
        e0 = header[first]["data_offsets"][1]
        length = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [e0 - 4, e0 - 4 + length]  # starts 4 bytes inside the entry before it
        return json.dumps(header)

    rewrite_header(m / "model.safetensors", change)
    return ["inspect", m]


def test_two_real_runs_on_one_output_the_second_is_refused_and_the_first_keeps_its_file(tmp_path):
    """Two processes on one --output: the second, started while the first is scoring, is refused with one sentence
    and touches nothing; the first's working file holds its own records only, and --resume finishes it."""
    import signal

    from hostile_table import cli, default_records, hidden_leftovers, message_lines, read_jsonl, snapshot
    from test_hostile import start_paused, wait_for

    ws = WS(tmp_path)
    data = ws.data(records=default_records(6))
    out = ws.p("out.jsonl")
    first, marker = start_paused(tmp_path, "classify", "first", "classify", *ws.demo(), "--input", data, "--output",
                                 out, "--batch-size", 2)
    try:
        wait_for(marker, [first])
        before = snapshot(ws.root)
        second = subprocess.run([sys.executable, "-m", "paddle_scorer", "classify", *map(str, ws.demo()), "--input",
                                 str(data), "--output", str(out)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
        assert second.returncode == 2 and "Traceback" not in second.stderr
        lines = message_lines(second.stderr)
        assert len(lines) == 1 and "another paddle-scorer run" in lines[0] and "out.jsonl" in lines[0], second.stderr
        assert snapshot(ws.root) == before  # the second run touched nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert len(read_jsonl(ws.p(".out.jsonl.inprogress"))) == 2  # the first run's own block, nothing of the second
    r = cli("classify", *ws.demo(), "--input", data, "--output", out, "--resume")
    assert r.exit_code == 0, r.output
    assert [x["id"] for x in read_jsonl(out)] == [x["id"] for x in default_records(6)]
    assert [p for p in hidden_leftovers(tmp_path) if not p.startswith(("hook", "paused"))] == []


@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_hostile_round5(case: Row, tmp_path, monkeypatch):
    run_row(case, tmp_path, monkeypatch)
