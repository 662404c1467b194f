"""peft 0.22 adapters on bases saved by transformers 5 (the version PaddleFormers brings), in the PaddleFormers
environment: each base and adapter built and saved in a fresh interpreter (importing paddleformers turns transformers'
torch off in this one), scored here attached (in RAM and streamed) and merged, and held to peft's own forward on the
same files (``PeftModel.from_pretrained``) within 1e-5 per label token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from formers import pf_families as pf
from paddle_scorer.cli.app import app

TESTS = Path(__file__).resolve().parents[1]
TOL = 1e-5
LABELS = "goods,life,goods and things"
TEMPLATE = "Query: {query}\nIs this query about goods or life? Answer:"
CASES = ["llama_dora", "qwen3_regex"]  # peft_fixtures.ADAPTERS: DoRA + patterns + lm_head; regex target + rsLoRA
_BUILD = """
import json, sys
sys.modules["torchcodec"] = None  # paddlecodec installs a torchcodec module without its metadata: transformers trips
sys.path.insert(0, {tests!r})
from pathlib import Path
import peft_fixtures as pf
req = json.load(sys.stdin)
family, overrides, config = pf.ADAPTERS[req["name"]]
base = pf.build_base(family, Path(req["folder"]) / "base", overrides)
pf.build_adapter(base, Path(req["folder"]) / "peft", config)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft5")
    for name in CASES:
        r = subprocess.run([sys.executable, "-c", _BUILD.format(tests=str(TESTS))],
                           input=json.dumps({"name": name, "folder": str(root / name)}), text=True,
                           capture_output=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", CASES)
def test_peft_adapters_on_transformers5_bases_equal_peft(saved, tmp_path, name, deltas):
    base, adapter = saved / name / "base", saved / name / "peft"
    assert "rope_parameters" in json.loads((base / "config.json").read_text())  # saved by transformers 5
    reference = None
    for extra in (["--execution", "in-ram"], ["--execution", "streamed"], ["--mode", "merge"]):
        out = tmp_path / "out.jsonl"
        r = CliRunner().invoke(app, ["classify", "--model", str(base), "--lora", str(adapter), "--labels", LABELS,
                                     "--template", TEMPLATE, "--input", str(pf.fb.REPO / "checkpoints" /
                                                                            "demo-queries.jsonl"),
                                     "--limit", "3", "--output", str(out), "--overwrite", *extra])
        assert r.exit_code == 0, r.output
        recs = [json.loads(x) for x in open(out)]
        seqs = [rec["prompt_token_ids"] + ids for rec in recs for ids in rec["label_token_ids"].values()]
        if reference is None:
            reference = pf.hf_logprobs(base, seqs, tmp_path, adapter=adapter)
        worst, i = 0.0, 0
        for rec in recs:
            n = len(rec["prompt_token_ids"])
            for label, ids in rec["label_token_ids"].items():
                want = sum(reference[i][n - 1 + t, tok] for t, tok in enumerate(ids))
                worst = max(worst, abs(rec["logprobs"][label] - want) / len(ids))
                i += 1
        assert deltas.record(f"formers env: peft {name} on a transformers 5 base ({' '.join(extra)}) vs peft",
                             worst) <= TOL
