"""Real-size rows of RESULTS.md (issue 11): load, streamed vs in-RAM, streamed RSS vs --memory-limit, 7B.

    python benchmarks/run_realsize.py [--quick] [--skip-7b] [--out benchmarks/RESULTS-realsize.md]

Every measurement is a child process of bench_realsize.py (peak RSS is the child's own). The generated
checkpoints go to benchmarks/.cache (0.9B: 1.9 GB, 1.5B: 3.1 GB, 7B: 13.5 GB); the 7B row is skipped
when less than 40 GB of disk is free (said so in the output).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PY = sys.executable
GiB = 1024**3


def child(*args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    t0 = time.perf_counter()
    p = subprocess.run([PY, "-W", "ignore", str(HERE / "bench_realsize.py"), *args, "--json", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_realsize.py {' '.join(args)} failed:\n{p.stdout[-4000:]}")
    print(f"  bench_realsize.py {' '.join(args)}: {time.perf_counter() - t0:.0f}s", flush=True)
    data = json.loads(out.read_text())
    out.unlink()
    return data


def warmup() -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    p = subprocess.run([PY, "-W", "ignore", str(HERE / "bench_warmup.py"), "--json", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_warmup.py failed:\n{p.stdout[-4000:]}")
    data = json.loads(out.read_text())
    out.unlink()
    return data


def gib(n) -> str:
    return f"{n / GiB:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer records (numbers are noise)")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--out", default=str(HERE / "RESULTS-realsize.md"))
    a = ap.parse_args()
    started = datetime.now(timezone.utc)
    load0 = common.loadavg()
    rows: list[str] = []
    targets: list[tuple[str, str, str]] = []

    # 0. warm-up: do the first batches pay shape-specific set-up?
    w = warmup()
    p1, p2, p3 = w["passes"]
    per = [x / w["records"] * 1000 for x in (p1, p2, p3)]
    rows.append("## Warm-up: do the first batches pay set-up? (generated 25M Llama, 128 prompts, batches of 8)\n")
    rows.append(f"{w['widths']} distinct batch widths. Three passes over the same batches in one fresh process:\n")
    rows.append("| pass | seconds | ms/record |\n|---|---:|---:|")
    for k, (x, m) in enumerate(zip((p1, p2, p3), per), 1):
        rows.append(f"| {k}{' (cold: what a small job or smoke pays)' if k == 1 else ''} | {x:.2f} | {m:.1f} |")
    rows.append(f"\nFirst batch of the process {w['first_batch'] * 1000:.0f} ms vs the same batch warm "
                f"{w['steady_first_batch'] * 1000:.0f} ms. Pass 1 / passes 2-3 = **{p1 / ((p2 + p3) / 2):.2f}x**: "
                "with the lazy build and the packed single-forward path there is no per-shape set-up left to "
                "cut, so lengths are not bucketed (bucketing would add padded tokens for nothing).\n")

    # 1. in-RAM load of a 0.94B float16 checkpoint
    child("gen", "llama-0.9b")
    ld = child("load", "llama-0.9b")
    rc = child("readcast", "llama-0.9b")
    rss_ratio = ld["ratio_above_baseline"]
    time_ratio = ld["seconds"] / rc["seconds"]
    rows.append("## Loading in RAM (generated 0.94B-parameter Llama, float16 `.pdparams`, 1.9 GB)\n")
    rows.append("| | measured |\n|---|---:|")
    rows.append(f"| float32 weights | {gib(ld['fp32_bytes'])} |")
    rows.append(f"| interpreter with paddle + paddlenlp imported (baseline RSS) | {gib(ld['baseline_rss'])} |")
    rows.append(f"| peak RSS of `load()` | {gib(ld['peak_rss'])} = baseline + **{rss_ratio:.2f}x** the float32 weights |")
    rows.append(f"| `load()` time | {ld['seconds']:.1f} s |")
    rows.append(f"| reading every tensor + casting to float32 (the floor) | {rc['read_seconds']:.1f} s + "
                f"{rc['cast_seconds']:.1f} s = {rc['seconds']:.1f} s |")
    rows.append(f"| load time / (read + cast) | **{time_ratio:.2f}x** |\n")
    targets.append(("in-RAM load peak RSS <= 1.2x the float32 weights + baseline", f"{rss_ratio:.2f}x",
                    "met" if rss_ratio <= 1.2 else "missed"))
    targets.append(("in-RAM load time <= 2x read + cast", f"{time_ratio:.2f}x", "met" if time_ratio <= 2 else "missed"))

    # 2. streamed vs in-RAM on a model that fits
    n = 64 if a.quick else 256
    ram = child("classify", "llama-0.9b", "--records", str(n), "--execution", "in-ram")
    streamed = child("classify", "llama-0.9b", "--records", str(n), "--execution", "streamed", "--block", str(n))
    ratio = ram["scoring_seconds"] / streamed["scoring_seconds"]
    s = streamed["streaming"]
    rows.append(f"## Streamed vs in RAM on a model that fits (0.94B, {n} demo prompts, labels goods/life)\n")
    rows.append("| execution | scoring seconds | records/s | peak RSS | bytes read |\n|---|---:|---:|---:|---:|")
    rows.append(f"| in RAM | {ram['scoring_seconds']:.1f} | {n / ram['scoring_seconds']:.2f} | {gib(ram['peak_rss'])} | "
                "the checkpoint, once, at load |")
    rows.append(f"| streamed (1 block of {n}) | {streamed['scoring_seconds']:.1f} | {n / streamed['scoring_seconds']:.2f} | "
                f"{gib(streamed['peak_rss'])} | {gib(s['bytes_read'])} |")
    rows.append(f"\nStreamed throughput = **{ratio:.2f}x** in RAM (reader waited {s['wait_seconds']:.1f} s; the "
                f"background reader spent {s['read_seconds']:.1f} s reading and casting, overlapped with compute).\n")
    targets.append((f"streamed >= 0.9x in-RAM throughput ({n} records)", f"{ratio:.2f}x", "met" if ratio >= 0.9 else "missed"))

    # 3. streamed peak RSS against --memory-limit on a model 3x bigger than the limit
    child("gen", "llama-1.5b")
    limit = int(1.9 * GiB)  # float32 weights 5.77 GiB: >= 3x the limit
    big = child("classify", "llama-1.5b", "--records", "16" if a.quick else "64", "--memory-limit", "1.9GB")
    fp32 = 4 * big["params"]
    rows.append("## Streamed within a memory limit (generated 1.55B Llama, float16 sharded safetensors, 3.1 GB)\n")
    rows.append("| | measured |\n|---|---:|")
    rows.append(f"| float32 weights / --memory-limit | {gib(fp32)} / {gib(limit)} = {fp32 / limit:.1f}x |")
    rows.append(f"| execution chosen by the memory rule | {big['execution']} (blocks of {big['block_records']}) |")
    rows.append(f"| peak RSS of the whole classify process | **{gib(big['peak_rss'])}** |")
    rows.append(f"| bytes read | {gib(big['streaming']['bytes_read'])} |")
    rows.append(f"| records/s | {big['records'] / big['scoring_seconds']:.2f} |\n")
    targets.append(("streamed peak RSS <= --memory-limit (weights >= 3x the limit)",
                    f"{gib(big['peak_rss'])} vs {gib(limit)}", "met" if big["peak_rss"] <= limit else "missed"))

    # 4. the Llama-2-7B-shaped checkpoint
    free = shutil.disk_usage(common.CACHE.parent).free
    if a.skip_7b or (free < 40 * GiB and not (common.CACHE / "llama-7b" / "config.json").is_file()):
        why = "--skip-7b" if a.skip_7b else f"only {gib(free)} of disk free (< 40 GiB)"
        rows.append(f"## Llama-2-7B-shaped checkpoint\n\nSkipped this time: {why}.\n")
    else:
        gen = child("gen", "llama-7b")
        peak = child("peak")["gflops"]
        k = 8 if a.quick else 32
        r7 = child("classify", "llama-7b", "--records", str(k))
        gflops = r7["flops"] / r7["scoring_seconds"] / 1e9
        rows.append("## A Llama-2-7B-shaped checkpoint on this 2-core box\n")
        rows.append(f"Hidden 4096, 32 layers, MLP 11008, vocab 32000 ({gen['params'] / 1e9:.2f}B parameters), random "
                    f"float16 weights in 7 safetensors shards ({gib(gen['bytes'])}); float32 would be "
                    f"{gib(4 * gen['params'])}, more than this machine's RAM.\n")
        rows.append("| | measured |\n|---|---:|")
        rows.append(f"| execution chosen by the memory rule (default budget) | {r7['execution']} (blocks of {r7['block_records']}) |")
        rows.append(f"| prompts | {k} demo prompts ({r7['tokens']} prompt tokens), labels goods/life |")
        rows.append(f"| prompts/minute | **{k / r7['scoring_seconds'] * 60:.1f}** ({r7['scoring_seconds']:.0f} s scoring, "
                    f"{r7['wall_seconds']:.0f} s wall incl. start-up) |")
        rows.append(f"| peak RSS | {gib(r7['peak_rss'])} |")
        rows.append(f"| bytes read | {gib(r7['streaming']['bytes_read'])} (each layer once per block) |")
        rows.append(f"| achieved (useful FLOPs: real tokens, causal attention, one LM-head row per prompt) | "
                    f"**{gflops:.0f} GFLOP/s** = {gflops / peak:.0%} of the best measured fp32 GEMM peak "
                    f"({peak:.0f} GFLOP/s on [1024, 4096] x [4096, 11008], same run) |\n")
        targets.append(("7B-shaped: >= 50% of the matmul peak", f"{gflops / peak:.0%}", "met" if gflops / peak >= 0.5 else "missed"))

    head = ["# Real-size models (issue 11)\n",
            f"Measured {started:%Y-%m-%d %H:%M} UTC with `python benchmarks/run_realsize.py"
            f"{' --quick' if a.quick else ''}`; 1-minute load average {load0:.2f} at the start, {common.loadavg():.2f} at "
            "the end. Each row is one child process.\n",
            "| target | measured | |\n|---|---|---|"]
    head += [f"| {t} | {m} | **{v}** |" for t, m, v in targets]
    Path(a.out).write_text("\n".join(head) + "\n\n" + "\n".join(rows) + "\n")
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
