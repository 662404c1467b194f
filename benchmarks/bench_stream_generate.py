"""Streamed layers at the read bound and generation past RAM (issue #38).

    python benchmarks/bench_stream_generate.py [--model llama-0.9b] [--prompts 8] [--new 8] [--json OUT]

On the generated ~0.94B float16 Llama of ``bench_realsize`` (the "810M" class; 1.9 GB float16, float32 weights 3.8 GB),
through the CLI as a user runs it, weights in the page cache (read once before):

* **generate**, ``--prompts`` prompts x ``--new`` new tokens, greedy: in RAM (``--no-prefix-reuse``: each record alone,
  the computation streaming repeats) and streamed (``--execution streamed``); the streamed run's own statistics give
  one pass's overhead (reading not hidden behind compute, laying out and widening: ``wait + prepare`` per pass), and
  the target is ``streamed <= 1.3 x (in RAM + passes x overhead per pass)``; the tokens must be the same;
* **classify**, one block of 64 demo prompts: streamed against in RAM (target: <= 1.5x);
* a projection of generate past RAM for Llama-2-7B's shape from the measured pass: its weights are 7.2x these, read and
  laid out per pass at the measured rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_realsize  # noqa: E402
import common  # noqa: E402

SCORER = str(Path(sys.executable).with_name("paddle-scorer"))


def warm(folder: Path) -> float:
    """Read every weight file once (the page cache holds them, as for the runs that follow); bytes/s."""
    t0, total = time.perf_counter(), 0
    for f in sorted(folder.glob("*.pdparams")) + sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - t0)


def run(args: list[str], out: Path) -> tuple[list[dict], dict, float]:
    t0 = time.perf_counter()
    p = subprocess.run([SCORER, *map(str, args), "--output", str(out), "--overwrite"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in open(out)]
    return recs, json.loads(out.with_name(out.name + ".meta.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-0.9b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--classify-prompts", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = bench_realsize.generate(args.model)
    spec = bench_realsize.SPECS[args.model]
    work = common.CACHE / "stream-generate"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in common.read_queries(args.prompts)))
    cdata = work / "classify.jsonl"
    cdata.write_text("".join(json.dumps(r) + "\n" for r in common.read_queries(args.classify_prompts)))
    read_speed = warm(folder)
    gen = ["generate", "--model", folder, "--input", data, "--template", common.demo_template(), "-n", args.new,
           "--top-k", 2, "--device", "cpu", "--no-prefix-reuse"]
    res = {"machine": common.machine(), "model": args.model, "params": bench_realsize.num_params(spec),
           "read_bytes_per_s": read_speed, "prompts": args.prompts, "new_tokens": args.new}
    ram, ram_meta, _ = run([*gen, "--execution", "in-ram"], work / "ram.jsonl")
    st, st_meta, _ = run([*gen, "--execution", "streamed"], work / "streamed.jsonl")
    s = st_meta["streaming"]
    passes = s["layer_passes"] / spec["layers"]
    overhead = (s["wait_seconds"] + s["prepare_seconds"]) / max(1.0, passes)
    same = [r["generated_token_ids"] for r in ram] == [r["generated_token_ids"] for r in st]
    worst = max(abs(a["prob"] - b["prob"]) for x, y in zip(ram, st) for a, b in zip(x["steps"], y["steps"]))
    bound = ram_meta["seconds"] + passes * overhead
    res["generate"] = {
        "in_ram_seconds": ram_meta["seconds"], "streamed_seconds": st_meta["seconds"], "passes": passes,
        "overhead_per_pass_seconds": overhead, "bytes_read": s["bytes_read"], "read_seconds": s["read_seconds"],
        "prepare_seconds": s["prepare_seconds"], "wait_seconds": s["wait_seconds"], "same_tokens": same,
        "max_prob_delta": worst, "target_seconds": 1.3 * bound, "ratio_to_bound": st_meta["seconds"] / bound,
    }
    cls = ["classify", "--model", folder, "--input", cdata, "--template", common.demo_template(), "--labels",
           "goods,life", "--device", "cpu"]
    _, c_ram, _ = run([*cls, "--execution", "in-ram"], work / "c-ram.jsonl")
    _, c_st, _ = run([*cls, "--execution", "streamed"], work / "c-streamed.jsonl")
    res["classify"] = {"in_ram_seconds": c_ram["seconds"], "streamed_seconds": c_st["seconds"],
                       "ratio": c_st["seconds"] / c_ram["seconds"], "streaming": c_st["streaming"]}
    # Llama-2-7B's shape: each pass reads and lays out 7.2x the bytes; compute per token scales the same way
    seven = bench_realsize.SPECS["llama-7b"]
    scale = bench_realsize.num_params(seven) / bench_realsize.num_params(spec)
    per_pass = st_meta["seconds"] / passes
    res["projection_7b"] = {"scale": scale, "seconds_per_pass": per_pass * scale,
                            "generate_seconds": per_pass * scale * passes,
                            "float32_gib": bench_realsize.num_params(seven) * 4 / 2**30}
    common.dump(res, args.json)


if __name__ == "__main__":
    main()
