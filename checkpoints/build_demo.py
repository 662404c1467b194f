"""Build the tiny demo checkpoints shipped with paddle-scorer.

Run from the repository root (CPU only, about 3-4 minutes on 2 cores):

    .venv/bin/python checkpoints/build_demo.py [--out DIR]

It writes, under DIR (default: the folder holding this script):

* ``demo-base/``   a tiny Llama-architecture causal LM in PaddleNLP format
  (``config.json``, ``model_state.pdparams`` stored in **float16**,
  ``generation_config.json`` and a byte-level BPE tokenizer trained here and
  loaded by PaddleNLP's ``Qwen2Tokenizer``).
* ``demo-lora/``   a PaddleNLP LoRA adapter (``lora_config.json``,
  ``lora_model_state.pdparams`` in float32) that turns the base into a
  two-way query classifier (``goods`` vs ``life``), plus ``scorer.json``
  holding the exact prompt template and label words it was trained with.
* ``demo-queries.jsonl``  held-out labelled queries (never seen in training).
* ``demo-metrics.json``   held-out accuracy of base+adapter and of the base
  alone, training times, parameter counts and seeds.

Why the base is pre-trained with *random* labels
------------------------------------------------
LoRA cannot teach a randomly initialised model anything useful: the frozen
final norm and the small random LM head bound the logit gap, so the loss
plateaus.  The base therefore gets a short full-parameter language-modelling
run on the prompt template filled with training queries -- but with a random
label word after "Answer:" (balanced: every query in a batch appears once with
each label word).  The base learns the language of the prompts and that
" goods" / " life" follow "Answer:", yet nothing about which one is right, so
on its own it stays near chance (P(goods) ~ P(life) ~ 0.5).  Only the adapter learns
the actual task, which makes the demo a clear test that an adapter is really
applied (base alone ~50 %, base + adapter >= 95 %).

The LoRA adapter is trained on the *float16-rounded* base as reloaded from
disk (upcast to float32, since CPU has no float16 kernels), so the adapter
matches the stored weights exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Must be set before paddle is imported: MKL's fast path on AMD CPUs, one OpenMP thread per
# core, and the kernel choice the committed checkpoints were built with (reruns on this machine
# reproduce every output file byte for byte; only the timings in demo-metrics.json differ).
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("FLAGS_use_mkldnn", "0")

SEED = 1234
DATA_SEED = 7
PRETRAIN_SEED = 11
LORA_SEED = 23

TEMPLATE = "Query: {query}\nIs this query about goods or life? Answer with one word.\nAnswer:"
LABELS = ["goods", "life"]
LABEL_PREFIX = " "

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as in Llama's config defaults
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
VOCAB_SIZE = 512

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    seq_length=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

PRETRAIN = dict(steps=200, batch_size=32, lr=3e-3, warmup=20, weight_decay=0.01)
LORA = dict(r=8, lora_alpha=16, steps=100, batch_size=32, lr=3e-3, warmup=20)
LORA_TARGETS = [".*q_proj.*", ".*k_proj.*", ".*v_proj.*", ".*o_proj.*", ".*gate_proj.*", ".*up_proj.*", ".*down_proj.*"]
HELDOUT_PER_LABEL = 75

# --------------------------------------------------------------------------------------------
# Synthetic data: many templates x many fillers per label.
# --------------------------------------------------------------------------------------------

GOODS_TEMPLATES = [
    "what is the price of {x} today?",
    "where can I buy {x}?",
    "how much does {x} cost at the market?",
    "is {x} on sale this week?",
    "which shop sells {x}?",
    "compare prices of {x} online",
    "can I order {x} for home delivery?",
    "what is the best brand of {x}?",
    "are there any discounts on {x}?",
    "where can I get {x} at a good price?",
    "did the price of {x} go up?",
    "I want to buy {x}, is there a store nearby?",
    "cheapest place to buy {x} near me",
    "is {x} in stock at the supermarket?",
    "how do I pay for {x} in instalments?",
    "how much is {x} per kilo?",
    "should I buy {x} now or wait for a sale?",
    "which website has {x} on offer?",
]

GOODS_ITEMS = [
    "cabbage", "apples", "rice", "eggs", "milk", "bread", "potatoes", "tomatoes", "chicken",
    "beef", "fish", "onions", "carrots", "bananas", "oranges", "coffee", "green tea", "sugar",
    "flour", "cooking oil", "shampoo", "toothpaste", "soap", "a laptop", "a new phone",
    "headphones", "running shoes", "a winter jacket", "jeans", "a sofa", "a fridge",
    "a washing machine", "batteries", "light bulbs", "diapers", "olive oil", "cheese",
    "butter", "garlic", "a bicycle", "a microwave", "strawberries", "honey", "a tablet",
]

LIFE_TEMPLATES = [
    "how do I {x}?",
    "what is the fastest way to {x}?",
    "can someone help me {x}?",
    "where should I go to {x}?",
    "is it possible to {x} online?",
    "what documents do I need to {x}?",
    "how long does it take to {x}?",
    "I need to {x}, what should I do?",
    "what are the steps to {x}?",
    "who can I call to {x}?",
    "can I {x} on a weekend?",
    "is there a fee to {x}?",
    "what office do I visit to {x}?",
    "how early should I book to {x}?",
    "any tips on how to {x}?",
    "do I need an appointment to {x}?",
    "how much does it cost to {x}?",
    "what time does the office open to {x}?",
]

LIFE_TOPICS = [
    "renew my driving licence", "apply for a passport", "register my child for school",
    "book a doctor appointment", "pay my electricity bill", "report a lost wallet",
    "change my home address", "get a library card", "find a plumber",
    "set up internet at home", "open a bank account", "get to the train station",
    "apply for a work permit", "get a flu vaccination", "file my tax return",
    "register my car", "find a babysitter", "sign up for yoga classes",
    "cancel my gym membership", "get a marriage certificate", "call an ambulance",
    "see a dentist", "renew my visa", "pay a parking fine", "rent an apartment",
    "find a good school", "get a birth certificate", "transfer my water bill",
    "report a broken street light", "book a taxi to the airport", "get a residence permit",
    "find a family doctor", "move to a new city", "apply for unemployment benefits",
    "vote in the local election", "adopt a dog", "get my car repaired",
    "enrol in evening classes", "take the bus downtown", "set up a pension plan",
    "find a hospital nearby", "get my garbage collected",
]


def make_queries(seed: int):
    """All template x filler combinations, split into train / held-out by combination."""
    rng = random.Random(seed)
    train, heldout = [], []
    for label, templates, fillers in (
        ("goods", GOODS_TEMPLATES, GOODS_ITEMS),
        ("life", LIFE_TEMPLATES, LIFE_TOPICS),
    ):
        combos = [(t, f) for t in templates for f in fillers]
        rng.shuffle(combos)
        for i, (t, f) in enumerate(combos):
            text = t.format(x=f)
            text = text[0].upper() + text[1:] if i % 3 == 0 else text  # a little casing variety
            (heldout if i < HELDOUT_PER_LABEL else train).append({"query": text, "label": label})
    rng.shuffle(train)
    rng.shuffle(heldout)
    heldout = [{"id": f"q{i + 1:04d}", **q} for i, q in enumerate(heldout)]
    assert not {q["query"] for q in train} & {q["query"] for q in heldout}
    return train, heldout


def prompt_of(query: str) -> str:
    return TEMPLATE.format(query=query)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# The pre-tokenisation regex of PaddleNLP's Qwen2Tokenizer, so that the BPE merges are learnt on
# exactly the chunks the PaddleNLP tokenizer will produce.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts, out_dir: Path):
    """Train a byte-level BPE and save it as vocab.json/merges.txt for PaddleNLP's Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        from paddlenlp.transformers import Qwen2Tokenizer

        ptok = Qwen2Tokenizer(
            vocab_file=os.path.join(tmp, "vocab.json"),
            merges_file=os.path.join(tmp, "merges.txt"),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=UNK,
            model_max_length=MODEL_CONFIG["max_position_embeddings"],
            padding_side="right",
        )
        ptok.save_pretrained(str(out_dir))
    return tok


# --------------------------------------------------------------------------------------------
# Batching, loss, evaluation
# --------------------------------------------------------------------------------------------


def encode_examples(tokenizer, queries, labels):
    """Token ids of prompt + label prefix + label + eos, and the prompt length of each example."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    out = []
    for q, lab in zip(queries, labels):
        p_ids = tokenizer(prompt_of(q), add_special_tokens=False)["input_ids"]
        l_ids = tokenizer(LABEL_PREFIX + lab, add_special_tokens=False)["input_ids"]
        out.append((p_ids + l_ids + [eos_id], len(p_ids)))
    return out


def make_batch(examples, pad_id, loss_from_prompt_end: bool):
    """Right-padded batch: input_ids, attention_mask and next-token targets (-100 = ignored)."""
    import numpy as np
    import paddle

    L = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), L), pad_id, dtype="int64")
    mask = np.zeros((len(examples), L), dtype="int64")
    targets = np.full((len(examples), L), -100, dtype="int64")
    for i, (seq, plen) in enumerate(examples):
        n = len(seq)
        ids[i, :n] = seq
        mask[i, :n] = 1
        start = plen - 1 if loss_from_prompt_end else 0  # position predicting the first label token
        targets[i, start : n - 1] = seq[start + 1 : n]
    return paddle.to_tensor(ids), paddle.to_tensor(mask), paddle.to_tensor(targets)


def lm_loss(model, ids, mask, targets):
    import paddle.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
    logits = logits.reshape([-1, logits.shape[-1]]).astype("float32")
    targets = targets.reshape([-1])
    # Paddle's reduction="mean" divides by ALL positions, ignored ones included: average ourselves.
    total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return total / (targets != -100).astype("float32").sum()


def label_token_ids(tokenizer):
    ids = []
    for lab in LABELS:
        toks = tokenizer(LABEL_PREFIX + lab, add_special_tokens=False)["input_ids"]
        assert len(toks) == 1, f"label {lab!r} is not a single token: {toks}"
        ids.append(toks[0])
    return ids


def accuracy(model, tokenizer, heldout, batch_size=64):
    """Argmax over the two label tokens of the next-token logits after the prompt."""
    import numpy as np
    import paddle

    label_ids = label_token_ids(tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    model.eval()
    correct = 0
    with paddle.no_grad():
        for s in range(0, len(heldout), batch_size):
            chunk = heldout[s : s + batch_size]
            enc = [tokenizer(prompt_of(q["query"]), add_special_tokens=False)["input_ids"] for q in chunk]
            L = max(map(len, enc))
            ids = np.full((len(enc), L), pad_id, dtype="int64")
            mask = np.zeros((len(enc), L), dtype="int64")
            for i, e in enumerate(enc):
                ids[i, : len(e)] = e
                mask[i, : len(e)] = 1
            logits = model(
                input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask), return_dict=True
            ).logits.numpy()
            for i, e in enumerate(enc):
                pred = LABELS[int(np.argmax(logits[i, len(e) - 1, label_ids]))]
                correct += pred == chunk[i]["label"]
    model.train()
    return correct / len(heldout)


def cosine_lr(base_lr, warmup, total):
    import paddle

    return paddle.optimizer.lr.LambdaDecay(
        base_lr,
        lambda step: (step + 1) / warmup
        if step < warmup
        else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))),
    )


def train_loop(model, params, batches_fn, cfg, log_prefix):
    import paddle

    sched = cosine_lr(cfg["lr"], cfg["warmup"], cfg["steps"])
    opt = paddle.optimizer.AdamW(
        learning_rate=sched,
        parameters=params,
        weight_decay=cfg.get("weight_decay", 0.0),
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    model.train()
    t0 = time.time()
    for step in range(cfg["steps"]):
        ids, mask, targets = batches_fn(step)
        loss = lm_loss(model, ids, mask, targets)
        loss.backward()
        opt.step()
        opt.clear_grad()
        sched.step()
        if step % 50 == 0 or step == cfg["steps"] - 1:
            print(f"[{log_prefix}] step {step:4d} loss {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return time.time() - t0


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def build_base(train, base_dir: Path, tokenizer):
    """Pre-train a tiny Llama (full parameters) on prompts with uninformative labels; save it in fp16."""
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(PRETRAIN_SEED)
    rng = random.Random(PRETRAIN_SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    pad_id = config.pad_token_id
    queries = [q["query"] for q in train]
    bs = PRETRAIN["batch_size"]

    def batches(step):
        # Every query appears once with each label word, so the label after "Answer:" carries no
        # information at all: the base learns the prompt language but stays at chance on the task.
        chunk = rng.sample(queries, bs // len(LABELS))
        pairs = [(q, lab) for q in chunk for lab in LABELS]
        examples = encode_examples(tokenizer, [q for q, _ in pairs], [lab for _, lab in pairs])
        return make_batch(examples, pad_id, loss_from_prompt_end=False)

    seconds = train_loop(model, model.parameters(), batches, PRETRAIN, "pretrain")

    model.eval()
    model.to(dtype="float16")  # storage only: CPU has no float16 compute kernels
    model.config.dtype = "float16"
    model.save_pretrained(str(base_dir))
    n_params = sum(int(p.size) for p in model.parameters())
    return seconds, n_params


def check_stored_fp16(base_dir: Path):
    """The saved weights must be float16 (storage only), and config.json must say so."""
    import paddle

    state = paddle.load(str(base_dir / "model_state.pdparams"), return_numpy=True)
    dtypes = {str(v.dtype) for k, v in state.items() if hasattr(v, "dtype")}
    assert dtypes == {"float16"}, dtypes
    assert json.loads((base_dir / "config.json").read_text())["dtype"] == "float16"


def load_base_fp32(base_dir: Path):
    """Load the saved base as a user would, upcast to float32 (CPU has no float16 kernels)."""
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="float32")
    assert all(p.dtype == paddle.float32 for p in model.parameters())
    model.eval()
    return model


def build_lora(train, base_dir: Path, lora_dir: Path, tokenizer):
    """Train a LoRA adapter on the fp16-rounded base (as reloaded from disk, upcast to float32)."""
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    paddle.seed(LORA_SEED)
    rng = random.Random(LORA_SEED)
    base = load_base_fp32(base_dir)
    lora_config = LoRAConfig(
        target_modules=LORA_TARGETS,
        r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=0.0,
        rslora=False,
        dtype="float32",
        base_model_name_or_path="../demo-base",
    )
    model = LoRAModel(base, lora_config)
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    encoded = encode_examples(tokenizer, [q["query"] for q in train], [q["label"] for q in train])
    bs = LORA["batch_size"]
    order = []

    def batches(step):
        nonlocal order
        if len(order) < bs:
            order = order + rng.sample(range(len(encoded)), len(encoded))
        idx, order = order[:bs], order[bs:]
        return make_batch([encoded[i] for i in idx], pad_id, loss_from_prompt_end=True)

    seconds = train_loop(model, trainable, batches, LORA, "lora")
    model.eval()
    model.save_pretrained(str(lora_dir), save_model_config=False)
    n_trainable = sum(int(p.size) for p in trainable)
    return model, seconds, n_trainable


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    base_dir, lora_dir = out / "demo-base", out / "demo-lora"
    queries_path, metrics_path = out / "demo-queries.jsonl", out / "demo-metrics.json"
    for d in (base_dir, lora_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for f in (queries_path, metrics_path):
        f.unlink(missing_ok=True)

    t_start = time.time()
    random.seed(SEED)
    import numpy as np

    np.random.seed(SEED)
    import paddle

    paddle.set_device("cpu")
    paddle.seed(SEED)
    from paddlenlp.transformers import AutoTokenizer

    train, heldout = make_queries(DATA_SEED)
    print(f"{len(train)} training queries, {len(heldout)} held-out queries", flush=True)

    tok_texts = [prompt_of(q["query"]) + LABEL_PREFIX + lab for q in train for lab in LABELS]
    train_tokenizer(tok_texts, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    label_ids = label_token_ids(tokenizer)
    print(f"tokenizer {type(tokenizer).__name__}, vocab {len(tokenizer)}, label ids {label_ids}", flush=True)

    pretrain_s, n_params = build_base(train, base_dir, tokenizer)
    check_stored_fp16(base_dir)
    base = load_base_fp32(base_dir)
    acc_base = accuracy(base, tokenizer, heldout)
    print(f"base alone: held-out accuracy {acc_base:.3f}", flush=True)
    del base

    lora_model, lora_s, n_lora = build_lora(train, base_dir, lora_dir, tokenizer)
    acc_lora = accuracy(lora_model, tokenizer, heldout)
    print(f"base + adapter: held-out accuracy {acc_lora:.3f}", flush=True)

    write_json(
        lora_dir / "scorer.json", {"template": TEMPLATE, "labels": LABELS, "label_prefix": LABEL_PREFIX}
    )
    with open(queries_path, "w", encoding="utf-8") as f:
        for q in heldout:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    metrics = {
        "heldout_accuracy_with_adapter": round(acc_lora, 4),
        "heldout_accuracy_base_only": round(acc_base, 4),
        "n_heldout": len(heldout),
        "n_train": len(train),
        "label_token_ids": dict(zip(LABELS, label_ids)),
        "base_params": n_params,
        "lora_trainable_params": n_lora,
        "pretrain_seconds": round(pretrain_s, 1),
        "lora_train_seconds": round(lora_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "seeds": {"global": SEED, "data": DATA_SEED, "pretrain": PRETRAIN_SEED, "lora": LORA_SEED},
        "pretrain": PRETRAIN,
        "lora": LORA,
        "versions": {"paddlepaddle": paddle.__version__, "paddlenlp": __import__("paddlenlp").__version__},
    }
    write_json(metrics_path, metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
