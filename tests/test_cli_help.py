"""What a newcomer sees first: every `--help`, the output of a first `classify`, and the documents README links.

Help is rendered by the real typer app (in-process, a wide terminal so nothing is wrapped by width), the
first runs use the bundled demo checkpoint, and the Markdown is parsed with markdown-it (what rich uses).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import builders

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["inspect", "merge", "classify", "generate", "gather", "smoke", "doctor", "report", "serve"]
runner = CliRunner()


def cli(*args, width: int = 200):
    from paddle_scorer.cli.app import app

    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(width), "TERM": "dumb"})


def help_of(*cmd, width: int = 200) -> str:
    r = cli(*cmd, "--help", width=width)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in COMMANDS], ids=["top"] + COMMANDS)
def test_help_has_no_bool_metavar_and_no_empty_examples(cmd):
    text = help_of(*cmd)
    assert "<bool>" not in text
    lines = [line.strip(" │") for line in text.splitlines()]
    assert "Examples:" not in lines  # a heading with nothing after it (the old command list)
    if cmd:
        assert "Examples" in lines, text  # every command shows runnable examples after its options
        after = lines[lines.index("Examples") + 1:]
        assert any(line.startswith(("paddle-scorer", "PADDLE_SCORER")) for line in after), text


def test_top_level_summary_names_both_libraries_and_one_line_per_command():
    text = help_of()
    assert "PaddleNLP" in text and "PaddleFormers" in text
    listed = [line.strip(" │").split()[0] for line in text.splitlines()
              if line.startswith("│ ") and line.strip(" │") and not line.strip(" │").startswith("-")]
    assert listed == COMMANDS  # nothing else in the command list (no stray "Examples:" rows)


def test_help_paragraphs_are_not_hard_wrapped_then_rewrapped():
    text = help_of("merge")
    assert "one shard at a time" in text  # was "one shard at a" / "time" at any width but the source's
    narrow = help_of("merge", width=80)
    for line in narrow.splitlines():
        assert len(line) <= 80


def test_every_example_continuation_can_be_pasted():
    """An example line followed by an indented continuation ends with a backslash; none is wider than 80."""
    for cmd in COMMANDS:
        text = help_of(cmd)
        lines = text.splitlines()
        block = lines[[line.strip() for line in lines].index("Examples") + 1:]
        block = [line[1:] if line.startswith(" ") else line for line in block]
        for here, nxt in zip(block, block[1:]):
            if nxt.startswith("    ") and nxt.strip() and here.strip() and not here.lstrip().startswith("#"):
                assert here.rstrip().endswith("\\"), f"{cmd}: {here!r} continues on the next line without \\"
        assert all(len(line.rstrip()) <= 80 for line in block), cmd


def test_serve_help_names_the_api_key_variable_once_and_lm_eval_example_is_whole():
    text = help_of("serve")
    assert text.count("PADDLE_SCORER_API_KEY") == 2  # the [env var: ...] of --api-key, and the example that sets it
    assert "[env var: PADDLE_SCORER_API_KEY]" in text
    assert "lm_eval --model local-completions \\" in text
    assert "pip install 'lm-eval[api]'" in text  # rich markup did not eat [api]


def test_classify_help_template_example_is_a_real_newline_in_bash():
    text = help_of("classify")
    assert "--template $'Query: {query}\\nAnswer:'" in text
    assert '--template "Query: {query}\\nAnswer:"' not in text


def test_shared_options_all_have_descriptions():
    for cmd in ("generate", "classify", "smoke"):
        text = help_of(cmd)
        line = next(line for line in text.splitlines() if "--id-field" in line)
        assert "Record field holding the id" in line, (cmd, line)


def test_show_help_says_what_happens():
    text = help_of("classify")
    line = next(line for line in text.splitlines() if line.strip(" │").startswith("--show"))
    assert "after the summary" in line


# ------------------------------------------------------------------------------------------ first runs


def demo(*args):
    return cli("classify", "--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA, *args, width=120)


def test_literal_backslash_n_in_a_template_gets_one_note():
    r = demo("--prompt", "rice", "--template", "Query: {query}\\nAnswer:")
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "\\n" in notes[0] and "$'" in notes[0]
    r = demo("--prompt", "rice", "--template", "Query: {query}\nAnswer:")
    assert r.exit_code == 0 and "note:" not in r.stderr
    g = cli("generate", "--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA, "--prompt", "rice",
            "--template", "Q: {query}\\tA:", "-n", "1")
    assert g.exit_code == 0 and sum(line.startswith("note:") for line in g.stderr.splitlines()) == 1


def test_a_dataset_without_output_prints_the_summary_then_a_few_records():
    r = demo("--input", builders.DEMO_QUERIES)
    assert r.exit_code == 0, r.output
    n = sum(1 for _ in open(builders.DEMO_QUERIES))
    text = r.stdout
    assert text.index("scored ") < text.index(f"first 5 of {n} records")
    assert "--output FILE" in text and "--json" in text
    shown = re.findall(r"│ (q\d{4}) ", text)
    assert len(shown) == 5
    r = demo("--input", builders.DEMO_QUERIES, "--show", "7")
    assert len(re.findall(r"│ (q\d{4}) ", r.stdout)) == 7


def test_wrote_line_names_both_files_with_their_folder(tmp_path):
    out = tmp_path / "out" / "scores.jsonl"
    r = demo("--input", builders.DEMO_QUERIES, "--output", out, "--limit", "3")
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"wrote {out} and {out}.meta.json"


def test_inspect_lines_have_no_trailing_spaces():
    r = cli("inspect", builders.DEMO_LORA, width=100)
    assert r.exit_code == 0
    assert [line for line in r.stdout.splitlines() if line != line.rstrip()] == []


def test_generate_top_column_never_splits_a_token():
    r = cli("generate", "--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA, "--prompt", "rice", "-n", "3",
            "--top-k", "5", width=70)
    assert r.exit_code == 0, r.output
    for line in r.stdout.splitlines():
        cell = line.split("│")[-2] if line.count("│") >= 7 else ""
        if cell.strip():
            assert re.fullmatch(r" *'.*' \d\.\d{3} *", cell) or re.fullmatch(r' *".*" \d\.\d{3} *', cell), line


# ------------------------------------------------------------------------------------------ the documents


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt().parse(path.read_text(encoding="utf-8"))
    out = set()
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            text = tokens[i + 1].content.lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            out.add(slug)
    return out


def links(path: Path) -> list[str]:
    from markdown_it import MarkdownIt

    found = []

    def walk(tokens):
        for tok in tokens:
            if tok.type == "link_open":
                found.append(tok.attrs.get("href", ""))
            if tok.children:
                walk(tok.children)

    walk(MarkdownIt().parse(path.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_renders_and_its_links_resolve(path):
    from markdown_it import MarkdownIt

    text = path.read_text(encoding="utf-8")
    html = MarkdownIt().render(text)
    assert html.strip()
    assert text.count("```") % 2 == 0, "an unclosed code fence"
    for href in links(path):
        if re.match(r"^[a-z]+:", href):  # http(s), mailto: not checked (no network)
            continue
        target, _, anchor = href.partition("#")
        dest = (path.parent / target).resolve() if target else path
        assert dest.exists(), f"{path.name}: link to {href} points nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: {href}: no heading #{anchor} in {dest.name}"


def test_readme_is_a_first_read_and_links_the_reference():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    for doc in ("docs/checkpoints.md", "docs/serve.md", "docs/performance.md", "docs/layout.md", "docs/benchmarks.md"):
        assert f"({doc}" in text, doc
    assert "## Promises" in text
    for flag in ("--raw", "--show"):
        assert flag in text, flag
    assert ".[cpu,serve]" not in text


def test_generate_table_title_says_how_many_candidates_it_shows():
    r = cli("generate", "--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA, "--prompt", "rice", "-n", "1",
            "--top-k", "3", width=120)
    assert r.exit_code == 0, r.output
    assert "the 3 most likely" in r.stdout and "5 most likely" not in r.stdout
    r = cli("generate", "--model", builders.DEMO_BASE, "--lora", builders.DEMO_LORA, "--prompt", "rice", "-n", "1",
            "--top-k", "8", width=120)
    assert "the 5 most likely (all --top-k in --output/--json)" in r.stdout
