"""smoke: the real CLI on the bundled demo and on the loader's broken folders; partial load; projection."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.errors import CheckpointError, UsageError, WeightMismatchError
from paddle_scorer.loader import load
from paddle_scorer.runtime import paddle
from paddle_scorer.smoke import Projection, gpu_command, parse_size, partial_params, project
from paddle_scorer.weights import read_files_meta, read_pdparams, write_pdparams

runner = CliRunner()
DEMO = ["--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA]
DEMO_LABELS = json.loads((builders.DEMO_LORA / "scorer.json").read_text())["labels"]
N_QUERIES = sum(1 for line in open(builders.DEMO_QUERIES) if line.strip())


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def smoke_json(*args):
    r = cli("smoke", *args, "--json")
    data = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    return r, data


def checks(data) -> dict:
    return {c["name"]: c for c in data["checks"]}


def status_line(stdout: str, name: str, status: str) -> bool:
    return re.search(rf"{re.escape(name)}\s*│\s*{status}\b", stdout) is not None


# ---------------------------------------------------------------- the bundled demo


@pytest.fixture(scope="module")
def demo_json():
    r, data = smoke_json(*DEMO, "--input", builders.DEMO_QUERIES, "--gpu-memory", "80GB")
    assert r.exit_code == 0, r.output
    return data


def test_demo_passes_every_check(demo_json):
    c = checks(demo_json)
    assert demo_json["passed"] is True and demo_json["path"] == "full"
    for name in ("model folder", "adapter folder", "adapter fits base", "tokenizer", "labels", "input", "fits in RAM",
                 "fits on GPU", "load", "prompts", "score", "probabilities finite", "probabilities sum to 1",
                 "output records", "attach vs merge"):
        assert c[name]["status"] == "PASS", (name, c[name])
    assert "from scorer.json" in c["labels"]["detail"]
    assert f"{N_QUERIES} records" in c["input"]["detail"]
    assert demo_json["attach_merge_max_abs_logprob_delta"] <= 1e-4
    # the demo base is stored in float16: the GPU run uses float16
    assert demo_json["gpu_command"] == (
        f"paddle-scorer classify --model {builders.DEMO_BASE} --lora {builders.DEMO_LORA} --labels goods,life "
        f"--input {builders.DEMO_QUERIES} --output out/demo-queries.scores.jsonl --device gpu --dtype float16")


def test_demo_text_output_and_exact_gpu_command():
    r = cli("smoke", *DEMO, "--input", builders.DEMO_QUERIES, "--limit", 3)
    assert r.exit_code == 0, r.output
    for name in ("model folder", "adapter fits base", "load", "probabilities sum to 1", "attach vs merge"):
        assert status_line(r.stdout, name, "PASS"), name
    assert "PASS: all" in r.stdout and "the job should work" in r.stdout
    assert "3 scored record(s)" in r.stdout
    assert "GPU run: paddle-scorer classify --model" in r.stdout and "--device gpu --dtype float16" in r.stdout


def test_projected_time_is_the_measured_time_per_record_times_the_dataset(demo_json):
    p = demo_json["projection"]
    assert p["measured_records"] == 5 and p["total_records"] == N_QUERIES
    assert p["seconds_per_record"] == pytest.approx(p["measured_seconds"] / 5)
    assert p["total_seconds"] == pytest.approx(p["measured_seconds"] / 5 * N_QUERIES)
    assert p["remaining_records"] == N_QUERIES - 5
    assert p["remaining_seconds"] == pytest.approx(p["seconds_per_record"] * (N_QUERIES - 5))
    score = checks(demo_json)["score"]["detail"]
    assert f"in {p['measured_seconds']:.3f}s" in score  # the same measurement the score check reports
    assert f"x {N_QUERIES} records" in checks(demo_json)["projected time"]["detail"]


def test_project_is_a_pure_function_of_the_measurement():
    assert project(2.0, 5, 150) == Projection(5, 2.0, 0.4, 150, 145, pytest.approx(58.0), pytest.approx(60.0))
    assert project(1.0, 10, 4).remaining_records == 0  # fewer records than measured: nothing left
    with pytest.raises(ValueError):
        project(1.0, 0, 10)


# ---------------------------------------------------------------- partial load


@pytest.mark.parametrize("limit,layers", [("2MB", 1), ("3MB", 2)])
def test_partial_pipeline_check_when_the_model_does_not_fit(limit, layers):
    r, data = smoke_json(*DEMO, "--input", builders.DEMO_QUERIES, "--memory-limit", limit)
    assert r.exit_code == 0, r.output
    c = checks(data)
    assert data["path"] == "partial" and data["partial_layers"] == layers
    assert c["fits in RAM"]["status"] == "WARN" and "pipeline, not the quality" in c["fits in RAM"]["detail"]
    assert c["load"]["status"] == "PASS" and "a pipeline check, not a quality check" in c["load"]["detail"]
    assert f"the first {layers} of 4 decoder layers" in c["load"]["detail"]
    for name in ("weights finite", "prompts", "score", "probabilities finite", "probabilities sum to 1",
                 "output records", "attach vs merge"):
        assert c[name]["status"] == "PASS", (name, c[name])
    assert c["projected time"]["status"] == "SKIP" and data["projection"] is None


def test_partial_text_is_labelled_as_a_pipeline_check():
    r = cli("smoke", *DEMO, "--memory-limit", "2MB", "--limit", 2)
    assert r.exit_code == 0, r.output
    assert "PIPELINE CHECK, NOT A QUALITY CHECK" in r.stdout
    assert "(partial model: not meaningful)" in r.stdout and "the pipeline works (partial model)" in r.stdout


def test_nothing_fits_fails(tmp_path):
    r, data = smoke_json(*DEMO, "--memory-limit", "10KB")
    assert r.exit_code == 1
    c = checks(data)
    assert c["fits in RAM"]["status"] == "FAIL" and "neither does a partial load" in c["fits in RAM"]["detail"]
    assert c["scoring"]["status"] == "SKIP"


def test_partial_load_equals_a_truncated_checkpoint(models, tmp_path):
    """load(layers=1) == loading a real 1-layer checkpoint built from the same tensors (base + adapter)."""
    ref_base = tmp_path / "one-layer"
    ref_base.mkdir()
    for f in models["llama"].iterdir():
        (ref_base / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((ref_base / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (ref_base / "config.json").write_text(json.dumps(cfg))
    sd = read_pdparams(models["llama"] / "model_state.pdparams")
    write_pdparams({k: v for k, v in sd.items() if ".layers.1." not in k}, ref_base / "model_state.pdparams")
    ref_lora = tmp_path / "one-layer-lora"
    ref_lora.mkdir()
    (ref_lora / "lora_config.json").write_bytes((models["llama_lora"] / "lora_config.json").read_bytes())
    ad = read_pdparams(models["llama_lora"] / "lora_model_state.pdparams")
    write_pdparams({k: v for k, v in ad.items() if ".layers.1." not in k}, ref_lora / "lora_model_state.pdparams")

    pd = paddle()
    ids = pd.to_tensor([[5, 17, 42, 99, 7]])
    partial = load(models["llama"], models["llama_lora"], layers=1)
    ref = load(ref_base, ref_lora)
    assert len(partial.model.model.llama.layers) == 1
    assert "partial load" in partial.facts.notes[-1]
    with pd.no_grad():
        a = partial.model(ids, return_dict=True).logits.numpy()
        b = ref.model(ids, return_dict=True).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(UsageError, match="not between 1 and the model's num_hidden_layers"):
        load(models["llama"], layers=3)


def test_partial_load_still_validates_the_whole_adapter(models, copy_of):
    lora = copy_of(models["llama_lora"])
    sd = read_pdparams(lora / "lora_model_state.pdparams")
    sd["llama.layers.1.self_attn.q_proj.lora_A"] = sd["llama.layers.1.self_attn.q_proj.lora_A"][:, :2]
    write_pdparams(sd, lora / "lora_model_state.pdparams")
    with pytest.raises(WeightMismatchError, match="layers.1.self_attn.q_proj: adapter shapes"):
        load(models["llama"], lora, layers=1)  # layer 1 is not loaded, but its adapter is still checked


# ---------------------------------------------------------------- the loader's broken folders


def loader_message(*args, **kw) -> str:
    with pytest.raises((CheckpointError, UsageError)) as exc:
        load(*args, **kw)
    return str(exc.value)


def assert_fails_with(args, check, message):
    r, data = smoke_json(*args)
    assert r.exit_code == 1, r.output
    c = checks(data)
    assert c[check]["status"] == "FAIL", c[check]
    assert message in c[check]["detail"]
    assert data["passed"] is False
    return data


def test_renamed_adapter_file_in_the_adapter_folder_is_read_but_flagged(models, copy_of):
    lora = copy_of(models["llama_lora"])
    (lora / "lora_model_state.pdparams").rename(lora / "model_state.pdparams")
    load(models["llama"], lora)  # the loader reads the renamed file as the adapter it is ...
    r, data = smoke_json("--model", models["llama"], "--lora", lora, "--labels", "goods,life", "--limit", 1)
    assert r.exit_code == 0, r.output  # ... so smoke passes, and warns about PaddleNLP
    c = checks(data)
    assert c["adapter file name"]["status"] == "WARN"
    assert "rename the file back to lora_model_state.pdparams" in c["adapter file name"]["detail"]
    assert c["attach vs merge"]["status"] == "PASS"


def test_renamed_adapter_passed_as_the_model(models, copy_of):
    trap = copy_of(models["llama"], "trap")
    (trap / "model_state.pdparams").write_bytes((models["llama_lora"] / "lora_model_state.pdparams").read_bytes())
    msg = loader_message(trap)
    assert "renamed LoRA adapter" in msg
    assert_fails_with(["--model", trap, "--labels", "goods,life"], "model folder", msg)
    r = cli("smoke", "--model", trap, "--labels", "goods,life")
    assert r.exit_code == 1 and status_line(r.stdout, "model folder", "FAIL") and "FAIL: " in r.stdout


def test_missing_adapter_file(models, copy_of):
    lora = copy_of(models["llama_lora"])
    (lora / "lora_model_state.pdparams").unlink()
    msg = loader_message(models["llama"], lora)
    assert "silently create an empty adapter" in msg
    assert_fails_with(["--model", models["llama"], "--lora", lora, "--labels", "goods,life"], "adapter folder", msg)


def test_nan_in_the_base_fails_the_load_with_the_loaders_message(models, copy_of):
    base = copy_of(models["llama"])
    sd = read_pdparams(base / "model_state.pdparams")
    sd["llama.layers.1.self_attn.o_proj.weight"][0, 0] = np.nan
    write_pdparams(sd, base / "model_state.pdparams")
    msg = loader_message(base)
    assert "contain NaN/inf" in msg
    assert_fails_with(["--model", base, "--labels", "goods,life"], "load", msg)
    # a partial load does not read layer 1, so the partial path scans every tensor for NaN/inf
    limit = f"{int(4 * partial_params(read_files_meta([base / 'model_state.pdparams']), 1) * 1.1) + 1}B"
    data = assert_fails_with(["--model", base, "--labels", "goods,life", "--memory-limit", limit],
                             "weights finite", "llama.layers.1.self_attn.o_proj.weight: 1 NaN/inf")
    assert data["path"] == "partial"


def test_nan_in_the_adapter(models, copy_of):
    lora = copy_of(models["llama_lora"])
    sd = read_pdparams(lora / "lora_model_state.pdparams")
    sd["llama.layers.0.mlp.down_proj.lora_B"][0, 0] = np.inf
    write_pdparams(sd, lora / "lora_model_state.pdparams")
    msg = loader_message(models["llama"], lora)
    assert_fails_with(["--model", models["llama"], "--lora", lora, "--labels", "goods,life"], "adapter fits base", msg)


def test_adapter_shape_mismatch(models, copy_of):
    lora = copy_of(models["llama_lora"])
    cfg = json.loads((lora / "lora_config.json").read_text())
    cfg["r"] = 8
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    msg = loader_message(models["llama"], lora)
    assert msg.count("do not fit the base weight") == 6
    assert_fails_with(["--model", models["llama"], "--lora", lora, "--labels", "goods,life"], "adapter fits base", msg)


def test_adapter_for_another_architecture(models):
    msg = loader_message(models["llama"], models["qwen2_lora"])
    assert_fails_with(["--model", models["llama"], "--lora", models["qwen2_lora"], "--labels", "goods,life"],
                      "adapter fits base", msg)


def test_logits_that_overflow_fail_the_score_check(models, copy_of):
    folder = copy_of(models["llama"], "overflow")
    sd = read_pdparams(folder / "model_state.pdparams")
    sd["lm_head.weight"][:] = 3e38
    write_pdparams(sd, folder / "model_state.pdparams")
    assert_fails_with(["--model", folder, "--labels", "goods,life"], "score", "non-finite log-probabilities")


# ---------------------------------------------------------------- input, labels, GPU memory


def test_bad_input_record_fails_before_the_gpu_would(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "price of rice"}\n{"text": "no query field"}\n')
    assert_fails_with([*DEMO, "--input", data], "input", f"{data}:2: the template needs field(s) query")


def test_gpu_too_small_fails_and_says_what_to_do():
    r, data = smoke_json(*DEMO, "--gpu-memory", "512MB", "--limit", 1)
    assert r.exit_code == 1
    c = checks(data)
    assert c["fits on GPU"]["status"] == "FAIL" and "use a GPU with more memory" in c["fits on GPU"]["detail"]
    assert c["score"]["status"] == "PASS"  # everything else still ran


def test_without_labels_the_next_token_distribution_is_checked(models):
    r, data = smoke_json("--model", models["llama"], "--limit", 2)
    assert r.exit_code == 0, r.output
    c = checks(data)
    assert c["labels"]["status"] == "WARN" and "--labels" in c["labels"]["detail"]
    assert "next-token path" in c["score"]["detail"]
    assert c["probabilities sum to 1"]["status"] == "PASS"
    assert c["attach vs merge"]["status"] == "SKIP"
    assert data["gpu_command"].startswith(f"paddle-scorer generate --model {models['llama']} --input YOUR_DATA.jsonl "
                                          "--output out/traces.jsonl")
    assert data["gpu_command"].endswith("--device gpu --dtype bfloat16")  # fp32 checkpoint -> bf16 on Ampere+


def test_bad_sizes_are_usage_errors():
    assert parse_size("80GB") == 80 * 1024**3
    assert parse_size("512 MiB") == 512 * 1024**2
    assert parse_size("1.5g") == int(1.5 * 1024**3)
    assert parse_size("24") == 24 * 1024**3
    for bad in ("lots", "80XB", "0GB", ""):
        with pytest.raises(UsageError, match="memory size"):
            parse_size(bad)
    r = cli("smoke", *DEMO, "--gpu-memory", "lots")
    assert r.exit_code == 2 and "is not a memory size; write it like 80GB" in r.stderr


def test_gpu_command_quotes_paths_and_templates(tmp_path):
    cmd = gpu_command(tmp_path / "my model", None, dtype="bfloat16", labels=["a", "b c"], template="Q: {query}\nA:",
                      label_prefix=None, input=tmp_path / "data.jsonl")
    assert f"--model '{tmp_path}/my model'" in cmd
    assert "--labels 'a,b c'" in cmd and "--template 'Q: {query}\nA:'" in cmd
    assert cmd.endswith("--output out/data.scores.jsonl --device gpu --dtype bfloat16")


def test_model_can_be_omitted_when_the_adapter_names_its_base():
    r, data = smoke_json("--lora", builders.DEMO_LORA, "--limit", 1)
    assert r.exit_code == 0, r.output
    assert data["model"] == str(builders.DEMO_BASE.resolve())
    # classify resolves the base from lora_config.json the same way, so the command leaves --model out
    assert data["gpu_command"].startswith(f"paddle-scorer classify --lora {builders.DEMO_LORA} --labels goods,life")
