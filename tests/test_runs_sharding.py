"""Data-parallel scoring under a real `python -m paddle.distributed.launch` (2 CPU workers, gloo)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.model.dtype_policy import GpuInfo, resolve_device
from paddle_scorer.process.environment import thread_count
from paddle_scorer.process.launcher import worker_from_env
from paddle_scorer.runs.input_index import Shard

SCORER = shutil.which("paddle-scorer") or str(Path(sys.executable).with_name("paddle-scorer"))
DEMO = ["--model", str(builders.DEMO_BASE), "--lora", str(builders.DEMO_LORA)]
runner = CliRunner()


def launch(tmp, *args, nproc=2, wait=True):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(tmp / f"log-{time.monotonic_ns()}"), SCORER, *map(str, args)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out
    return proc


def read(path):
    return [json.loads(line) for line in open(path)]


def test_two_worker_launch_equals_single_process(tmp_path):
    single = tmp_path / "single.jsonl"
    r = runner.invoke(app, ["classify", *DEMO, "--input", str(builders.DEMO_QUERIES), "--output", str(single)])
    assert r.exit_code == 0, r.output
    dist = tmp_path / "dist.jsonl"
    code, log = launch(tmp_path, "classify", *DEMO, "--input", builders.DEMO_QUERIES, "--output", dist)
    assert code == 0, log
    a, b = read(single), read(dist)
    assert [x["id"] for x in a] == [x["id"] for x in b]
    for x, y in zip(a, b):
        assert x["prompt_token_ids"] == y["prompt_token_ids"]
        np.testing.assert_allclose(list(x["probs"].values()), list(y["probs"].values()), atol=1e-6)
    meta = json.loads((tmp_path / "dist.jsonl.meta.json").read_text())
    assert meta["world_size"] == 2 and meta["status"] == "complete"
    assert sorted(w["counts"]["total"] for w in meta["workers"]) == [75, 75]
    assert all(w["seconds"] is not None for w in meta["workers"])
    assert meta["metrics"]["accuracy"] == json.loads((single.with_name("single.jsonl.meta.json")).read_text())["metrics"]["accuracy"]


def test_killed_worker_is_resumed_with_every_id_exactly_once(tmp_path):
    data = tmp_path / "many.jsonl"
    base = [json.loads(line) for line in open(builders.DEMO_QUERIES)]
    with open(data, "w") as fh:
        for k in range(8):
            for rec in base:
                fh.write(json.dumps({**rec, "id": f"{rec['id']}-{k}"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["classify", *DEMO, "--input", data, "--output", out, "--batch-size", 4]
    proc = launch(tmp_path, *args, wait=False)
    part1 = tmp_path / "out.jsonl.parts" / ".part-00001-of-00002.jsonl.inprogress"  # a part's working file
    victim = None
    deadline = time.time() + 300
    while time.time() < deadline and victim is None:
        if part1.exists() and sum(1 for _ in open(part1)) >= 40:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("PADDLE_TRAINER_ID") == "1" and "classify" in " ".join(child.cmdline()):
                        victim = child
                except psutil.Error:
                    continue
        time.sleep(0.05)
    assert victim is not None, "worker 1 never got going"
    victim.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert not out.exists() or len(read(out)) < len(base) * 8  # not assembled from an incomplete part
    done_before = sum(1 for _ in open(part1))
    assert 40 <= done_before < len(base) * 4
    assert not (tmp_path / "out.jsonl.parts" / "part-00001-of-00002.jsonl").exists()  # no partial part file
    r = runner.invoke(app, ["gather", str(out)])
    assert r.exit_code == 5 and "have not finished" in r.stderr and "--resume" in r.stderr
    code, log = launch(tmp_path, *args, "--resume")
    assert code == 0, log
    ids = [x["id"] for x in read(out)]
    expect = [json.loads(line)["id"] for line in open(data)]
    assert ids == expect  # every id exactly once, in input order
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    resumed = {w["rank"]: w["counts"]["resumed"] for w in meta["workers"]}
    assert resumed[1] >= done_before - 4  # at most the batch in flight was lost


def test_part_files_from_another_world_size_or_config_are_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    env3 = {"PADDLE_TRAINERS_NUM": "3", "PADDLE_TRAINER_ID": "2", "PADDLE_LOCAL_SIZE": "3"}
    r = runner.invoke(app, ["classify", *DEMO, "--input", str(builders.DEMO_QUERIES), "--limit", "9", "--output", str(out)], env=env3)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o.jsonl.parts" / "part-00002-of-00003.jsonl").exists()
    env2 = {"PADDLE_TRAINERS_NUM": "2", "PADDLE_TRAINER_ID": "0", "PADDLE_LOCAL_SIZE": "2"}
    r = runner.invoke(app, ["classify", *DEMO, "--input", str(builders.DEMO_QUERIES), "--limit", "9", "--output", str(out)], env=env2)
    assert r.exit_code == 2 and "part files from a run with 3 worker(s), this run has 2" in r.stderr
    # same world size, other labels: the part is refused, not mixed in
    r = runner.invoke(app, ["classify", *DEMO, "--labels", "goods,life,other", "--input", str(builders.DEMO_QUERIES),
                            "--limit", "9", "--output", str(out), "--resume"], env=env3)
    assert r.exit_code == 2 and "different configuration (labels differ)" in r.stderr


def test_worker_env_shard_threads_and_device():
    w = worker_from_env({"PADDLE_TRAINERS_NUM": "4", "PADDLE_TRAINER_ID": "1", "PADDLE_LOCAL_RANK": "1",
                         "PADDLE_LOCAL_SIZE": "4", "FLAGS_selected_gpus": "1"})
    assert (w.rank, w.world, w.selected_gpu) == (1, 4, 1)
    assert list(Shard(w.rank, w.world).positions(10)) == [1, 5, 9]
    parts = []
    for r in range(4):
        wr = worker_from_env({"PADDLE_TRAINERS_NUM": "4", "PADDLE_TRAINER_ID": str(r)})
        parts += [p for p in range(10) if p in Shard(wr.rank, wr.world)]
    assert sorted(parts) == list(range(10))
    assert worker_from_env({}).world == 1
    # threads: divided between local workers; the launcher's inherited 1 is not a user choice
    assert thread_count({"PADDLE_LOCAL_SIZE": "2", "OMP_NUM_THREADS": "1"}, cores=16) == 8
    assert thread_count({"OMP_NUM_THREADS": "3"}, cores=16) is None
    assert thread_count({}, cores=16) == 16
    assert thread_count({"PADDLE_SCORER_THREADS": "5", "OMP_NUM_THREADS": "3"}, cores=16) == 5
    # each launcher worker uses its own GPU
    gpus = GpuInfo(True, 4, (8, 0), "A100")
    assert resolve_device("auto", gpus, selected=w.selected_gpu) == "gpu:1"
    assert resolve_device("gpu", gpus, selected=3) == "gpu:3"
    assert resolve_device("auto", GpuInfo(False, 0), selected=None) == "cpu"


def test_two_worker_launch_streams_layer_by_layer(tmp_path):
    """Each launcher worker streams its own shard; the assembled output equals the in-RAM single process."""
    single = tmp_path / "single.jsonl"
    r = runner.invoke(app, ["classify", *DEMO, "--input", str(builders.DEMO_QUERIES), "--limit", "40",
                            "--output", str(single)])
    assert r.exit_code == 0, r.output
    data = tmp_path / "q.jsonl"
    data.write_text("".join(open(builders.DEMO_QUERIES).readlines()[:40]))
    dist = tmp_path / "dist.jsonl"
    code, log = launch(tmp_path, "classify", *DEMO, "--input", data, "--output", dist, "--execution", "streamed",
                       "--stream-block-records", 8)
    assert code == 0, log
    a, b = read(single), read(dist)
    assert [x["id"] for x in a] == [x["id"] for x in b]
    np.testing.assert_allclose([list(x["logprobs"].values()) for x in b], [list(x["logprobs"].values()) for x in a],
                               atol=1e-5)
    for rank in (0, 1):
        part = json.loads((tmp_path / "dist.jsonl.parts" / f"part-0000{rank}-of-00002.jsonl.meta.json").read_text())
        assert part["execution"] == "streamed" and part["streaming"]["blocks"] == 3  # 20 records in blocks of 8
