"""Datasets at production scale (issue 29): the classify pipeline around the model, and prefix reuse on vs off.

pipeline
    ``paddle-scorer classify`` on the bundled demo model over N generated demo records (the 150 held-out queries
    cycled, unique ids, a third of them varied), each size in a fresh process: wall time, time until the first
    record is on disk (the working file polled every 20 ms), peak RSS (the child's ``ru_maxrss``), and the run's own
    timing (index, prepare, score, write, finalize: ``timing`` in its .meta.json). ``--ref REV`` runs the same with
    the code of a git revision (a temporary worktree on ``PYTHONPATH``): the before/after comparison.

tokenizer
    In one process on the demo model: the fast tokenizer's own batched encode per prompt (one text) and per record
    (the texts the label-boundary rule needs: the prompt and the prompt with each label), the model's forward alone
    per record (prepared records, no prefix reuse), and ``classify``'s per-record cost (from ``pipeline``: the
    slope between the two largest sizes) against them.

reuse
    Per model (demo, the generated ~58M Llama, the 0.94B Llama), datasets scored with prefix reuse on (the default:
    windows ordered so that shared prefixes are neighbours, a prefix kept only when it saves more than it costs on
    this runner) and off (``--no-prefix-reuse``: longest first), interleaved, the faster of each kept:
    ``repeated`` (the demo queries, each 10 times: the issue's case), ``unique`` (no two prompts share more than
    the template's head), ``few-shot`` (a ~1000-token prefix before every query; ~190 on the demo, whose context
    is 256 tokens).

    python benchmarks/bench_pipeline.py [--sections pipeline,tokenizer,reuse] [--sizes 10000,100000,1000000]
        [--ref REV] [--models demo,58m,0.9b] [--json OUT]

Runs with ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset for its own processes (numpy's BLAS at its defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_var, None)


def write_records(path: Path, n: int) -> None:
    base = common.read_queries()
    with open(path, "w") as fh:
        for i in range(n):
            r = dict(base[i % len(base)])
            r["id"] = f"r{i:07d}"
            if i >= len(base) and i % 3 == 0:
                r["query"] = f"{r['query']} {i // len(base)}"
            fh.write(json.dumps(r) + "\n")


_CHILD = """
import os, resource, subprocess, sys, time, json
cmd, work = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
first = None
while p.poll() is None:
    if first is None and os.path.exists(work) and os.path.getsize(work) > 0:
        first = time.perf_counter() - t0
    time.sleep(0.02)
err = p.stderr.read().decode()
wall = time.perf_counter() - t0
print(json.dumps({"rc": p.returncode, "wall": wall, "first": first,
                  "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "err": err[-2000:]}))
"""


def run_classify(src: Path, n: int, tmp: Path, records: Path) -> dict:
    out = tmp / f"out-{n}.jsonl"
    for p in (out, out.with_name(out.name + ".meta.json")):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "paddle_scorer", "classify", "-m", str(common.DEMO_BASE), "-l", str(common.DEMO_LORA),
           "--input", str(records), "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=str(src))
    work = out.with_name(f".{out.name}.inprogress")
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cmd), str(work)], capture_output=True, text=True,
                       env=env, check=True)
    res = json.loads(r.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"classify failed ({res['rc']}): {res['err']}")
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    # report on the finished output (streams it: its memory must not grow with the records either)
    rep = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([sys.executable, "-m", "paddle_scorer", "report",
                                                                     str(out)]), str(tmp / "none")],
                         capture_output=True, text=True, env=env, check=True)
    rres = json.loads(rep.stdout)
    out.unlink()
    return {"records": n, "wall_s": res["wall"], "first_record_s": res["first"], "peak_rss_mib": res["rss"] / 2**20,
            "timing": meta.get("timing"), "windows": meta.get("windows"),
            "scoring_s_per_record": meta.get("seconds_per_record"),
            "report": {"rc": rres["rc"], "wall_s": rres["wall"], "peak_rss_mib": rres["rss"] / 2**20}}


def worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="bench-ref-"))
    subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", str(path), ref], check=True,
                   capture_output=True)
    return path


def section_pipeline(sizes: list[int], ref: str | None) -> dict:
    out = {"sizes": sizes, "rows": {}}
    trees = {"this tree": common.REPO / "src"}
    made = None
    if ref:
        made = worktree(ref)
        trees[f"ref {ref}"] = made / "src"
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            inputs = {}
            for n in sizes:
                inputs[n] = tmp / f"in-{n}.jsonl"
                write_records(inputs[n], n)
            for name, src in trees.items():
                rows = []
                for n in sizes:
                    if name != "this tree" and n > 100_000:
                        continue  # the old pipeline holds everything: a million records is hours
                    rows.append(run_classify(src, n, tmp, inputs[n]))
                    print(name, rows[-1], flush=True)
                out["rows"][name] = rows
    finally:
        if made is not None:
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(made)], check=False)
    for name, rows in out["rows"].items():
        if len(rows) >= 2:
            a, b = rows[-2], rows[-1]
            out.setdefault("derived", {})[name] = {
                "per_record_ms": 1000 * (b["wall_s"] - a["wall_s"]) / (b["records"] - a["records"]),
                "rss_growth_mib": b["peak_rss_mib"] - a["peak_rss_mib"],
                "first_record_ratio": (b["first_record_s"] or 0) / max(a["first_record_s"] or 1e-9, 1e-9),
                "between": [a["records"], b["records"]],
            }
    return out


def section_pairs(k: int) -> dict:
    """10k then 100k records, ``k`` times in a row: the issue's ratios (peak RSS, first record, time per record)
    from runs minutes apart, so that a slow spell of the machine shows as spread, not as a result."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inputs = {n: tmp / f"in-{n}.jsonl" for n in (10_000, 100_000)}
        for n, path in inputs.items():
            write_records(path, n)
        for _ in range(k):
            s, b = (run_classify(common.REPO / "src", n, tmp, inputs[n]) for n in (10_000, 100_000))
            rows.append({"rss_growth_mib": b["peak_rss_mib"] - s["peak_rss_mib"],
                         "first_record_ratio": b["first_record_s"] / s["first_record_s"],
                         "per_record_ratio": b["scoring_s_per_record"] / s["scoring_s_per_record"],
                         "small": s, "big": b})
            print("pair", {k2: v for k2, v in rows[-1].items() if k2 not in ("small", "big")}, flush=True)
    return {"rows": rows}


def section_tokenizer(n: int = 10_000) -> dict:
    from paddle_scorer import LoadOptions
    from paddle_scorer.tasks.classify import Classifier, options_with_defaults
    from paddle_scorer.tasks.loading import load_model
    from paddle_scorer.tasks.prompts import resolve_prefix

    loaded = load_model(LoadOptions(common.DEMO_BASE, common.DEMO_LORA))
    opts, _ = options_with_defaults(common.DEMO_BASE, common.DEMO_LORA)
    clf = Classifier(loaded, opts)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.jsonl"
        write_records(path, n)
        rows = [(json.loads(x)["id"], json.loads(x), f"#{i}") for i, x in enumerate(open(path))]
    prompts = [clf.prompt_text(r, w) for _, r, w in rows]
    texts = [t for p in prompts for t in [p.rstrip()] + [p + resolve_prefix(opts.label_prefix, p) + lab
                                                         for lab in opts.labels]]
    enc = clf.encoder.encoder
    enc.many(prompts[:500], True)
    t_prompt, _ = common.median_time(lambda: enc.many(prompts, True), reps=3)
    t_record, _ = common.median_time(lambda: enc.many(texts, True), reps=3)
    preps = clf.prepare_many(rows)
    # the model's work as classify does it: one window ordered, scored in blocks, output records built (prefix
    # reuse on, as the run's default), with what was alive before it frozen out of the collector's walks as the
    # run's loop does (runs.loop._collector_quiet: else the 10,000 records' objects are walked again and again)
    import gc

    gc.freeze()
    try:
        t_fwd = min(_score_like_the_loop(clf, preps, True) for _ in range(3))
    finally:
        gc.unfreeze()
    return {"records": n, "tokenizer": type(loaded.tokenizer).__name__,
            "encode_us_per_prompt": 1e6 * t_prompt / n, "encode_us_per_record": 1e6 * t_record / n,
            "texts_per_record": len(texts) // n, "forward_us_per_record": 1e6 * t_fwd / n,
            "mean_prompt_tokens": sum(len(p.context) for p in preps) / n}


def _datasets(tok, n_repeated: int, n_unique: int, n_few: int, context: int) -> dict:
    import bench_prefix

    queries = common.read_queries()
    repeated = [dict(q, id=f"{q['id']}-{k}") for k in range(10) for q in queries][:n_repeated]
    unique = [dict(queries[i % len(queries)], id=f"u{i}", query=f"{queries[i % len(queries)]['query']} #{i}")
              for i in range(n_unique)]
    target = bench_prefix.TARGET_PREFIX_TOKENS
    bench_prefix.TARGET_PREFIX_TOKENS = min(target, context - 64)  # the demo's context is 256 tokens
    try:
        few_template, prefix_tokens = bench_prefix.few_shot_template(tok)
    finally:
        bench_prefix.TARGET_PREFIX_TOKENS = target
    few = [dict(queries[i % len(queries)], id=f"f{i}") for i in range(n_few)]
    return {"repeated": (common.demo_template(), repeated), "unique": (common.demo_template(), unique),
            "few-shot": (few_template, few), "_prefix_tokens": prefix_tokens}


def _score_like_the_loop(clf, preps, reuse: bool) -> float:
    """A window as ``classify`` scores it (``tasks.classify._task``): ordered (with reuse: ``Reuse.window_order``), cut
    into blocks of ``records_per_flush``; the ordering counts in the time, as in a run."""
    block = clf.records_per_flush(preps)
    if reuse:
        clf.backend.reuse.cache.clear()
    t = time.perf_counter()
    if reuse:
        order = [preps[i] for i in clf.backend.reuse.window_order([p.context for p in preps])]
    else:
        order = sorted(preps, key=lambda p: -len(p.context))
    for s in range(0, len(order), block):
        clf.score(order[s:s + block])
    return time.perf_counter() - t


def bench_reuse_model(name: str, folder: Path, sizes: tuple[int, int, int], reps: int) -> dict:
    from paddle_scorer.model.loader import load
    from paddle_scorer.tasks.classify import Classifier, ClassifyOptions

    loaded = load(folder, None, device="cpu")
    data = _datasets(loaded.tokenizer, *sizes, loaded.context_length or 4096)
    rows = {"model": name, "params": int(loaded.facts.num_params), "prefix_tokens": data.pop("_prefix_tokens"),
            "datasets": {}}
    for ds, (template, recs) in data.items():
        clfs = {r: Classifier(loaded, ClassifyOptions(labels=["goods", "life"], template=template, chat_template=False,
                                                      prefix_reuse=r)) for r in (True, False)}
        preps = clfs[True].prepare_many([(r["id"], r, f"#{i}") for i, r in enumerate(recs)])
        clfs[True].score(preps[:4])
        clfs[False].score(preps[:4])  # warm: threads, GEMM choice, reuse costs measured
        times = {True: [], False: []}
        for _ in range(reps):
            for r in (True, False):
                times[r].append(_score_like_the_loop(clfs[r], preps, r))
        on, off = min(times[True]), min(times[False])
        stats = clfs[True].backend.reuse_stats()
        rows["datasets"][ds] = {"records": len(preps), "on_s": on, "off_s": off, "on_vs_off": on / off,
                                "on_all": times[True], "off_all": times[False],
                                "tokens_saved": stats.get("tokens_saved"), "prompt_tokens": stats.get("prompt_tokens"),
                                "shared_prefixes": stats.get("shared_prefixes"), "costs": stats.get("costs")}
        print(name, ds, rows["datasets"][ds], flush=True)
    return rows


def section_reuse(models: list[str], reps: int) -> dict:
    out = []
    for m in models:
        if m == "demo":
            out.append(bench_reuse_model("demo (0.92M)", common.DEMO_BASE, (1500, 1500, 256), reps))
        elif m == "58m":
            import bench_prefix

            out.append(bench_reuse_model("~58M", bench_prefix.model_58m_2k(), (1500, 600, 128), reps))
        elif m == "0.9b":
            import bench_realsize

            out.append(bench_reuse_model("0.94B", bench_realsize.generate("llama-0.9b"), (300, 150, 24), 1))
    return {"rows": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="pipeline,tokenizer,reuse")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--ref", help="also run the pipeline section on this git revision (before/after)")
    ap.add_argument("--models", default="demo,58m,0.9b")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=0,
                    help="section 'pairs': this many alternating 10k/100k runs (the done-when ratios, with their spread)")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"machine": common.machine()}
    sections = args.sections.split(",")
    if "pairs" in sections:
        out["pairs"] = section_pairs(args.pairs or 3)
    if "pipeline" in sections:
        out["pipeline"] = section_pipeline([int(x) for x in args.sizes.split(",")], args.ref)
    if "tokenizer" in sections:
        out["tokenizer"] = section_tokenizer()
        p = out.get("pipeline", {}).get("derived", {}).get("this tree")
        if p:
            t = out["tokenizer"]
            t["classify_vs_encode_per_prompt"] = 1000 * p["per_record_ms"] / t["encode_us_per_prompt"]
            t["classify_vs_encode_per_record"] = 1000 * p["per_record_ms"] / t["encode_us_per_record"]
            t["pipeline_without_forward_us"] = 1000 * p["per_record_ms"] - t["forward_us_per_record"]
            t["pipeline_without_forward_vs_encode_per_prompt"] = (t["pipeline_without_forward_us"]
                                                                   / t["encode_us_per_prompt"])
    if "reuse" in sections:
        out["reuse"] = section_reuse(args.models.split(","), args.reps)
    common.dump(out, args.json)


if __name__ == "__main__":
    main()
