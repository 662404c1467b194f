"""The table of hostile cases, as rows: what a careless or adversarial user can throw at paddle-scorer (tests/test_hostile.py)
and what an output run must guarantee (tests/test_runs_output_file.py).

Every row runs the real CLI (in-process through typer's runner: one paddle import for the whole table)
in a fresh workspace and asserts four things:

1. the exit code;
2. one message line (``error:`` / ``refused:`` / ``interrupted:``, or the ``note:``/``resume:`` line a
   successful row names) that contains all the row's key words;
3. no Python traceback and no exception escaping the command;
4. the files before and after, hidden ones included: a refusal changes nothing at all; a row that
   writes says exactly what may appear (nothing partial, nothing stale, nothing lost).
"""

from __future__ import annotations


import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

import builders
from paddle_scorer.checkpoint.weights import read_pdparams, write_pdparams

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"
SCORER = builders.DEMO_SCORER
TEMPLATE = SCORER["template"]
MESSAGE_PREFIXES = ("error:", "refused:", "interrupted:", "internal error:")


def cli(*args, env=None):
    from paddle_scorer.cli.app import app

    return runner.invoke(app, [str(a) for a in args], env=env)


# --------------------------------------------------------------------------------------------------
# The workspace each row runs in
# --------------------------------------------------------------------------------------------------


class WS:
    """A row's folder: copies of the demo checkpoints on request, data files, runs done in setup."""

    def __init__(self, root: Path):
        self.root = root
        self.notes: dict = {}  # what setup wants the checks to know

    def p(self, name: str) -> Path:
        return self.root / name

    @property
    def base(self) -> Path:
        dst = self.root / "demo-base"
        if not dst.exists():
            shutil.copytree(builders.DEMO_BASE, dst)
        return dst

    @property
    def lora(self) -> Path:
        dst = self.root / "demo-lora"
        if not dst.exists():
            self.base  # noqa: B018 - the adapter names "../demo-base"
            shutil.copytree(builders.DEMO_LORA, dst)
        return dst

    def demo(self) -> list:
        return ["--model", self.base, "--lora", self.lora]

    def data(self, name: str = "in.jsonl", records=None, raw: bytes | None = None) -> Path:
        path = self.root / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            recs = records if records is not None else default_records()
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        return path

    def lora_config(self, **changes) -> Path:
        path = self.lora / "lora_config.json"
        cfg = json.loads(path.read_text())
        for k, v in changes.items():
            if v is DELETE:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        path.write_text(json.dumps(cfg))
        return self.lora

    def adapter_tensors(self, edit: Callable[[dict], None]) -> Path:
        path = self.lora / "lora_model_state.pdparams"
        sd = read_pdparams(path)
        edit(sd)
        write_pdparams(sd, path)
        return self.lora

    def scored(self, name: str = "out.jsonl", *extra, data: Path | None = None) -> Path:
        """A complete classify output, made in setup."""
        out = self.p(name)
        src = data or self.data()
        r = cli("classify", *self.demo(), "--input", src, "--output", out, *extra)
        assert r.exit_code == 0, r.output
        return out


DELETE = object()


def default_records(n: int = 5) -> list[dict]:
    lines = [json.loads(line) for line in open(builders.DEMO_QUERIES)]
    return lines[:n]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or the kind of a non-file) of everything under ``root``, hidden files too."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = "dir"
            else:
                snap[rel] = "other"
    return snap


def changed(before: dict, after: dict) -> tuple[set, set, set]:
    """(added, removed, modified) relative paths."""
    added = set(after) - set(before)
    removed = set(before) - set(after)
    modified = {k for k in set(before) & set(after) if before[k] != after[k]}
    return added, removed, modified


def hidden_leftovers(root: Path, allowed=()) -> list[str]:
    """Temporary files or folders of ours (hidden names) that are still there."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if p.name not in allowed and not str(p.relative_to(root)).startswith(("demo-", ".pytest")))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    setup: Callable[[WS], list]  # builds the workspace, returns the command line
    code: int
    words: tuple[str, ...] = ()  # all in one message line (case-insensitive)
    check: Callable[[WS, dict, dict, object], None] | None = None  # (ws, before, after, result); None: unchanged
    patch: Callable[[pytest.MonkeyPatch, WS], None] | None = None  # applied after setup, before the command
    env: dict | None = None
    message_from: str = "error"  # the line with the words: "error" (the one error line), "first" (stderr), "any"
    group: str = ""


class Table:
    """A list of rows and the decorator that adds one: ``@table.row(group, id, exit code, key words, ...)``."""

    def __init__(self):
        self.rows: list[Row] = []

    def row(self, group: str, id: str, code: int, words=(), **kw):
        def deco(setup):
            self.rows.append(Row(id=f"{group}/{id}", setup=setup, code=code, words=tuple(words), group=group, **kw))
            return setup

        return deco


def classify(ws: WS, *extra, data=None, output="out.jsonl"):
    args = ["classify", *ws.demo(), "--input", data if data is not None else ws.data()]
    if output is not None:
        args += ["--output", ws.p(output)]
    return args + list(extra)


# --------------------------------------------------------------------------------------------------
# Running a row
# --------------------------------------------------------------------------------------------------


def message_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(MESSAGE_PREFIXES)]


def run_row(case: Row, tmp_path: Path, monkeypatch) -> None:
    """Run one row and check the four promises (see the module docstring)."""
    ws = WS(tmp_path / "ws")
    ws.root.mkdir()
    args = case.setup(ws)
    if case.patch is not None:
        case.patch(monkeypatch, ws)
    before = snapshot(ws.root)
    old_mask = os.umask(ws.notes.get("umask", 0o022))
    env = dict(case.env or {})
    if "cache" in ws.notes:
        env["PADDLE_SCORER_CACHE_DIR"] = str(ws.notes["cache"])
    try:
        r = cli(*args, env=env or None)
    finally:
        os.umask(old_mask)
        monkeypatch.undo()
    after = snapshot(ws.root)
    out = r.output
    # 3. no traceback, no escaped exception
    assert "Traceback" not in out, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    # 1. exit code
    assert r.exit_code == case.code, out
    # 2. one line with the key words
    lines = message_lines(r.stderr)
    if case.code != 0:
        assert len(lines) == 1, f"expected one message line, got {lines!r}\n{out}"
    else:
        assert lines == [], out
    if case.message_from == "error":
        candidates = lines
    elif case.message_from == "first":
        candidates = [r.stderr.strip().splitlines()[0]] if r.stderr.strip() else []
    else:
        candidates = out.splitlines()
    if case.words:
        hit = [line for line in candidates if all(w.lower() in line.lower() for w in case.words)]
        assert hit, f"no line has all of {case.words}:\n{out}"
    # 4. files before/after
    if case.check is not None:
        case.check(ws, before, after, r)
    else:
        assert after == before, f"files changed: added/removed/modified = {changed(before, after)}"
    assert not ws.p("PWNED").exists()
