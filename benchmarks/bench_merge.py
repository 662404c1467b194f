"""``merge`` peak RSS vs checkpoint size, and ``loader.load`` time, for the generated ~58M model.

    python benchmarks/bench_merge.py [--json OUT]

``paddle-scorer merge`` runs in a child process whose resident memory is polled every 5 ms with
psutil (children included); load times are measured in fresh child processes so nothing is cached
in Python between runs (the OS page cache is warm after the first read, as for a user re-running).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCORER = Path(sys.executable).with_name("paddle-scorer")

LOAD_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
from paddle_scorer.model.loader import load
from paddle_scorer.process.environment import paddle
paddle()
t1 = time.perf_counter()
loaded = load(sys.argv[1], sys.argv[2] or None, mode=sys.argv[3])
t2 = time.perf_counter()
import psutil
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "rss": psutil.Process().memory_info().rss}))
"""


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.005)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}")
    return peak, time.perf_counter() - t0, out


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".pdparams", ".safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    common.build_big()
    res = {"merge": {}, "load": {}}
    cases = [("~58M generated (float32)", common.BIG_BASE, common.BIG_LORA),
             ("demo (float16)", common.DEMO_BASE, common.DEMO_LORA)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, base, lora in cases:
            out = Path(tmp) / "merged"
            peak, secs, text = peak_rss([str(SCORER), "merge", "--model", str(base), "--lora", str(lora), "--out", str(out),
                                         "--force"])
            # the baseline: the same interpreter doing nothing but importing the CLI
            idle, _, _ = peak_rss([sys.executable, "-c", "import paddle_scorer.cli.app, psutil, time; time.sleep(0.3)"])
            size = weight_bytes(base)
            res["merge"][name] = {"checkpoint_bytes": size, "peak_rss_bytes": peak, "ratio": peak / size,
                                  "python_baseline_rss_bytes": idle, "ratio_above_baseline": (peak - idle) / size,
                                  "seconds": secs, "merged_bytes": weight_bytes(out),
                                  "reported": [ln.strip() for ln in text.splitlines() if "peak RSS" in ln]}
            print(name, res["merge"][name], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    for name, base, lora, mode in [("~58M base only", common.BIG_BASE, "", "attach"),
                                   ("~58M base + adapter, attach", common.BIG_BASE, common.BIG_LORA, "attach"),
                                   ("~58M base + adapter, merge on load", common.BIG_BASE, common.BIG_LORA, "merge"),
                                   ("demo base + adapter, attach", common.DEMO_BASE, common.DEMO_LORA, "attach")]:
        runs = []
        for _ in range(args.reps):
            p = subprocess.run([sys.executable, "-W", "ignore", "-c", LOAD_SNIPPET, str(base), str(lora), mode],
                               capture_output=True, text=True, env=os.environ.copy())
            if p.returncode != 0:
                raise RuntimeError(p.stderr)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        res["load"][name] = {"load_s": statistics.median(r["load_s"] for r in runs),
                             "import_s": statistics.median(r["import_s"] for r in runs),
                             "rss_after_bytes": statistics.median(r["rss"] for r in runs),
                             "checkpoint_bytes": weight_bytes(Path(base))}
        print(name, res["load"][name], flush=True)
    common.dump(res, args.json)


if __name__ == "__main__":
    main()
