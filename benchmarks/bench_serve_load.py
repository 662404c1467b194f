"""`serve` under 36 concurrent clients for 20 s, a mixed and partly hostile load (issue 20).

Runs the load test of the suite (tests/test_serve_clients.py::test_load_many_clients_mixed_and_hostile: the demo
checkpoint served on a loopback port, every valid answer checked equal to the same request alone, /health polled
throughout) and records its summary: requests/s, latency percentiles, /health latency, server RSS before and after.

    python benchmarks/bench_serve_load.py --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "load.json"
        env = {**os.environ, "PADDLE_SCORER_LOAD_RESULT": str(result)}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_serve_clients.py::test_load_many_clients_mixed_and_hostile"],
                           cwd=HERE.parent, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not result.is_file():
            raise SystemExit(f"the load test failed:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
        summary = json.loads(result.read_text())
    print(summary)
    common.dump({"machine": common.machine(), **summary}, a.json)


if __name__ == "__main__":
    main()
