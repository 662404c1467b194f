"""A run's output file (runs/output_file.py and the gather of launcher parts): what ``--output`` may be, what
``--resume`` continues or refuses, how ``--overwrite`` replaces, that files follow the umask and parts are verified.
Rows of the same table as tests/test_hostile.py (tests/hostile_table.py: exit code, one message line, no traceback,
files before and after)."""

from __future__ import annotations


import json
import os
import stat
from pathlib import Path

import pytest

from paddle_scorer.checkpoint.weights import read_pdparams

from hostile_table import (Row, Table, changed, classify, cli, default_records,
                            hidden_leftovers, read_jsonl, run_row)

TABLE = Table()
row = TABLE.row
ROWS = TABLE.rows


# ---------------------------------------------------------------------------- outputs


@row("outputs", "output-is-the-input", 2, ("is the input file", "destroy the input"))
def _(ws):
    data = ws.data()
    return ["classify", *ws.demo(), "--input", data, "--output", data, "--overwrite"]


@row("outputs", "output-is-the-input-through-a-symlink", 2, ("is the input file",))
def _(ws):
    data = ws.data()
    os.symlink(data, ws.p("alias.jsonl"))
    return ["classify", *ws.demo(), "--input", data, "--output", ws.p("alias.jsonl"), "--overwrite"]


@row("outputs", "output-is-a-meta-json", 2, (".meta.json", "provenance"))
def _(ws):
    out = ws.scored()
    return classify(ws, "--overwrite", output=out.name + ".meta.json")


@row("outputs", "output-is-a-directory", 2, ("is a directory",))
def _(ws):
    ws.p("dir").mkdir()
    return classify(ws, "--overwrite", output="dir")


@row("outputs", "output-is-a-fifo", 2, ("not a regular file",))
def _(ws):
    os.mkfifo(ws.p("pipe.jsonl"))
    return classify(ws, "--overwrite", output="pipe.jsonl")


@row("outputs", "overwrite-never-replaces-a-file-that-is-not-an-output", 2, ("model_state.pdparams", "not an output of ours"))
def _(ws):
    return classify(ws, "--overwrite", output="demo-base/model_state.pdparams")


@row("outputs", "existing-output-needs-resume-or-overwrite", 2, ("already exists", "--resume", "--overwrite"))
def _(ws):
    ws.scored()
    return classify(ws)


@row("outputs", "resume-and-overwrite-together", 2, ("contradict",))
def _(ws):
    ws.scored()
    return classify(ws, "--resume", "--overwrite")


def _interrupt_on_block(n: int):
    def patch(mp, ws):
        from paddle_scorer.tasks.classify import Classifier

        real = Classifier.score
        calls = {"n": 0}

        def flaky(self, preps):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, preps)

        mp.setattr(Classifier, "score", flaky)

    return patch


def _old_output_kept(ws, before, after, r):
    added, removed, modified = changed(before, after)
    assert not removed and not modified  # the old results and their provenance are untouched
    assert added == {".out.jsonl.inprogress", ".out.jsonl.inprogress.meta.json"}  # resumable working file
    assert len(read_jsonl(ws.p(".out.jsonl.inprogress"))) == 2  # the first block survived


@row("outputs", "overwrite-keeps-the-old-output-until-the-new-one-completes", 130,
     ("interrupted", "not replaced", "--resume"), patch=_interrupt_on_block(2), check=_old_output_kept)
def _(ws):
    ws.scored(data=ws.data(records=default_records(3)))
    return classify(ws, "--overwrite", "--batch-size", 2, data=ws.data(records=default_records(6)))


def _resumed_after_overwrite(ws, before, after, r):
    recs = read_jsonl(ws.p("out.jsonl"))
    assert [x["id"] for x in recs] == [x["id"] for x in default_records(6)]
    assert hidden_leftovers(ws.root) == []  # the working file is gone
    assert "6 record(s)" not in r.stdout and "2 already done" in r.stdout


@row("outputs", "resume-continues-an-interrupted-overwrite", 0, check=_resumed_after_overwrite)
def _(ws):
    ws.scored(data=ws.data(records=default_records(3)))
    from paddle_scorer.tasks.classify import Classifier

    real = Classifier.score
    calls = {"n": 0}

    def flaky(self, preps):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, preps)

    Classifier.score = flaky
    try:
        r = cli(*classify(ws, "--overwrite", "--batch-size", 2, data=ws.data(records=default_records(6))))
    finally:
        Classifier.score = real
    assert r.exit_code == 130
    return classify(ws, "--resume", "--batch-size", 2, data=ws.p("in.jsonl"))


def _input_changed(ws, before, after, r):
    from paddle_scorer.runs.output_file import fingerprint

    new = read_jsonl(ws.p("in.jsonl"))
    recs = read_jsonl(ws.p("out.jsonl"))
    assert [x["id"] for x in recs] == [x["id"] for x in new]  # removed id dropped, new id scored, input order
    for rec, src in zip(recs, new):
        assert rec["input_fingerprint"] == fingerprint(src)  # nothing stale
    old = {x["id"]: x for x in ws.notes["old"]}
    changed_id = new[1]["id"]
    assert recs[1]["prompt_token_ids"] != old[changed_id]["prompt_token_ids"]  # rescored, not kept
    assert recs[0] == old[new[0]["id"]]  # unchanged record kept as it was
    meta = json.loads(ws.p("out.jsonl.meta.json").read_text())
    assert meta["resume"] == {"kept": 3, "rescored_changed": 1, "dropped_removed": 1, "continued": "complete output"}
    assert hidden_leftovers(ws.root) == []


@row("outputs", "resume-after-the-input-changed-rescores-and-drops-and-counts", 0,
     ("resume:", "1 record(s) rescored", "1 dropped"), check=_input_changed, message_from="any")
def _(ws):
    recs = default_records(5)
    out = ws.scored(data=ws.data(records=recs))
    ws.notes["old"] = read_jsonl(out)
    recs[1] = {**recs[1], "query": recs[1]["query"] + " please, today"}  # changed
    del recs[3]  # removed
    recs.append(default_records(7)[6])  # added
    return classify(ws, "--resume", data=ws.data(records=recs))


@row("outputs", "resume-with-another-max-length", 2, ("max_length", "differ"))
def _(ws):
    ws.scored()
    return classify(ws, "--resume", "--max-length", 128)


@row("outputs", "resume-with-another-truncate", 2, ("truncate", "differ"))
def _(ws):
    ws.scored()
    return classify(ws, "--resume", "--truncate", "left")


@row("outputs", "resume-with-another-template", 2, ("template", "differ"))
def _(ws):
    ws.scored()
    return classify(ws, "--resume", "--template", "Q: {query}\nA:")


@row("outputs", "resume-with-a-smaller-limit-never-drops-results", 2, ("limit", "differ"))
def _(ws):
    ws.scored()
    return classify(ws, "--resume", "--limit", 2, data=ws.p("in.jsonl"))


@row("outputs", "resume-without-meta", 2, ("no out.jsonl.meta.json", "--overwrite"))
def _(ws):
    ws.scored().with_name("out.jsonl.meta.json").unlink()
    return classify(ws, "--resume")


@row("outputs", "resume-with-a-damaged-meta", 2, ("out.jsonl.meta.json", "not valid JSON"))
def _(ws):
    ws.scored().with_name("out.jsonl.meta.json").write_text('{"identity": ')
    return classify(ws, "--resume")


@row("outputs", "resume-with-an-edited-line-in-the-middle", 2, ("out.jsonl:2", "not a JSON line"))
def _(ws):
    out = ws.scored()
    lines = out.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    out.write_text("".join(lines))
    return classify(ws, "--resume")


def _two_parts(ws) -> Path:
    """A 2-worker run's parts and assembled output, made by running both ranks in-process."""
    out = ws.p("d.jsonl")
    data = ws.data(records=default_records(6))
    for rank in (0, 1):
        env = {"PADDLE_TRAINERS_NUM": "2", "PADDLE_TRAINER_ID": str(rank), "PADDLE_LOCAL_SIZE": "2"}
        r = cli("classify", *ws.demo(), "--input", data, "--output", out, env=env)
        assert r.exit_code == 0, r.output
    assert out.exists()
    return out


@row("outputs", "gather-a-part-that-lost-a-line", 2, ("part-00001-of-00002.jsonl", "2 records", "says 3"))
def _(ws):
    out = _two_parts(ws)
    part = ws.p("d.jsonl.parts/part-00001-of-00002.jsonl")
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:-1]))
    return ["gather", out]


@row("outputs", "gather-a-part-that-gained-a-line", 2, ("part-00000-of-00002.jsonl", "4 records", "says 3"))
def _(ws):
    out = _two_parts(ws)
    part = ws.p("d.jsonl.parts/part-00000-of-00002.jsonl")
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines + lines[:1]))
    return ["gather", out]


@row("outputs", "gather-a-part-with-a-line-that-is-not-a-record", 2, ("part-00001-of-00002.jsonl:2", "not an output record"))
def _(ws):
    out = _two_parts(ws)
    part = ws.p("d.jsonl.parts/part-00001-of-00002.jsonl")
    lines = part.read_text().splitlines(keepends=True)
    lines[1] = "[1, 2]\n"
    part.write_text("".join(lines))
    return ["gather", out]



def _umask_output(ws, before, after, r):
    for name in ("out.jsonl", "out.jsonl.meta.json"):
        assert stat.S_IMODE(ws.p(name).stat().st_mode) == 0o640, name
    assert hidden_leftovers(ws.root) == []


@row("outputs", "outputs-follow-the-umask", 0, check=_umask_output)
def _(ws):
    ws.notes["umask"] = 0o027
    return classify(ws)


def _rewrite_in_place(path: Path, key_end: str) -> None:
    """Overwrite one tensor's bytes inside a weight file (same size), then restore the mtime (what cp -p / rsync -a
    give): only the content changed."""
    st = path.stat()
    sd = read_pdparams(path)
    value = next(v for k, v in sd.items() if k.endswith(key_end))
    data = path.read_bytes()
    at = data.index(value.tobytes())
    path.write_bytes(data[:at] + value[::-1].tobytes() + data[at + value.nbytes:])
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@row("outputs", "resume-after-the-weights-were-rewritten-with-size-and-mtime-kept", 2,
     ("model_fingerprint", "differ"))
def _(ws):
    ws.scored("out.jsonl", "--limit", "2")
    _rewrite_in_place(ws.base / "model_state.pdparams", "layers.0.mlp.up_proj.weight")
    return classify(ws, "--resume")



def _with_chat_template(ws, template: str) -> None:
    path = ws.base / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg))


@row("outputs", "resume-after-the-chat-template-was-edited", 2, ("chat_template_sha256", "differ"))
def _(ws):
    _with_chat_template(ws, "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}")
    ws.scored("out.jsonl", "--limit", "2")
    _with_chat_template(ws, "{% for m in messages %}Question: {{ m['content'] }}{% endfor %}")
    return classify(ws, "--resume")


@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_output_file(case: Row, tmp_path, monkeypatch):
    run_row(case, tmp_path, monkeypatch)


def test_the_table_covers_output_resume_overwrite_and_gather():
    ids = [r.id for r in ROWS]
    assert len(ids) >= 20 and {r.group for r in ROWS} == {"outputs"}
    for word in ("resume", "overwrite", "gather", "umask"):
        assert any(word in i for i in ids), word
