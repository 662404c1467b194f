"""Running the real CLI in-process (typer's runner) and reading what classify wrote: shared by the test modules that
compare forwards and kernels through the CLI."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from paddle_scorer.cli.app import app

runner = CliRunner()


def run(*args, env=None):
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code == 0, r.output
    return r


def classify(tmp_path, name, *args, env=None):
    out = tmp_path / f"{name}.jsonl"
    run("classify", *args, "--output", out, env=env)
    recs = [json.loads(line) for line in open(out)]
    return recs, json.loads(out.with_name(out.name + ".meta.json").read_text())


def logprobs(recs):
    return np.array([list(r["logprobs"].values()) for r in recs])
