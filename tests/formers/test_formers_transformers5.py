"""Checkpoints saved by transformers 5 (the version PaddleFormers brings) in its own dialect: ``rope_parameters``
(per layer type for Gemma 3), experts and windows as it writes them. Each tiny model is built and saved by
transformers 5 in a fresh interpreter (importing paddleformers turns transformers' torch off in this one), scored here
by the decoder and held to transformers 5's own forward on the same files within 1e-5 per label token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from formers import pf_families as pf
from paddle_scorer.cli.app import app

TESTS = Path(__file__).resolve().parents[1]
TOL = 1e-5
# family -> config overrides for transformers 5 (family_fixtures' kwargs in the 4.x spelling are converted by it)
CASES = {
    "llama": {},
    "qwen2": {},
    "qwen3_window": {"family": "qwen3", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                     "rope_scaling": None},
    "mistral_window": {"family": "mistral", "sliding_window": 8},
    "phi3": {},
    "gemma3_window": {"family": "gemma3", "sliding_window": 8},
    "gpt_oss_window": {"family": "gpt_oss", "sliding_window": 8},
}
_BUILD = """
import json, sys
sys.modules["torchcodec"] = None  # paddlecodec installs a torchcodec module without its metadata: transformers trips
sys.path.insert(0, {tests!r})
import family_fixtures as ff
req = json.load(sys.stdin)
ff.build_hf(req["family"], __import__("pathlib").Path(req["folder"]), **req["overrides"])
"""


def build_with_transformers5(name: str, folder: Path) -> Path:
    overrides = dict(CASES[name])
    family = overrides.pop("family", name)
    req = json.dumps({"family": family, "folder": str(folder), "overrides": overrides})
    r = subprocess.run([sys.executable, "-c", _BUILD.format(tests=str(TESTS))], input=req, text=True,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


_REFERENCE: dict = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers5")
    return {name: build_with_transformers5(name, root / name) for name in CASES}


@pytest.mark.parametrize("execution", ["in-ram", "streamed"])
@pytest.mark.parametrize("name", list(CASES))
def test_transformers5_checkpoints_equal_its_forward(saved, tmp_path, name, execution, deltas):
    folder = saved[name]
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_scaling" not in cfg  # transformers 5's dialect, as saved
    if name.startswith("gemma3"):
        assert set(cfg["rope_parameters"]) == {"full_attention", "sliding_attention"}  # per layer type
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(app, ["classify", "--model", str(folder), "--labels", "goods,life,goods and things",
                                 "--template", "Query: {query}\nIs this query about goods or life? Answer:",
                                 "--input", str(pf.fb.REPO / "checkpoints" / "demo-queries.jsonl"), "--limit", "3",
                                 "--output", str(out), "--execution", execution])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in open(out)]
    seqs, where = [], []
    for rec in recs:
        for label, ids in rec["label_token_ids"].items():
            seqs.append(rec["prompt_token_ids"] + ids)
            where.append((rec, label, ids))
    key = (name, json.dumps(seqs))
    if key not in _REFERENCE:  # both executions score the same sequences: one transformers run for the two
        _REFERENCE[key] = pf.hf_logprobs(folder, seqs, tmp_path)
    ref = _REFERENCE[key]
    worst = 0.0
    for (rec, label, ids), lp in zip(where, ref):
        n = len(rec["prompt_token_ids"])
        want = sum(lp[n - 1 + t, tok] for t, tok in enumerate(ids))
        worst = max(worst, abs(rec["logprobs"][label] - want) / len(ids))
    if "window" in name:
        assert min(len(r["prompt_token_ids"]) for r in recs) > 8  # past the window
    assert deltas.record(f"formers env: {name} saved by transformers 5 ({execution}) vs its forward", worst) <= TOL
