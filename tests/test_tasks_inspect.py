"""`inspect` through the real CLI on real PaddleNLP checkpoints; assertions on the reported facts."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.checkpoint.weights import read_pdparams

runner = CliRunner()


def inspect_json(path):
    res = runner.invoke(app, ["inspect", str(path), "--json"])
    return res, (json.loads(res.stdout) if res.stdout.strip().startswith("{") else None)


def paddle_param_count(folder):
    return sum(int(np.prod(v.shape)) for v in read_pdparams(folder / "model_state.pdparams").values())


def test_full_fp32_model(models):
    res, info = inspect_json(models["llama"])
    assert res.exit_code == 0, res.output
    assert info["kind"] == "model"
    assert info["architecture"] == "LlamaForCausalLM"
    n = paddle_param_count(models["llama"])
    assert info["weights"]["num_params"] == n
    assert info["weights"]["dtypes"] == {"float32": n}
    assert info["memory"] == {"float32": 4 * n, "float16": 2 * n, "bfloat16": 2 * n}
    assert info["config"]["num_hidden_layers"] == 2
    assert "tokenizer_config.json" in info["tokenizer_files"]
    assert info["next_command"].startswith("paddle-scorer classify --model ")


def test_fp16_model_reports_stored_dtype_and_memory(models):
    res, info = inspect_json(models["llama16"])
    assert res.exit_code == 0
    n = paddle_param_count(models["llama16"])
    assert info["weights"]["dtypes"] == {"float16": n}
    assert info["config_dtype"] == "float16"
    assert info["weights"]["nbytes"] == 2 * n
    human = runner.invoke(app, ["inspect", str(models["llama16"])]).stdout
    assert "float16" in human and "memory to load" in human


def test_adapter_folder_says_what_it_is_which_base_and_next_command(models):
    res, info = inspect_json(models["llama_lora"])
    assert res.exit_code == 0
    assert info["kind"] == "lora-adapter"
    a = info["adapter"]
    assert (a["r"], a["lora_alpha"], a["scaling"], a["rslora"]) == (4, 8, 2.0, False)
    assert a["target_modules"] == [".*q_proj.*", ".*v_proj.*", ".*down_proj.*"]
    assert a["adapted_modules"] == 6  # 3 targets x 2 layers
    assert a["base_found"] == str(models["llama"].resolve())
    assert info["adapter_weights"]["dtypes"] == {"float32": info["adapter_weights"]["num_params"]}
    assert "not a model" in info["summary"] and "no model_state.pdparams" in info["summary"]
    assert f"--model {models['llama']}" in info["next_command"] or "--model " in info["next_command"]
    assert f"--lora {models['llama_lora']}" in info["next_command"]


def test_rslora_scaling_is_alpha_over_sqrt_r(models):
    _, info = inspect_json(models["llama_rslora"])
    assert info["adapter"]["scaling"] == pytest.approx(4 / np.sqrt(8))
    assert "sqrt" in info["adapter"]["scaling_formula"]


def test_adapter_whose_base_is_missing(models, copy_of):
    lora = copy_of(models["llama_lora"])
    cfg = json.loads((lora / "lora_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/llama-7b-chat"
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["inspect", str(lora)])
    assert res.exit_code == 0
    assert "acme/llama-7b-chat -> NOT found on this machine" in res.stdout
    assert "--model /path/to/llama-7b-chat" in res.stdout


def test_renamed_adapter_trap_is_called_out(models, tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    shutil.copy(models["llama_lora"] / "lora_model_state.pdparams", trap / "model_state.pdparams")
    shutil.copy(models["llama"] / "config.json", trap / "config.json")
    res, info = inspect_json(trap)
    assert res.exit_code == 4
    assert info["kind"] == "renamed-lora-adapter"
    assert "renamed lora_model_state.pdparams" in info["summary"]
    assert info["memory"] == {}
    assert info["next_command"].startswith("mv ")


def test_not_a_checkpoint_exits_non_zero(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    res = runner.invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 3
    assert "not a checkpoint" in res.stdout
    res = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 3 and "does not exist" in res.stderr


def test_pickle_payload_is_refused_by_inspect_and_runs_nothing(models, copy_of, tmp_path):
    folder = copy_of(models["llama"], "evil")
    marker = tmp_path / "pwned"
    builders.make_pickle_bomb(folder / "model_state.pdparams", marker)
    res = runner.invoke(app, ["inspect", str(folder)])
    assert res.exit_code == 4
    assert "posix.system" in res.stderr and "nothing was executed" in res.stderr
    assert "Traceback" not in res.output
    assert not marker.exists()


def test_bundled_demo_checkpoints():
    res, base = inspect_json(builders.DEMO_BASE)
    assert res.exit_code == 0
    assert base["kind"] == "model" and base["architecture"] == "LlamaForCausalLM"
    assert list(base["weights"]["dtypes"]) == ["float16"]
    res, lora = inspect_json(builders.DEMO_LORA)
    assert res.exit_code == 0 and lora["kind"] == "lora-adapter"
    assert lora["adapter"]["base_model_name_or_path"] == "../demo-base"
    assert lora["adapter"]["base_found"] == str(builders.DEMO_BASE.resolve())
    assert lora["scorer_defaults"]["labels"] == ["goods", "life"]
    assert "--labels goods,life" in lora["next_command"]
