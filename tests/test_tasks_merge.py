"""`paddle-scorer merge` through the real CLI: exact tensors, same logits as the attached adapter, readable
by PaddleNLP, atomic output (nothing left behind on errors or Ctrl-C), refusals."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from paddle_scorer.checkpoint import describe as ckpt
from paddle_scorer.tasks import merge as merging
from paddle_scorer.cli.app import app
from paddle_scorer.errors import WeightMismatchError
from paddle_scorer.checkpoint.fingerprints import adapter_sha256
from paddle_scorer.model.loader import load
from paddle_scorer.process.environment import paddle
from paddle_scorer.checkpoint.weights import BFLOAT16, read_files, read_pdparams, write_pdparams, write_safetensors

runner = CliRunner()
IDS = [[5, 17, 42, 99, 7, 150, 3, 64]]


def merge_cli(base, lora, out, *extra):
    args = ["merge", "--lora", str(lora), "--out", str(out), *map(str, extra)]
    if base is not None:
        args[1:1] = ["--model", str(base)]
    return runner.invoke(app, args)


def ok(res):
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")
    return res


def out_weights(folder: Path) -> dict[str, np.ndarray]:
    ws = ckpt.model_weight_files(folder)
    return read_files([Path(f) for f in ws.files])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def logits(model_or_loaded, ids=IDS):
    pd = paddle()
    net = getattr(model_or_loaded, "model", model_or_loaded)
    with pd.no_grad():
        return net(pd.to_tensor(ids), return_dict=True).logits.numpy().astype(np.float64)


def reference_merge(base_dir: Path, lora_dir: Path) -> tuple[dict, dict, float]:
    """Independent float64 merge from the raw files: ``W + A @ B * scaling``."""
    base = read_pdparams(base_dir / "model_state.pdparams")
    ad = read_pdparams(lora_dir / "lora_model_state.pdparams")
    cfg = json.loads((lora_dir / "lora_config.json").read_text())
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("rslora") else cfg["r"])
    expect = {}
    for key in ad:
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            a = ad[module + ".lora_A"].astype(np.float64)
            b = ad[module + ".lora_B"].astype(np.float64)
            expect[module + ".weight"] = base[module + ".weight"].astype(np.float64) + (a @ b) * scaling
    return base, expect, scaling


@pytest.fixture(scope="module")
def attached(models):
    return {
        "llama": logits(load(models["llama"], models["llama_lora"], mode="attach")),
        "base": logits(load(models["llama"])),
    }


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """llama + llama_lora merged once into each format (read-only for the tests)."""
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for fmt in ("safetensors", "pdparams"):
        ok(merge_cli(models["llama"], models["llama_lora"], root / fmt, "--format", fmt))
        out[fmt] = root / fmt
    return out


# ---------------------------------------------------------------- exact tensors


@pytest.mark.parametrize("lora", ["llama_lora", "llama_rslora"])
def test_merged_tensors_equal_numpy_and_the_rest_is_bit_identical(models, tmp_path, lora):
    res = ok(merge_cli(models["llama"], models[lora], tmp_path / "out"))
    base, expect, scaling = reference_merge(models["llama"], models[lora])
    got = out_weights(tmp_path / "out")
    assert set(got) == set(base)
    for key, want in expect.items():
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key].astype(np.float64), want, atol=1e-5, err_msg=key)
        assert np.abs(want - base[key]).max() > 1e-2  # the adapter really changes this weight
    for key in set(base) - set(expect):
        assert got[key].dtype == base[key].dtype and got[key].tobytes() == base[key].tobytes(), key
    record = json.loads((tmp_path / "out" / ckpt.MERGE_RECORD).read_text())
    assert record["scaling"] == pytest.approx(scaling)
    assert record["merged_modules"] == len(expect)
    assert record["rslora"] is (lora == "llama_rslora")
    assert f"merged {len(expect)} LoRA modules" in res.stdout
    assert f"scaling  {scaling:g}" in res.stdout


# ---------------------------------------------------------------- same model as base + attached adapter


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_merged_model_logits_equal_attached(merged, attached, fmt):
    folder = merged[fmt]
    weights = [f for f in ckpt.model_weight_files(folder).files]
    assert [Path(f).name for f in weights] == [merging._SINGLE_NAME[fmt]]
    loaded = load(folder)
    assert loaded.facts.adapter_path is None  # a plain model now
    np.testing.assert_allclose(logits(loaded), attached["llama"], atol=1e-5)
    assert np.abs(attached["llama"] - attached["base"]).max() > 1e-2


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_paddlenlp_from_pretrained_reads_the_merged_model(merged, attached, fmt):
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged[fmt]))
    model.eval()
    np.testing.assert_allclose(logits(model), attached["llama"], atol=1e-5)


def test_qwen2_merge_equals_attached(models, tmp_path):
    ok(merge_cli(models["qwen2"], models["qwen2_lora"], tmp_path / "out", "--format", "pdparams"))
    a = logits(load(models["qwen2"], models["qwen2_lora"]))
    np.testing.assert_allclose(logits(load(tmp_path / "out")), a, atol=1e-5)


def test_merge_imports_no_paddle(models, tmp_path):
    code = (
        "import sys\nfrom paddle_scorer.tasks.merge import merge\n"
        f"r = merge({str(models['llama'])!r}, {str(models['llama_lora'])!r}, {str(tmp_path / 'out')!r})\n"
        "assert r.merged_modules == 6, r\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------- dtypes, formats, sharding


def test_fp16_base_auto_stays_fp16(models, tmp_path):
    ok(merge_cli(models["llama16"], models["llama_lora"], tmp_path / "out", "--format", "pdparams"))
    got = out_weights(tmp_path / "out")
    base16 = read_pdparams(models["llama16"] / "model_state.pdparams")
    assert {v.dtype for v in got.values()} == {np.dtype(np.float16)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((tmp_path / "out" / ckpt.MERGE_RECORD).read_text())["dtype"] == "float16"
    _, expect, _ = reference_merge(models["llama16"], models["llama_lora"])
    for key, want in expect.items():
        np.testing.assert_allclose(got[key].astype(np.float64), want, rtol=2e-3, atol=2e-3, err_msg=key)
    for key in set(base16) - set(expect):
        assert got[key].tobytes() == base16[key].tobytes(), key


@pytest.mark.parametrize("dtype,np_dtype", [("float32", np.dtype(np.float32)), ("bfloat16", BFLOAT16)])
def test_explicit_dtype_casts_every_tensor(models, tmp_path, dtype, np_dtype):
    ok(merge_cli(models["llama16"], models["llama_lora"], tmp_path / "out", "--dtype", dtype))
    got = out_weights(tmp_path / "out")
    assert {v.dtype for v in got.values()} == {np_dtype}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
    info = ckpt.describe(tmp_path / "out")
    assert set(info.weights.dtypes) == {dtype}


def test_bf16_base_auto_stays_bf16(models, tmp_path, attached):
    base = tmp_path / "bf16"
    base.mkdir()
    for f in models["llama"].iterdir():
        if f.name != "model_state.pdparams":
            shutil.copy(f, base / f.name)
    sd = read_pdparams(models["llama"] / "model_state.pdparams")
    write_safetensors({k: v.astype(BFLOAT16) for k, v in sd.items()}, base / "model.safetensors")
    ok(merge_cli(base, models["llama_lora"], tmp_path / "out", "--format", "pdparams"))
    got = out_weights(tmp_path / "out")
    assert {v.dtype for v in got.values()} == {BFLOAT16}
    _, expect, _ = reference_merge(models["llama"], models["llama_lora"])
    for key, want in expect.items():
        np.testing.assert_allclose(got[key].astype(np.float64), want, rtol=2e-2, atol=5e-2, err_msg=key)
    half = logits(load(tmp_path / "out"))
    assert np.abs(half - attached["llama"]).max() < 0.05 * np.abs(attached["llama"]).max()


@pytest.fixture
def sharded_base(models, tmp_path):
    """The llama base as two safetensors shards (PaddleNLP's names), keys split unevenly."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    for f in models["llama"].iterdir():
        if f.name != "model_state.pdparams":
            shutil.copy(f, folder / f.name)
    sd = read_pdparams(models["llama"] / "model_state.pdparams")
    keys = sorted(sd)
    parts = [keys[:5], keys[5:]]
    wmap = {}
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        write_safetensors({k: sd[k] for k in part}, folder / name, metadata={"format": "np"})
        wmap.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return folder, parts


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_sharded_base_keeps_its_sharding(sharded_base, models, attached, tmp_path, fmt):
    base, parts = sharded_base
    ok(merge_cli(base, models["llama_lora"], tmp_path / "out", "--format", fmt))
    index = json.loads((tmp_path / "out" / merging._INDEX_NAME[fmt]).read_text())
    ext = ".safetensors" if fmt == "safetensors" else ".pdparams"
    stem = "model" if fmt == "safetensors" else "model_state"
    names = [f"{stem}-00001-of-00002{ext}", f"{stem}-00002-of-00002{ext}"]
    for name, part in zip(names, parts, strict=True):
        assert sorted(k for k, v in index["weight_map"].items() if v == name) == part
        assert (tmp_path / "out" / name).is_file()
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in out_weights(tmp_path / "out").values())
    np.testing.assert_allclose(logits(load(tmp_path / "out")), attached["llama"], atol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_paddlenlp_reads_sharded_output(sharded_base, models, attached, tmp_path, fmt):
    from paddlenlp.transformers import AutoModelForCausalLM

    ok(merge_cli(sharded_base[0], models["llama_lora"], tmp_path / "out", "--format", fmt))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    model.eval()
    np.testing.assert_allclose(logits(model), attached["llama"], atol=1e-5)


# ---------------------------------------------------------------- side files


def test_side_files_tokenizer_from_adapter_and_scorer_json(models, copy_of, tmp_path):
    base = copy_of(models["llama"], "bare")
    for name in ckpt._TOKENIZER_FILES:
        (base / name).unlink(missing_ok=True)
    lora = copy_of(models["llama_lora"], "lora")
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(models["llama"] / name, lora / name)
    (lora / "scorer.json").write_text(json.dumps({"labels": ["goods", "life"]}))
    res = ok(merge_cli(base, lora, tmp_path / "out"))
    out = tmp_path / "out"
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "scorer.json", "generation_config.json"):
        assert (out / name).read_bytes() == ((lora if name != "generation_config.json" else base) / name).read_bytes()
    assert "tokenizer was copied from the adapter" in res.stdout


def test_inspect_reports_merged_model(merged, models):
    res = runner.invoke(app, ["inspect", str(merged["safetensors"]), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["kind"] == "merged-model"
    m = info["merged_from"]
    assert m["adapter_sha256"] == adapter_sha256(ckpt.describe(models["llama_lora"]))
    assert m["base"] == str(models["llama"].resolve()) and m["adapter"] == str(models["llama_lora"].resolve())
    assert (m["r"], m["lora_alpha"], m["scaling"], m["dtype"], m["format"]) == (4, 8.0, 2.0, "float32", "safetensors")
    assert m["paddle_scorer_version"] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created_utc"])
    assert "merged model" in runner.invoke(app, ["inspect", str(merged["safetensors"])]).stdout


# ---------------------------------------------------------------- --verify


def _verify_line(stdout: str) -> float:
    m = re.search(r"verify\s+max \|log-prob difference\| (\S+) .*\(tolerance (\S+)\): passed", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


def test_verify_reports_the_difference_and_passes(models, tmp_path):
    res = ok(merge_cli(models["llama"], models["llama_rslora"], tmp_path / "out", "--verify"))
    diff, tol = _verify_line(res.stdout)
    assert diff < 1e-4 and tol == merging.TOL_FLOAT32


def test_verify_half_output_uses_the_half_tolerance(models, tmp_path):
    res = ok(merge_cli(models["llama"], models["llama_lora"], tmp_path / "out", "--verify", "--dtype", "float16",
                       "--format", "pdparams"))
    diff, tol = _verify_line(res.stdout)
    assert 0 < diff < tol and tol > merging.TOL_FLOAT32


def test_failed_verify_leaves_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(merging, "tolerance", lambda dtype, scale: 0.0)
    res = merge_cli(models["llama"], models["llama_lora"], tmp_path / "out", "--verify")
    assert res.exit_code == 4
    assert "--verify failed" in res.stderr and "nothing was written" in res.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- atomic output


def _fail_on_write(monkeypatch, exc):
    real = merging._write_tensors
    calls = []

    def writer(tensors, path, fmt, *rest):
        real(tensors, path, fmt, *rest)  # a file really is on disk when the failure hits
        calls.append(path)
        raise exc

    monkeypatch.setattr(merging, "_write_tensors", writer)
    return calls


def test_ctrl_c_mid_merge_leaves_no_output_and_no_temp_folder(sharded_base, models, tmp_path, monkeypatch):
    calls = _fail_on_write(monkeypatch, KeyboardInterrupt())
    res = merge_cli(sharded_base[0], models["llama_lora"], tmp_path / "out")
    assert calls and res.exit_code == 130
    assert "interrupted" in res.stderr and "nothing was written" in res.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_exception_mid_merge_leaves_nothing(models, tmp_path, monkeypatch):
    _fail_on_write(monkeypatch, OSError("No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        merging.merge(models["llama"], models["llama_lora"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_out_is_refused_then_replaced_with_force(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = merge_cli(models["llama"], models["llama_lora"], out)
    assert res.exit_code == 2
    assert "already exists; pass another folder, or add --force to replace it." in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []
    # --force never replaces a folder that is not an earlier merge output
    res = merge_cli(models["llama"], models["llama_lora"], out, "--force")
    assert res.exit_code == 2 and "not an earlier merge output" in res.stderr and "keep.txt" in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []
    # an earlier merge output: an interrupted --force merge keeps it as it was, a complete one replaces it
    earlier = tmp_path / "earlier"
    ok(merge_cli(models["llama"], models["llama_lora"], earlier))
    before = sorted(p.name for p in earlier.iterdir())
    with monkeypatch.context() as m:
        _fail_on_write(m, KeyboardInterrupt())
        assert merge_cli(models["llama"], models["llama_lora"], earlier, "--force").exit_code == 130
    assert sorted(p.name for p in earlier.iterdir()) == before and leftovers(tmp_path) == []
    res = ok(merge_cli(models["llama"], models["llama_lora"], earlier, "--force"))
    assert "replaced the existing folder" in res.stdout
    assert (earlier / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- refusals flow through


def test_adapter_shape_mismatch_is_refused_and_writes_nothing(models, copy_of, tmp_path):
    lora = copy_of(models["llama_lora"])
    cfg = json.loads((lora / "lora_config.json").read_text())
    cfg["r"] = 8
    del cfg["scaling"]  # else the saved scaling contradicts r=8 and that is refused first
    (lora / "lora_config.json").write_text(json.dumps(cfg))
    res = merge_cli(models["llama"], lora, tmp_path / "out")
    assert res.exit_code == WeightMismatchError.exit_code
    assert "do not fit the base weight" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "case,code,message",
    [
        ("other-arch", 4, "is a different model (model_type 'qwen2' vs 'llama'"),
        ("adapter-as-model", 2, "is a LoRA adapter, not a model; pass it as --lora"),
        ("out-is-base", 2, "is (or contains) the base model folder"),
        ("bad-format", 2, "unknown --format 'gguf'; use safetensors or pdparams."),
        ("bad-dtype", 2, "unknown dtype 'float8'"),
    ],
)
def test_refusals(models, tmp_path, case, code, message):
    base, lora, out, extra = models["llama"], models["llama_lora"], tmp_path / "out", []
    if case == "other-arch":
        lora = models["qwen2_lora"]
    elif case == "adapter-as-model":
        base = models["llama_lora"]
    elif case == "out-is-base":
        out = models["llama"]
        extra = ["--force"]
    elif case == "bad-format":
        extra = ["--format", "gguf"]
    elif case == "bad-dtype":
        extra = ["--dtype", "float8"]
    res = merge_cli(base, lora, out, *extra)
    assert res.exit_code == code, res.output
    assert message in res.stderr and "Traceback" not in res.output
    if case == "out-is-base":
        assert (models["llama"] / "model_state.pdparams").is_file()
    else:
        assert not out.exists()


def test_cast_overflow_is_refused(models, copy_of, tmp_path):
    base = copy_of(models["llama"])
    sd = read_pdparams(base / "model_state.pdparams")
    sd["llama.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # beyond float16's 65504
    write_pdparams(sd, base / "model_state.pdparams")
    res = merge_cli(base, models["llama_lora"], tmp_path / "out", "--dtype", "float16")
    assert res.exit_code == 4
    assert "--dtype float16: some base weights exceed float16's range" in res.stderr
    assert "llama.layers.0.mlp.up_proj.weight: 1 NaN/inf" in res.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_model_defaults_to_the_base_the_adapter_names(models, tmp_path):
    ok(merge_cli(None, models["llama_lora"], tmp_path / "out"))
    record = json.loads((tmp_path / "out" / ckpt.MERGE_RECORD).read_text())
    assert record["base"] == str(models["llama"].resolve())
