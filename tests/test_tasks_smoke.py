"""smoke: the real CLI on the bundled demo and on the loader's broken folders; partial load; projection."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.errors import CheckpointError, UsageError
from paddle_scorer.model.loader import load
from paddle_scorer.tasks.smoke_estimates import Projection, gpu_command, project
from paddle_scorer.model.memory_budget import parse_size
from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

runner = CliRunner()
DEMO = ["--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA]
DEMO_LABELS = builders.DEMO_SCORER["labels"]
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
    assert demo_json["passed"] is True and demo_json["execution"] == "in-ram"
    for name in ("model folder", "adapter folder", "adapter fits base", "tokenizer", "labels", "input", "fits in RAM",
                 "fits on GPU", "load", "prompts", "score", "probabilities finite", "probabilities sum to 1",
                 "output records", "attach vs merge"):
        assert c[name]["status"] == "PASS", (name, c[name])
    assert "from scorer.json" in c["labels"]["detail"]
    assert f"{N_QUERIES} records" in c["input"]["detail"] and f"{N_QUERIES} record(s) templated" in c["prompts"]["detail"]
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


# ---------------------------------------------------------------- a model that does not fit: streamed


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A ~150 MB float32 Llama (+ adapter) and a memory limit it does not fit in RAM under, but streams within."""
    from paddle_scorer.model.memory_budget import INTERPRETER_BYTES, STREAM_WORKING_BYTES

    root = tmp_path_factory.mktemp("wide")
    model = builders.build_model("llama", seed=2, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                                 num_attention_heads=8, num_key_value_heads=8)
    base = builders.save_model(model, root / "wide")
    lora = builders.save_lora(model, root / "wide-lora", base_ref=str(base))
    weights = sum(int(np.prod(p.shape)) for p in model.parameters()) * 4
    layer = sum(int(np.prod(p.shape)) for n, p in model.named_parameters() if ".layers.0." in n) * 4
    fits = int(weights * 1.1) + INTERPRETER_BYTES
    stream_min = 3 * layer + 512 * 512 * 4 + INTERPRETER_BYTES + STREAM_WORKING_BYTES
    return base, lora, f"{(stream_min + fits) // 2 // 1024}KB"


def test_a_model_that_does_not_fit_is_scored_streamed_with_real_probabilities(wide, tmp_path):
    base, lora, limit = wide
    args = ["--model", base, "--lora", lora, "--labels", "goods,life", "--input", builders.DEMO_QUERIES]
    r, data = smoke_json(*args, "--memory-limit", limit, "--limit", 3)
    assert r.exit_code == 0, r.output
    c = checks(data)
    assert data["execution"] == "streamed"
    assert c["fits in RAM"]["status"] == "INFO" and "streams it layer by layer" in c["fits in RAM"]["detail"]
    for name in ("load", "score", "probabilities finite", "probabilities sum to 1", "output records"):
        assert c[name]["status"] == "PASS", (name, c[name])
    assert "streamed" in c["score"]["detail"] and c["attach vs merge"]["status"] == "SKIP"
    p = data["projection"]
    assert p["seconds_per_block"] >= 0 and p["block_records"] >= 1 and p["total_records"] == N_QUERIES
    assert "per block" in c["projected time"]["detail"]
    # the probabilities are the full model's: the same as an in-RAM classify of the same records
    out = tmp_path / "ram.jsonl"
    assert cli("classify", *args, "--limit", 3, "--output", out, "--execution", "in-ram").exit_code == 0
    ram = [json.loads(line) for line in open(out)]
    r = cli("smoke", *args, "--memory-limit", limit, "--limit", 3)
    assert r.exit_code == 0 and "(streamed: the full model)" in r.stdout
    for rec in ram:
        assert f"{rec['probs']['goods']:.4f}" in r.stdout


def test_streamed_projection_separates_the_per_block_cost():
    from paddle_scorer.tasks.smoke_estimates import project_streamed

    # a block costs 10 s + 1 s per record: measured 11 s for 1 record and 15 s for 5
    p = project_streamed(11.0, 15.0, 5, 100, 40)
    assert p.seconds_per_block == pytest.approx(10.0) and p.seconds_per_record == pytest.approx(1.0)
    assert p.total_seconds == pytest.approx(3 * 10.0 + 100 * 1.0)  # 3 blocks of up to 40


def test_nothing_fits_fails():
    r, data = smoke_json(*DEMO, "--memory-limit", "10KB")
    assert r.exit_code == 1
    c = checks(data)
    assert c["memory budget"]["status"] == "FAIL" and "too small even to stream" in c["memory budget"]["detail"]
    assert "the minimum is about" in c["memory budget"]["detail"]
    assert c["score"]["status"] == "SKIP"


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
    del cfg["scaling"]
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    msg = loader_message(models["llama"], lora)
    assert msg.count("do not fit the base weight") == 6
    assert_fails_with(["--model", models["llama"], "--lora", lora, "--labels", "goods,life"], "adapter fits base", msg)


def test_adapter_for_another_architecture(models):
    msg = loader_message(models["llama"], models["qwen2_lora"])
    assert "is a different model" in msg
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
    assert_fails_with([*DEMO, "--input", data], "prompts", f"{data}:2: the template needs field(s) query")


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
    assert parse_size("1048576B") == 1024**2 and parse_size("0", allow_zero=True) == 0
    with pytest.raises(UsageError, match="has no unit"):
        parse_size("24", "--memory-limit")  # round 4: bare numbers were gigabytes (a 1 PiB --max-body)
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


def test_generate_past_ram_projected_and_equal_to_in_ram(wide, tmp_path):
    """A model over --memory-limit: smoke projects generate's time from the measured pass over the layers, and generate
    streams it (one pass per step) with the in-RAM tokens and probabilities."""
    base, lora, limit = wide
    r, data = smoke_json("--model", base, "--lora", lora, "--input", builders.DEMO_QUERIES, "--template", "{query}",
                         "--memory-limit", limit, "--limit", 2)
    assert r.exit_code == 0, r.output
    c = checks(data)
    assert data["execution"] == "streamed" and c["generate past RAM"]["status"] == "INFO"
    d = c["generate past RAM"]["detail"]
    assert "per pass over the layers (measured)" in d and f"{N_QUERIES} records in blocks of" in d
    common = ["--model", base, "--lora", lora, "--input", builders.DEMO_QUERIES, "--template", "{query}", "--limit", 3,
              "-n", 4, "--top-k", 2]
    outs = {}
    for name, extra in (("streamed", ["--memory-limit", limit]), ("ram", ["--execution", "in-ram", "--no-prefix-reuse"])):
        out = tmp_path / f"{name}.jsonl"
        assert cli("generate", *common, *extra, "--output", out).exit_code == 0
        outs[name] = [json.loads(line) for line in open(out)]
    meta = json.loads((tmp_path / "streamed.jsonl.meta.json").read_text())
    # blocks of several records (as many as their caches allow under the limit): a prompt pass and 3 step passes over
    # the 12 layers per block, fewer than the 3 x 4 x 12 passes of one record at a time
    passes = meta["streaming"]["layer_passes"]
    assert meta["model"]["execution"]["execution"] == "streamed" and passes % (4 * 12) == 0 and passes < 3 * 4 * 12
    for s, m in zip(outs["streamed"], outs["ram"], strict=True):
        assert s["generated_token_ids"] == m["generated_token_ids"]
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(s["steps"], m["steps"])) <= 1e-6
