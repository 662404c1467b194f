"""doctor in the PaddleFormers virtualenv: the library it builds with is reported, a missing paddlenlp is not an error."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from paddle_scorer.cli.app import app

runner = CliRunner()


def test_doctor_reports_paddleformers_and_does_not_want_paddlenlp():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    libs = data["libraries"]
    assert libs["paddleformers"] == {"installed": True, "version": "1.2.0", "import_ok": True, "error": None,
                                     "architectures": ["LlamaForCausalLM", "Ernie4_5ForCausalLM",
                                                       "Ernie4_5_MoeForCausalLM"]}
    assert libs["paddlenlp"]["installed"] is False and data["packages"]["paddlenlp"] is None
    assert data["ok"] is True and not [f for f in data["findings"] if f["level"] == "error"]
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0
    assert re.search(r"^model library paddleformers\s+1\.2\.0, import ok", r.stdout, re.M)
    assert re.search(r"^model library paddlenlp\s+not installed", r.stdout, re.M)
