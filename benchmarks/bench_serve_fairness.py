"""serve under mixed load (issue 35): the latency of a 1-token completion while 8 clients' 1,024-label
``/v1/classify`` requests are in flight, against the same completion alone, on the demo checkpoint.

Before the light-first engine (label groups answered one at a time, light requests served between them) the
completion waited for every label group of the batch it landed in. Prints the CPU (``lscpu``), the median of
``--rounds`` rounds, and the ratio to the completion alone.

    python benchmarks/bench_serve_fairness.py [--rounds 3] [--clients 8] [--labels 1024] [--cold]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    m = re.search(r"Model name:\s*(.+)", out)
    return m.group(1).strip() if m else "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--labels", type=int, default=1024)
    ap.add_argument("--cold", action="store_true", help="the first round on a server that has answered nothing yet")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "paddle_scorer", "serve", "--model", "checkpoints/demo-base", "--lora",
           "checkpoints/demo-lora", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = None
    try:
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"serve exited: {proc.stderr.read()[-2000:]}")
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        labels = [f"label {i}" for i in range(args.labels)]
        client = httpx.Client(base_url=url, timeout=600)

        def one() -> float:
            t = time.perf_counter()
            r = client.post("/v1/completions", json={"prompt": "what is the price of cabbage", "max_tokens": 1,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t

        def big() -> None:
            r = httpx.post(url + "/v1/classify", json={"prompt": "what is the price of cabbage today?",
                                                       "labels": labels}, timeout=600)
            assert r.status_code == 200, r.text[:300]

        loaded = []
        if args.cold:  # 8 clients and the completion on a server that has answered nothing yet
            threads = [threading.Thread(target=big) for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            cold = one()
            for t in threads:
                t.join()
            print(f"cold server: the 1-token completion took {cold:.3f} s")
        big()
        one()  # warm
        alone = statistics.median(one() for _ in range(5))
        for _ in range(args.rounds):
            threads = [threading.Thread(target=big) for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            loaded.append(one())
            for t in threads:
                t.join()
        mid = statistics.median(loaded)
        print(f"CPU: {cpu()}")
        print(f"1-token completion alone: {alone:.3f} s; with {args.clients} x {args.labels}-label classify in flight: "
              f"{mid:.3f} s (median of {args.rounds}: {', '.join(f'{x:.2f}' for x in loaded)}), {mid / alone:.0f}x")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
