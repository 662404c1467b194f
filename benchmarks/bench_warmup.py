"""Does a run pay shape-specific set-up in its first batches? (issue 11's warm-up question)

One fresh process: a generated 25M-parameter Llama (hidden 384, 6 layers, vocab 32000), 128 demo
prompts in length-sorted batches of 8 (17 distinct widths), scored three times in a row through the
real Classifier. The first pass is what a small job or `smoke` pays; if set-up per new shape mattered,
pass 1 would be clearly slower than passes 2-3 (same shapes again).

    python benchmarks/bench_warmup.py --json OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
              num_key_value_heads=6, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def build() -> Path:
    out = common.CACHE / "llama25m"
    if (out / "config.json").is_file():
        return out
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from paddle_scorer.process.environment import paddle

    paddle().seed(1)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    import shutil

    for f in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(common.DEMO_BASE / f, tmp / f)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    folder = build()
    t0 = time.perf_counter()
    from paddle_scorer.model.loader import load
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    loaded = load(folder, device="cpu")
    clf = Classifier(loaded, ClassifyOptions(labels=["goods", "life"], template=common.demo_template()))
    preps = [clf.prepare(q, q["id"], "x") for q in common.read_queries()[:128]]
    order = sorted(preps, key=lambda p: len(p.context), reverse=True)
    load_s = time.perf_counter() - t0

    def run() -> list[float]:
        times = []
        for i in range(0, len(order), 8):
            t = time.perf_counter()
            clf.score(order[i:i + 8])
            times.append(time.perf_counter() - t)
        return times

    passes = [run() for _ in range(3)]
    first_batch = passes[0][0]
    steady_first_batch = statistics.median([p[0] for p in passes[1:]])
    common.dump({"load_seconds": load_s, "passes": [sum(p) for p in passes], "records": len(order),
                 "widths": len({len(p.context) for p in order}), "first_batch": first_batch,
                 "steady_first_batch": steady_first_batch}, a.json)


if __name__ == "__main__":
    main()
