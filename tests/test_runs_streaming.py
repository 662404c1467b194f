"""Streamed input (#29): a run indexes its input, then prepares and scores it in windows; every promise of an output
holds for records far apart, in later windows, in launcher shards, from a pipe. Windows are made small here (16
records, prepared 8 at a time) so that 60 records cross several of them; the code is the production code."""

import contextlib
import gc
import json
import os
import threading

import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.cli.app import app
from paddle_scorer.runs import input_index, loop

runner = CliRunner()
DEMO = ["--model", str(builders.DEMO_BASE), "--lora", str(builders.DEMO_LORA)]


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(loop, "WINDOW_RECORDS", 16)
    monkeypatch.setattr(loop, "CHUNK", 8)


def write_input(path, n, edit=None):
    base = builders.demo_queries()
    with open(path, "w") as fh:
        for i in range(n):
            rec = {**base[i % len(base)], "id": f"r{i:05d}"}
            if edit:
                rec = edit(i, rec)
            if rec is not None:
                fh.write(json.dumps(rec) + "\n")
    return path


def classify(*args, env=None):
    return runner.invoke(app, ["classify", *DEMO, "--batch-size", "4", *map(str, args)], env=env)


def lines(path):
    return [json.loads(x) for x in open(path)]


def meta_of(path):
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """60 demo records classified in one window (the default sizes): what every streamed variant must equal."""
    tmp = tmp_path_factory.mktemp("ref")
    data = write_input(tmp / "in.jsonl", 60)
    out = tmp / "ref.jsonl"
    r = classify("--input", data, "--output", out)
    assert r.exit_code == 0, r.output
    assert meta_of(out)["windows"] == 1
    return data, lines(out)


def same_scores(got, want):
    assert [g["id"] for g in got] == [w["id"] for w in want]
    for g, w in zip(got, want):
        assert g["prompt_token_ids"] == w["prompt_token_ids"] and g["input_fingerprint"] == w["input_fingerprint"]
        for lab in w["probs"]:
            assert abs(g["probs"][lab] - w["probs"][lab]) < 1e-5


def test_windows_score_what_one_window_scores(tmp_path, small_windows, reference):
    data, want = reference
    out = tmp_path / "w.jsonl"
    r = classify("--input", data, "--output", out)
    assert r.exit_code == 0, r.output
    same_scores(lines(out), want)
    meta = meta_of(out)
    assert meta["windows"] == 4 and meta["records"] == 60  # 16 + 16 + 16 + 12
    assert meta["ids_sha256"] == input_index.scan(
        [(rec["id"], rec, "") for rec in lines(data)]).ids_sha256


@pytest.mark.parametrize("stop_after_blocks", [3, 9])  # within the first window; in the third
def test_resume_after_a_kill_in_the_middle_of_a_window(tmp_path, small_windows, reference, stop_after_blocks):
    from paddle_scorer import Destination, Hooks, LoadOptions, Source, classify_file
    from paddle_scorer.tasks.classify import options_with_defaults

    data, want = reference
    out = tmp_path / "k.jsonl"
    load = LoadOptions(builders.DEMO_BASE, builders.DEMO_LORA)
    opts, _ = options_with_defaults(builders.DEMO_BASE, builders.DEMO_LORA, batch_size=4)
    blocks = []

    @contextlib.contextmanager
    def killed(what, total):
        def advance(n):
            blocks.append(n)
            if len(blocks) == stop_after_blocks:
                raise KeyboardInterrupt

        yield advance

    with pytest.raises(KeyboardInterrupt):
        classify_file(load, opts, Source(input=data), Destination(out), Hooks(progress=killed), argv=[])
    work = tmp_path / ".k.jsonl.inprogress"
    assert not out.exists() and sum(1 for _ in open(work)) == 4 * stop_after_blocks
    run = classify_file(load, opts, Source(input=data), Destination(out, resume=True), argv=[])
    assert run.stats.skipped == 4 * stop_after_blocks and run.stats.scored == 60 - 4 * stop_after_blocks
    same_scores(lines(out), want)
    assert len(run.records) == 60 and run.records[0] == lines(out)[0]  # read back from the file, not held
    assert not work.exists()


def test_a_changed_record_in_a_later_window_is_rescored_alone(tmp_path, small_windows, reference):
    data, want = reference
    out = tmp_path / "c.jsonl"
    assert classify("--input", data, "--output", out).exit_code == 0
    edited = write_input(tmp_path / "edited.jsonl", 60, edit=lambda i, rec: (
        {**rec, "query": "where can I buy a kettle?"} if i == 55 else None if i == 50 else rec))
    r = classify("--input", edited, "--output", out, "--resume")
    assert r.exit_code == 0, r.output
    assert "1 record(s) rescored because their input changed" in r.stdout and "1 dropped" in r.stdout
    got = lines(out)
    assert len(got) == 59 and "r00050" not in [g["id"] for g in got]
    fresh = tmp_path / "fresh.jsonl"
    assert classify("--input", edited, "--output", fresh).exit_code == 0
    same_scores(got, lines(fresh))
    assert meta_of(out)["counts"]["scored_this_run"] == 1


def test_duplicate_ids_far_apart_are_refused_before_loading(tmp_path):
    data = write_input(tmp_path / "dup.jsonl", 3000, edit=lambda i, rec: {**rec, "id": "r00002"} if i == 2998 else rec)
    out = tmp_path / "o.jsonl"
    r = classify("--input", data, "--output", out)
    assert r.exit_code == 2
    assert f"{data}:2999: id \"r00002\" already used at {data}:3" in r.stderr
    assert "note:" not in r.stderr  # nothing was loaded (the load's notes come after)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.jsonl"]


def test_ids_whose_hashes_collide_stay_two_records(tmp_path, monkeypatch, small_windows, reference):
    """A 64-bit id hash collision (made certain here: every id of one length hashes alike) never merges records:
    they are told apart by their text, for duplicates, resume and the output."""
    data, want = reference
    monkeypatch.setattr(input_index, "key_hash", lambda key: len(key))
    out = tmp_path / "h.jsonl"
    half = write_input(tmp_path / "half.jsonl", 30)
    assert classify("--input", half, "--output", out).exit_code == 0
    r = classify("--input", data, "--output", out, "--resume")
    assert r.exit_code == 0, r.output
    same_scores(lines(out), want)
    assert meta_of(out)["counts"] == {"total": 60, "resumed": 30, "scored_this_run": 30}
    dup = write_input(tmp_path / "dup.jsonl", 40, edit=lambda i, rec: {**rec, "id": "r00007"} if i == 33 else rec)
    r = classify("--input", dup, "--output", tmp_path / "d.jsonl")
    assert r.exit_code == 2 and "id \"r00007\" already used" in r.stderr


def test_a_record_error_in_a_later_window_keeps_what_was_scored(tmp_path, small_windows, reference):
    data, want = reference
    bad = write_input(tmp_path / "bad.jsonl", 60, edit=lambda i, rec: {"id": rec["id"], "text": "x"} if i == 40 else rec)
    out = tmp_path / "e.jsonl"
    r = classify("--input", bad, "--output", out)
    assert r.exit_code == 2
    assert f"{bad}:41" in r.stderr and "the 32 record(s) scored before it are kept" in r.stderr and "--resume" in r.stderr
    assert not out.exists() and sum(1 for _ in open(tmp_path / ".e.jsonl.inprogress")) == 32
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 5 and "--resume" in r.stderr
    r = classify("--input", data, "--output", out, "--resume")  # the record fixed
    assert r.exit_code == 0, r.output
    same_scores(lines(out), want)
    assert meta_of(out)["counts"]["resumed"] == 32


def test_the_first_block_is_written_before_the_input_is_prepared(tmp_path, monkeypatch, small_windows, reference):
    """Memory is bounded by the window: records are prepared a chunk at a time, at most a window ahead of the
    blocks on disk, and the first block is flushed while most of the input is still unread."""
    from paddle_scorer.runs.output_file import RunOutput
    from paddle_scorer.tasks.classify import Classifier

    data, _ = reference
    prepared, written = [], []
    real_prepare, real_write = Classifier.prepare_many, RunOutput.write_batch

    def prepare_many(self, rows):
        prepared.append(len(rows))
        return real_prepare(self, rows)

    def write_batch(self, records, positions):
        written.append((sum(prepared), len(records)))
        return real_write(self, records, positions)

    monkeypatch.setattr(Classifier, "prepare_many", prepare_many)
    monkeypatch.setattr(RunOutput, "write_batch", write_batch)
    assert classify("--input", data, "--output", tmp_path / "f.jsonl").exit_code == 0
    assert max(prepared) <= loop.CHUNK and sum(prepared) == 60
    assert written[0][0] == 16  # one window prepared when the first block reached the disk
    done = 0
    for prepared_then, n in written:
        assert prepared_then - done <= loop.WINDOW_RECORDS  # never more than a window ahead
        done += n


def test_input_from_a_pipe_is_read_once_and_scored_in_windows(tmp_path, small_windows, reference):
    data, want = reference
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as fh:
            fh.write(data.read_bytes())

    t = threading.Thread(target=feed)
    t.start()
    out = tmp_path / "p.jsonl"
    r = classify("--input", fifo, "--output", out)
    t.join(timeout=60)
    assert r.exit_code == 0, r.output
    same_scores(lines(out), want)


def test_an_input_changed_during_the_run_is_refused(tmp_path, small_windows):
    from paddle_scorer import Destination, Hooks, LoadOptions, Source, classify_file
    from paddle_scorer.errors import UsageError
    from paddle_scorer.tasks.classify import options_with_defaults

    data = write_input(tmp_path / "in.jsonl", 40)
    opts, _ = options_with_defaults(builders.DEMO_BASE, builders.DEMO_LORA, batch_size=4)

    @contextlib.contextmanager
    def edit_meanwhile(what, total):  # entered after the index, before the windows
        write_input(data, 40, edit=lambda i, rec: {**rec, "query": "changed"} if i == 30 else rec)
        yield lambda n: None

    with pytest.raises(UsageError, match="the input changed while this run was reading it"):
        classify_file(LoadOptions(builders.DEMO_BASE, builders.DEMO_LORA), opts, Source(input=data),
                      Destination(tmp_path / "o.jsonl"), Hooks(progress=edit_meanwhile), argv=[])


def test_launcher_shards_in_windows_equal_one_process(tmp_path, small_windows, reference):
    """Three launcher workers (their environment as paddle.distributed.launch sets it), each indexing the whole input
    and scoring its positions in windows; the last one assembles the output, streaming the parts."""
    data, want = reference
    out = tmp_path / "s.jsonl"
    for rank in range(3):
        env = {"PADDLE_TRAINERS_NUM": "3", "PADDLE_TRAINER_ID": str(rank), "PADDLE_LOCAL_SIZE": "3"}
        r = classify("--input", data, "--output", out, env=env)
        assert r.exit_code == 0, r.output
        assert out.exists() == (rank == 2)
    same_scores(lines(out), want)
    meta = meta_of(out)
    assert meta["world_size"] == 3 and [w["counts"]["total"] for w in meta["workers"]] == [20, 20, 20]
    assert meta["metrics"]["n"] == 60


def test_report_of_a_large_output_streams(tmp_path, reference):
    """report reads an output a record at a time into flat arrays: 21,000 records (copies of the reference's) give
    the metrics of their records."""
    from paddle_scorer.tasks.metrics import evaluate
    from paddle_scorer.tasks.report import load_run, summarize

    _, want = reference
    big = tmp_path / "big.jsonl"
    with open(big, "w") as fh:
        for k in range(21000 // len(want)):
            for rec in want:
                fh.write(json.dumps({**rec, "id": f"{rec['id']}-{k}"}) + "\n")
    run = load_run(big)
    s = summarize(run)
    assert s["n_records"] == 21000 and run.data.probs.shape == (21000, 2)
    expect = evaluate(want, ["goods", "life"])
    for k in ("accuracy", "log_loss", "brier", "ece"):
        assert s["metrics"][k] == pytest.approx(expect[k], rel=1e-9, abs=1e-12)
    assert s["metrics"]["n"] == 21000


def test_the_collector_skips_the_model_while_scoring_and_is_restored(tmp_path, monkeypatch, small_windows, reference):
    """The objects alive before the loop (model, tokenizer, libraries) are frozen out of the cycle collector's walks
    while windows are scored, and given back to it when the run ends, on success and on a record error alike."""
    data, want = reference
    seen = []
    score_window = loop._score_window

    def spy(*args, **kw):
        seen.append(gc.get_freeze_count())
        return score_window(*args, **kw)

    monkeypatch.setattr(loop, "_score_window", spy)
    out = tmp_path / "o.jsonl"
    r = classify("--input", data, "--output", out)
    assert r.exit_code == 0, r.output
    same_scores(lines(out), want)
    assert len(seen) == 4 and min(seen) > 10_000  # 60 records in windows of 16; the model's objects frozen
    assert gc.get_freeze_count() == 0
    bad = write_input(tmp_path / "bad.jsonl", 60, edit=lambda i, rec: {"id": rec["id"], "text": "x"} if i == 40 else rec)
    r = classify("--input", bad, "--output", tmp_path / "e.jsonl")
    assert r.exit_code == 2 and gc.get_freeze_count() == 0
