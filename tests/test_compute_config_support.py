"""config_support: every config field the library's forward reads is classified, and a field the decoder does not
implement sends the model to the library's forward with the reason (round 4: a Qwen2 with ``hidden_act: gelu``
was computed with SiLU, 0.34 off in log-prob)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
import library_reads
from paddle_scorer.compute import config_support
from paddle_scorer.compute import decoder
from paddle_scorer.cli.app import app

runner = CliRunner()
def test_every_field_the_library_reads_is_classified():
    missing = library_reads.unclassified(config_support.KNOWN)
    assert not missing, (f"the library's forward reads config fields config_support does not classify: "
                         f"{sorted(missing)}; add each to IMPLEMENTED, INERT or CHECKED")


def test_the_source_reader_finds_reads(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('a = config.hidden_act\nb = getattr(self.config, "alibi", 0)\nc = config.get("mlp_bias", 0)\n'
                   'd = config.to_dict()\n')
    assert library_reads.fields_read([src]) == {"hidden_act", "alibi", "mlp_bias"}


class Cfg:
    hidden_size, num_attention_heads, num_key_value_heads, rms_norm_eps = 32, 4, 2, 1e-6


@pytest.mark.parametrize("field,value,words", [
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("hidden_act", "relu", "hidden_act 'relu'"),
    ("alibi", True, "alibi"),
    ("use_long_sequence_strategies", True, "use_long_sequence_strategies"),
    ("use_fused_head_and_loss_fn", True, "use_fused_head_and_loss_fn"),
    ("use_fast_layer_norm", True, "use_fast_layer_norm"),
    ("rope", False, "rope false"),
])
def test_each_checked_field_sends_the_model_to_the_library(field, value, words):
    cfg = Cfg()
    setattr(cfg, field, value)
    for library, arch in (("paddlenlp", "Qwen2ForCausalLM"), ("paddlenlp", "LlamaForCausalLM"),
                          ("paddleformers", "LlamaForCausalLM")):
        spec, why = decoder.spec_for(library, arch, "model", cfg)
        assert spec is None and words in why


@pytest.mark.parametrize("field,value", [("hidden_act", "silu"), ("hidden_act", "swish"), ("alibi", False),
                                         ("rope", True), ("use_fast_layer_norm", False)])
def test_implemented_values_keep_the_decoder(field, value):
    cfg = Cfg()
    setattr(cfg, field, value)
    spec, why = decoder.spec_for("paddlenlp", "Qwen2ForCausalLM", "qwen2", cfg)
    assert why is None and spec is not None


def test_a_gelu_qwen2_is_scored_by_the_library_and_equals_it(tmp_path, deltas):
    """The example of round 4, through the CLI: the decoder is not used, provenance says why, the result is the
    library's."""
    model = builders.build_model("qwen2", seed=11, hidden_act="gelu")
    folder = builders.save_model(model, tmp_path / "gelu")
    assert json.loads((folder / "config.json").read_text())["hidden_act"] == "gelu"
    common = ["classify", "--model", folder, "--labels", "goods,life", "--input", builders.DEMO_QUERIES, "--limit", 4,
              "--template", builders.DEMO_SCORER["template"]]
    metas, lps = [], []
    for name, env in (("auto", None), ("lib", {"PADDLE_SCORER_CPU_FORWARD": "library"})):
        out = tmp_path / f"{name}.jsonl"
        r = runner.invoke(app, [str(a) for a in common + ["--output", out]], env=env)
        assert r.exit_code == 0, r.output
        metas.append(json.loads(out.with_name(out.name + ".meta.json").read_text()))
        lps.append(np.array([list(json.loads(x)["logprobs"].values()) for x in open(out)]))
    assert metas[0]["model"]["compute"] == {"forward": "library", "why": "hidden_act 'gelu' (the decoder computes SiLU)"}
    assert deltas.record("nlp env: gelu Qwen2, auto vs library forward", np.abs(lps[0] - lps[1]).max()) <= 1e-6
