"""The committed demo checkpoints (built by checkpoints/build_demo.py) load with plain
PaddleNLP on CPU and behave as advertised: the float16 base alone is near chance on the
held-out queries, and the LoRA adapter turns it into an accurate classifier.

No re-training here: only the committed files are used.
"""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"
BASE_DIR = CKPT / "demo-base"
LORA_DIR = CKPT / "demo-lora"
QUERIES = CKPT / "demo-queries.jsonl"
METRICS = CKPT / "demo-metrics.json"


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def scorer():
    return _read_json(LORA_DIR / "scorer.json")


@pytest.fixture(scope="module")
def heldout():
    with open(QUERIES, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    from paddlenlp.transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE_DIR))


def _load_base():
    from paddlenlp.transformers import AutoModelForCausalLM

    # Stored in float16; CPU has no float16 kernels, so upcast on load.
    model = AutoModelForCausalLM.from_pretrained(str(BASE_DIR), dtype="float32")
    model.eval()
    return model


def _label_ids(tokenizer, scorer):
    ids = []
    for label in scorer["labels"]:
        toks = tokenizer(scorer["label_prefix"] + label, add_special_tokens=False)["input_ids"]
        assert len(toks) == 1, (label, toks)
        ids.append(toks[0])
    return ids


def _predict(model, tokenizer, scorer, queries):
    """Argmax over the label tokens of the next-token logits after the prompt (one batch)."""
    label_ids = _label_ids(tokenizer, scorer)
    enc = [
        tokenizer(scorer["template"].format(query=q["query"]), add_special_tokens=False)["input_ids"]
        for q in queries
    ]
    length = max(map(len, enc))
    ids = np.full((len(enc), length), tokenizer.pad_token_id, dtype="int64")
    mask = np.zeros((len(enc), length), dtype="int64")
    for i, e in enumerate(enc):  # right padding: real positions are unaffected under a causal mask
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    with paddle.no_grad():
        logits = model(
            input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), return_dict=True
        ).logits.numpy()
    last = logits[np.arange(len(enc)), [len(e) - 1 for e in enc]][:, label_ids]
    return [scorer["labels"][int(k)] for k in last.argmax(axis=-1)]


@pytest.fixture(scope="module")
def predictions(tokenizer, scorer, heldout):
    from paddlenlp.peft import LoRAModel

    base_preds = _predict(_load_base(), tokenizer, scorer, heldout)
    lora_model = LoRAModel.from_pretrained(_load_base(), str(LORA_DIR))
    lora_model.eval()
    lora_preds = _predict(lora_model, tokenizer, scorer, heldout)
    return base_preds, lora_preds


def _accuracy(preds, heldout):
    return sum(p == q["label"] for p, q in zip(preds, heldout)) / len(heldout)


def test_expected_files_only():
    assert sorted(p.name for p in BASE_DIR.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model_state.pdparams",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert sorted(p.name for p in LORA_DIR.iterdir()) == [
        "lora_config.json",
        "lora_model_state.pdparams",
        "scorer.json",
    ]


def test_base_weights_stored_in_float16():
    assert _read_json(BASE_DIR / "config.json")["dtype"] == "float16"
    state = paddle.load(str(BASE_DIR / "model_state.pdparams"), return_numpy=True)
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    assert arrays
    assert {str(v.dtype) for v in arrays.values()} == {"float16"}


def test_adapter_files(scorer):
    cfg = _read_json(LORA_DIR / "lora_config.json")
    assert cfg["r"] == 8 and cfg["rslora"] is False
    assert (LORA_DIR / cfg["base_model_name_or_path"]).resolve() == BASE_DIR.resolve()
    assert len(cfg["target_modules"]) == 7
    state = paddle.load(str(LORA_DIR / "lora_model_state.pdparams"), return_numpy=True)
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    assert arrays and all(".lora_A" in k or ".lora_B" in k for k in arrays)
    assert {str(v.dtype) for v in arrays.values()} == {"float32"}
    assert "{query}" in scorer["template"]
    assert scorer["labels"] == ["goods", "life"]


def test_tokenizer(tokenizer, scorer):
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert len(set(_label_ids(tokenizer, scorer))) == len(scorer["labels"])


def test_base_loads_in_float32_on_cpu():
    model = _load_base()
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.float32"}


def test_heldout_queries(heldout):
    assert 100 <= len(heldout) <= 200
    assert len({q["id"] for q in heldout}) == len(heldout)
    assert len({q["query"] for q in heldout}) == len(heldout)
    counts = {label: sum(q["label"] == label for q in heldout) for label in ("goods", "life")}
    assert counts["goods"] == counts["life"]


def test_adapter_changes_answers(predictions, heldout):
    base_preds, lora_preds = predictions
    acc_base, acc_lora = _accuracy(base_preds, heldout), _accuracy(lora_preds, heldout)
    assert acc_lora >= 0.95
    assert acc_base <= 0.70
    metrics = _read_json(METRICS)
    assert abs(acc_lora - metrics["heldout_accuracy_with_adapter"]) <= 0.01
    assert abs(acc_base - metrics["heldout_accuracy_base_only"]) <= 0.01
