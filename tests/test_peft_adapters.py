"""LoRA adapters saved by peft 0.22 (adapter_config.json + adapter_model.safetensors) on transformers-saved bases,
against peft's own forward on the same weights: classify attached (in RAM and streamed) and with --mode merge, the
folder `merge` writes, generate; plain, rsLoRA with rank/alpha patterns, a regex target, DoRA (also on fused and
expert projections), modules_to_save, layers_to_transform, DeepSeek's MLA projections, a bfloat16 file, a Llama run
by PaddleNLP's own model with its LoRAModel. serve with a peft and a PaddleNLP adapter on one base. What inspect says.
What peft saves that is not computed here is refused with a sentence."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import builders
import family_fixtures as ff
import peft_fixtures as pf
from cli_runs import run
from paddle_scorer.cli.app import app

TEMPLATE = builders.DEMO_SCORER["template"]
LABELS = "goods,life,goods and things"
TOL = 1e-5  # per label token, what docs/checkpoints.md promises


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every adapter of peft_fixtures.ADAPTERS on its own base: {name: (base folder, adapter folder, peft model)}."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name, (family, overrides, config) in pf.ADAPTERS.items():
        base = pf.build_base(family, root / name / "base", overrides)
        out[name] = (root / name / "base", root / name / "peft", pf.build_adapter(base, root / name / "peft", config))
    return out


def classify(tmp_path, model, *extra):
    out = tmp_path / "out.jsonl"
    run("classify", "--model", model, "--labels", LABELS, "--template", TEMPLATE, "--input", builders.DEMO_QUERIES,
        "--limit", 3, "--output", out, "--overwrite", *extra)
    return [json.loads(x) for x in open(out)], json.loads(out.with_name(out.name + ".meta.json").read_text())


def base_distance(records, peft_model) -> float:
    with peft_model.disable_adapter():
        return ff.worst_per_token(records, peft_model)


@pytest.mark.parametrize("name", list(pf.ADAPTERS))
def test_classify_attached_merged_and_streamed_equal_peft(built, tmp_path, name, deltas):
    base, adapter, model = built[name]
    for extra in (("--execution", "in-ram"), ("--execution", "streamed"), ("--mode", "merge", "--execution", "in-ram"),
                  ("--mode", "merge", "--execution", "streamed")):
        recs, meta = classify(tmp_path, base, "--lora", adapter, *extra)
        assert meta["model"]["adapter_path"] == str(adapter)
        d = deltas.record(f"nlp env: peft {name} ({' '.join(extra)}) vs peft's forward, per label token",
                          ff.worst_per_token(recs, model))
        assert d <= TOL, extra
    assert base_distance(recs, model) > 1e-3  # the adapter changes the scores


@pytest.mark.parametrize("name", list(pf.ADAPTERS))
def test_merged_folder_and_generate_equal_peft(built, tmp_path, name, deltas):
    base, adapter, model = built[name]
    run("merge", "--model", base, "--lora", adapter, "--out", tmp_path / "merged")
    record = json.loads((tmp_path / "merged" / "paddle_scorer_merge.json").read_text())
    assert record["adapter_format"] == "peft" and record["dora"] == bool(pf.ADAPTERS[name][2].get("use_dora"))
    recs, _ = classify(tmp_path, tmp_path / "merged")
    assert deltas.record(f"nlp env: peft {name} merged folder vs peft's forward, per label token",
                         ff.worst_per_token(recs, model)) <= TOL
    r = run("generate", "--model", base, "--lora", adapter, "--prompt", "what is the price of cabbage", "--raw",
            "--max-new-tokens", 5, "--top-k", 2, "--json")
    rec = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")][0]
    want, lps = ff.greedy(model, rec["prompt_token_ids"], len(rec["steps"]))
    assert [s["token_id"] for s in rec["steps"]] == want
    assert deltas.record(f"nlp env: peft {name} generate vs peft's greedy, per step",
                         max(abs(s["logprob"] - lp) for s, lp in zip(rec["steps"], lps))) <= TOL


def test_library_forward_attaches_the_peft_pairs_with_its_lora_model(built, tmp_path, deltas):
    """The Llama PaddleNLP builds, run by its own forward (not the decoder): its LoRAModel holds the peft pairs
    (ranks padded, each module's scaling in B)."""
    base, adapter, model = built["llama_library"]
    env = {"PADDLE_SCORER_CPU_FORWARD": "library"}
    out = tmp_path / "lib.jsonl"
    run("classify", "--model", base, "--lora", adapter, "--labels", LABELS, "--template", TEMPLATE, "--input",
        builders.DEMO_QUERIES, "--limit", 2, "--output", out, env=env)
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["model"]["compute"]["forward"] == "library" and meta["model"]["library"] == "paddlenlp"
    recs = [json.loads(x) for x in open(out)]
    assert deltas.record("nlp env: peft llama on PaddleNLP's forward + LoRAModel vs peft, per label token",
                         ff.worst_per_token(recs, model)) <= TOL


def test_a_bfloat16_adapter_is_read_exactly(built, tmp_path, deltas):
    """peft adapters saved in bfloat16 are widened exactly (the reference holds the same rounded values)."""
    import ml_dtypes
    import torch

    base, adapter, model = built["qwen3_regex"]
    folder = tmp_path / "bf16"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    pf.rewrite_tensors(folder, {k: v.astype(ml_dtypes.bfloat16) for k, v in pf.tensors(adapter).items()})
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "lora_" in n:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    recs, meta = classify(tmp_path, base, "--lora", folder)
    assert meta["model"]["adapter_stored_dtypes"] == {"bfloat16": sum(v.size for v in pf.tensors(adapter).values())}
    assert deltas.record("nlp env: peft bfloat16 adapter vs peft with the same rounded weights, per label token",
                         ff.worst_per_token(recs, reference)) <= TOL


def test_inspect_explains_a_peft_folder(built):
    base, adapter, _ = built["llama_dora"]
    r = CliRunner().invoke(app, ["inspect", str(adapter), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    a = info["adapter"]
    assert info["kind"] == "lora-adapter" and a["format"] == "peft" and a["saved_by"].startswith("peft 0.22")
    # layer 1 only: q_proj r=4 (alpha 8), v_proj r=2 (alpha 8), down_proj r=4 (alpha 3); rsLoRA: alpha / sqrt(r)
    assert a["ranks"] == {"r=4, lora_alpha=8, scaling=4": 1, "r=2, lora_alpha=8, scaling=5.65685": 1,
                          "r=4, lora_alpha=3, scaling=1.5": 1}
    assert a["dora"] is True and a["modules_to_save"] == ["lm_head"] and a["whole_tensors"] == ["lm_head.weight"]
    assert "in layers [1]" in a["target_modules"][0]
    text = CliRunner().invoke(app, ["inspect", str(adapter)]).stdout
    assert "peft" in text and "DoRA" in text and "--lora" in text


def test_serve_a_peft_and_a_paddlenlp_adapter_on_one_base(built, tmp_path):
    """serve --lora a=PEFT --lora b=PADDLE: each served model's /v1/classify equals its own CLI classify."""
    from fastapi.testclient import TestClient

    from paddle_scorer.serve.app import create_app
    from paddle_scorer.serve.models import serve_models
    from paddle_scorer.serve.service import ServeOptions, Service
    from paddle_scorer.tasks.loading import LoadOptions

    base, peft_dir, _ = built["qwen3_regex"]
    paddle_dir = tmp_path / "paddle-lora"
    ff.paddle_format_adapter(paddle_dir, {f"model.layers.{i}.self_attn.{p}": (64, 128 if p == "q_proj" else 64)
                                        for i in range(2) for p in ("q_proj", "v_proj")})
    adapters = [("a", peft_dir), ("b", paddle_dir)]
    served = serve_models(LoadOptions(base, device="cpu"), adapters, model_name="base", prefix_cache=1 << 24,
                          prefix_reuse=True)
    service = Service(served.loaded, None, ServeOptions(model_name="base", adapters=served.adapter_dirs),
                      backends=served.backends)
    queries = [json.loads(x) for x in open(builders.DEMO_QUERIES)][:3]
    records = [{"id": q["id"], "query": q["query"]} for q in queries]
    labels = LABELS.split(",")
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        got = {}
        for name in ("a", "b"):
            r = c.post("/v1/classify", json=dict(model=name, labels=labels, records=records, template=TEMPLATE))
            assert r.status_code == 200, r.text
            got[name] = r.json()["data"]
    for name, folder in adapters:
        recs, _ = classify(tmp_path, base, "--lora", folder)
        for g, w in zip(got[name], recs, strict=True):
            for lab in labels:
                assert abs(g["logprobs"][lab] - w["logprobs"][lab]) <= 1e-5
    assert got["a"][0]["logprobs"] != got["b"][0]["logprobs"]


def _refused(args, code, *words):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output, r.output
    return r.output


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _classify_args(base, lora, tmp_path):
    return ["classify", "--model", base, "--lora", lora, "--labels", "goods,life", "--prompt", "hi", "--output",
            tmp_path / "refused.jsonl"]


@pytest.mark.parametrize("case", ["ia3", "target_parameters", "unknown_field", "pissa", "lora_bias", "dora_missing",
                                  "tied_head", "bin_code", "no_config", "another_family", "targets_nothing"])
def test_what_peft_saves_and_is_not_computed_is_refused(built, tmp_path, case):
    base, adapter, _ = built["qwen3_regex"]
    lora = _copy_adapter(adapter, tmp_path / "adapter")
    words: tuple = ()
    if case == "ia3":
        pf.edit_config(lora, peft_type="IA3")
        words = ("peft IA3 adapter", "merge_and_unload")
    elif case == "target_parameters":
        pf.edit_config(lora, target_parameters=["mlp.experts.gate_up_proj"])
        words = ("`target_parameters` is set",)
    elif case == "unknown_field":
        pf.edit_config(lora, use_magic_lora=True)
        words = ("`use_magic_lora`",)
    elif case == "pissa":
        pf.edit_config(lora, init_lora_weights="pissa_niter_4")
        words = ("rewrote the base weights",)
    elif case == "lora_bias":
        pf.edit_config(lora, lora_bias=True)
        words = ("`lora_bias` is set",)
    elif case == "dora_missing":
        dora_base, dora_adapter, _ = built["llama_dora"]
        base, lora = dora_base, _copy_adapter(dora_adapter, tmp_path / "dora")
        pf.rewrite_tensors(lora, {k: v for k, v in pf.tensors(lora).items() if "q_proj.lora_magnitude" not in k})
        words = ("q_proj: use_dora is true but the file has no lora_magnitude_vector",)
    elif case == "tied_head":  # Qwen3's fixture ties its head: a trained lm_head has nothing to replace
        arrays = pf.tensors(lora)
        arrays["base_model.model.lm_head.weight"] = np.ones((ff.VOCAB, 64), np.float32)
        pf.rewrite_tensors(lora, arrays)
        pf.edit_config(lora, modules_to_save=["lm_head"])
        words = ("lm_head.weight", "ties its head")
    elif case == "bin_code":  # a torch zip whose data.pkl calls os.system: refused, nothing run
        import zipfile

        (lora / "adapter_model.safetensors").unlink()
        marker = tmp_path.parent / f"{tmp_path.name}-ran"
        payload = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little") + \
            f"touch {marker}".encode() + b"\x85R."
        with zipfile.ZipFile(lora / "adapter_model.bin", "w") as z:
            z.writestr("archive/data.pkl", payload)
        words = ("references `os.system`", "nothing was executed")
    elif case == "no_config":
        (lora / "adapter_config.json").unlink()
        words = ("no adapter_config.json",)
    elif case == "another_family":
        base = built["llama_dora"][0]
        words = ("does not fit the base model",)
    elif case == "targets_nothing":
        pf.edit_config(lora, target_modules=["w1", "w3"])
        words = ("match no module", "peft would apply none of them")
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(_classify_args(base, lora, tmp_path), 4, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "bin_code":
        assert not marker.exists()


def test_a_torch_bin_adapter_is_read_without_running_its_pickle(built, tmp_path, deltas):
    """peft's adapter_model.bin (torch.save's zip): indexed by the restricted walker (storages located in the zip,
    nothing unpickled by torch), scores equal to the safetensors copy and to peft."""
    base, adapter, model = built["llama_dora"]
    folder = tmp_path / "bin"
    model.save_pretrained(str(folder), safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    from paddle_scorer.checkpoint.weights import index_file, read_tensors

    got = read_tensors(list(index_file(folder / "adapter_model.bin").values()))
    want = pf.tensors(adapter)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    recs, meta = classify(tmp_path, base, "--lora", folder)
    assert deltas.record("nlp env: peft adapter_model.bin vs peft's forward, per label token",
                         ff.worst_per_token(recs, model)) <= TOL


def test_an_adapter_that_changes_the_base_is_not_served_beside_others(built, tmp_path):
    """DoRA magnitudes and modules_to_save rewrite the base's own weights: such an adapter cannot share a base."""
    from paddle_scorer.errors import UsageError
    from paddle_scorer.serve.models import serve_models
    from paddle_scorer.tasks.loading import LoadOptions

    base, adapter, _ = built["llama_dora"]
    plain = tmp_path / "plain"
    pf.build_adapter(pf.build_base("llama", tmp_path / "base2", {}), plain, dict(r=2, lora_alpha=4,
                                                                                target_modules=["q_proj"]))
    with pytest.raises(UsageError, match="changes the base's own weights .DoRA magnitudes.*serve it alone"):
        serve_models(LoadOptions(base, device="cpu"), [("plain", plain), ("dora", adapter)], model_name="base",
                     prefix_cache=1 << 20, prefix_reuse=True)
