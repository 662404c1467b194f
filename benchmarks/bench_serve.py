"""lm-eval multiple-choice throughput through `paddle-scorer serve` vs `classify`, same prompts, same model.

    python benchmarks/bench_serve.py [--quick] [--models demo,big] [--n 150] [--n-big 32] [--reps 3] [--reps-big 1] [--out benchmarks/RESULTS-serve.md]

For each model: `classify` (the Classifier, batch 8, in this process) scores the demo queries with the
labels goods/life; then `serve` runs in a child process on a loopback port and lm-evaluation-harness'
own `local-completions` client (the class `lm_eval --model local-completions` uses, remote tokenizer)
scores the same (prompt, " label") pairs with `loglikelihood`, as a multiple_choice task does: two
requests per prompt, one per choice. Each side is timed as a median of --reps runs after a warm-up,
and lm-eval's per-choice values are checked against classify's (max |diff|).

lm-eval configurations: its defaults (batch_size 1, num_concurrent 1), and batch_size 8 with
num_concurrent 4 (what tests/test_serve_server.py and the README run). "requests only" times
lm-eval's `_loglikelihood_tokens` on pre-tokenized pairs: the same, minus the two /tokenize calls
per choice that `loglikelihood` makes first.

Client and server share this machine's cores, as they do when both run on one host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

LABELS = ["goods", "life"]
CONFIGS = [("lm-eval defaults (batch_size 1, num_concurrent 1)", 1, 1), ("batch_size 8, num_concurrent 4", 8, 4)]


def start_server(model: Path, lora: Path) -> tuple[subprocess.Popen, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = str(common.REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "paddle_scorer", "serve", "--model", str(model), "--lora", str(lora), "--port", "0",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit(f"serve did not start: {proc.stderr.read()}")


def median_time(fn, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_model(name: str, model: Path, lora: Path, n: int, reps: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from paddle_scorer.model.loader import load
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    rows = common.read_queries(n)
    template = common.demo_template()
    loaded = load(model, lora, device="cpu")
    clf = Classifier(loaded, ClassifyOptions(labels=LABELS, template=template, batch_size=8))
    preps = [clf.prepare(r, r.get("id", i), f"#{i}") for i, r in enumerate(rows)]
    t_clf, recs = median_time(lambda: clf.score(preps), reps)
    ref = [[r["logprobs"][lab] for lab in LABELS] for r in recs]
    result = {"model": name, "prompts": len(rows), "mean_prompt_tokens": statistics.mean(len(p.context) for p in preps),
              "classify_s": t_clf, "classify_prompts_per_s": len(rows) / t_clf, "lm_eval": []}
    # Where the server's time goes, per sequence (one prompt + " goods", as lm-eval sends it), in process.
    from paddle_scorer.compute.choose_backend import backend_for

    backend = backend_for(loaded)
    seqs = [p.context + p.label_ids[0] for p in preps[:8]]
    per = lambda fn: median_time(fn, reps)[0] / len(seqs) * 1000
    result["ms_per_sequence"] = {
        "classify (per prompt, both labels)": t_clf / len(rows) * 1000,
        "sequence_logprobs, top 1 (what an echo request with logprobs 1 runs)": per(
            lambda: [backend.sequence_logprobs([s], 1) for s in seqs]),
        "sequence_logprobs, top 0": per(lambda: [backend.sequence_logprobs([s], 0) for s in seqs]),
        "next_token_logprobs (LM head at the last position only)": per(
            lambda: [backend.next_token_logprobs([s]) for s in seqs]),
    }

    proc, url = start_server(model, lora)
    try:
        for label, bs, conc in CONFIGS:
            lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", tokenizer_backend="remote",
                                     max_length=int(json.loads((model / "config.json").read_text())["max_position_embeddings"]),
                                     batch_size=bs, num_concurrent=conc)
            instances = [Instance("loglikelihood", {}, (template.format(**r), " " + lab), i * 2 + j)
                         for i, r in enumerate(rows) for j, lab in enumerate(LABELS)]
            t_all, out = median_time(lambda: lm.loglikelihood(instances, disable_tqdm=True), reps)
            got = [[out[2 * i][0], out[2 * i + 1][0]] for i in range(len(rows))]
            pairs = [((c, x), *lm._encode_pair(c, x)) for c, x in (inst.args for inst in instances)]
            t_req, _ = median_time(lambda: lm._loglikelihood_tokens(pairs, disable_tqdm=True), reps)
            health = json.loads(__import__("urllib.request").request.urlopen(f"{url}/health").read())
            result["lm_eval"].append({
                "config": label, "batch_size": bs, "num_concurrent": conc, "total_s": t_all,
                "prompts_per_s": len(rows) / t_all, "requests_only_s": t_req,
                "requests_only_prompts_per_s": len(rows) / t_req,
                "max_abs_diff_vs_classify": max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r)),
                "largest_score_pass": health["engine"]["largest_score_pass"],
            })
            print(f"  {name} {label}: {len(rows) / t_all:.1f} prompts/s (classify {len(rows) / t_clf:.1f})", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Benchmarks: `serve` + lm-evaluation-harness vs `classify`", "",
        f"Measured {meta['date']} with `python benchmarks/bench_serve.py{' --quick' if meta['quick'] else ''}` in "
        f"{meta['minutes']:.1f} min. Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores usable; "
        f"1-minute load average {meta['load_start']:.2f} at the start, {meta['load_end']:.2f} at the end (a shared "
        "machine: read the ratios, not the absolute numbers). Versions: paddlepaddle "
        f"{meta['machine']['versions'].get('paddlepaddle')}, paddlenlp {meta['machine']['versions'].get('paddlenlp')}, "
        f"lm-eval {meta['lm_eval']}.", "",
        "Task: the demo multiple-choice task (the demo queries in the demo template, choices ` goods`/` life`), "
        "scored by lm-eval's `local-completions` client (`loglikelihood`, remote tokenizer) against `paddle-scorer "
        "serve` in a child process on a loopback port, and by `classify` (batch 8) in process. Medians of the "
        "repetitions after a warm-up. *requests only*: lm-eval's requests on pre-tokenized pairs (without its two "
        "`/tokenize` calls per choice).", "",
        "| model | prompts (mean tokens) | lm-eval configuration | serve + lm-eval prompts/s | requests only prompts/s | "
        "classify prompts/s | serve / classify | max abs diff vs classify |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for e in r["lm_eval"]:
            lines.append(
                f"| {r['model']} | {r['prompts']} ({r['mean_prompt_tokens']:.0f}) | {e['config']} | "
                f"{e['prompts_per_s']:.1f} | {e['requests_only_prompts_per_s']:.1f} | {r['classify_prompts_per_s']:.1f} | "
                f"**{e['prompts_per_s'] / r['classify_prompts_per_s']:.2f}x** | {e['max_abs_diff_vs_classify']:.1e} |")
    lines += ["", "Where the server's time goes: milliseconds per sequence (one prompt + ` goods`, one at a time, in "
              "process, no HTTP), next to classify's time per prompt.", "",
              "| model | " + " | ".join(results[0]["ms_per_sequence"]) + " |",
              "|---|" + "---:|" * len(results[0]["ms_per_sequence"])]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.1f}" for v in r["ms_per_sequence"].values()) + " |")
    lines += ["", WHY, ""]
    return "\n".join(lines)


WHY = """Why serve + lm-eval is slower than classify on the same prompts:

- **One sequence per choice.** lm-eval's multiple_choice sends each (prompt, choice) pair as its own
  sequence: with 2 choices the prompt is encoded twice. `classify` encodes each prompt once and reads
  every single-token label off the one next-token distribution (multi-token labels share the prompt
  too, packed behind it in the same forward).
- **Log-probs at every position.** An echo request returns the log-prob (and top-`logprobs` entries)
  of every prompt token, because the client cuts the continuation out at `ctxlen`: the LM head,
  log-softmax and a top-n sort run at every position. `classify` runs the LM head only where a label
  token is predicted: for a 32000-token vocabulary that head is a large share of the forward.
- **Tokenization round trips and HTTP.** With the remote tokenizer, lm-eval calls `/tokenize` twice per
  choice (context, and context + continuation) before sending the request; each request is JSON over
  HTTP, with ~40 floats and top-1 dicts per sequence in the answer. On these 2 cores the client, the
  server's HTTP loop and the model also compete for the same CPU.
- Batching on the server (requests arriving together share one forward) is what lm-eval's
  `batch_size`/`num_concurrent` buy: the second configuration, not the defaults, is the one to use.

The log-likelihoods are the same numbers either way (last column)."""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few prompts, one repetition: checks the script")
    ap.add_argument("--models", default="demo,big", help="demo and/or big (the generated ~58M Llama)")
    ap.add_argument("--n", type=int, default=150, help="prompts for the demo model (it has 150 queries)")
    ap.add_argument("--n-big", type=int, default=32, help="prompts for the ~58M model")
    ap.add_argument("--reps-big", type=int, default=1, help="repetitions for the ~58M model (after a warm-up)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "RESULTS-serve.md"))
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_big, args.reps, args.reps_big = 16, 8, 1, 1
    import importlib.metadata

    t0 = time.time()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
            "machine": common.machine(), "load_start": common.loadavg(),
            "lm_eval": importlib.metadata.version("lm_eval")}
    results = []
    for name in args.models.split(","):
        if name == "demo":
            model, lora, label = common.DEMO_BASE, common.DEMO_LORA, "demo (1.0M, vocab 512)"
        else:
            model, lora = common.build_big()
            label = "~58M generated (vocab 32000)"
        big = name != "demo"
        results.append(bench_model(label, model, lora, args.n_big if big else args.n, args.reps_big if big else args.reps))
    meta["load_end"] = common.loadavg()
    meta["minutes"] = (time.time() - t0) / 60
    Path(args.out).write_text(markdown(results, meta))
    if args.json:
        common.dump({"meta": meta, "results": results}, args.json)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
