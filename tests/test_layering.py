"""The layering of src/: no import cycle among our modules (imports inside functions count), and no module
grows past the size a newcomer can read in one sitting without saying why."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = "paddle_scorer"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PKG).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from paddle_scorer import checkpoint` imports the submodule; `from x import name` the module x
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_counted(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from paddle_scorer import loader\n    import paddle_scorer.model.load_plan\n")
    assert imports_of("paddle_scorer.m", f, {"paddle_scorer.model.loader", "paddle_scorer.model.load_plan", "paddle_scorer"}) == {
        "paddle_scorer.model.loader", "paddle_scorer.model.load_plan"}


def test_no_import_cycle_among_our_modules():
    found = cycles(graph())
    assert not found, "import cycles (function-level imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_is_too_long_without_saying_why():
    """A module over MAX_LINES lines explains in its docstring why it is one module ("one module because ...")."""
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "one module because" not in doc.lower():
                long.append(f"{name} ({text.count(chr(10))} lines)")
    assert not long, "modules over ~600 lines without a reason in their docstring: " + ", ".join(long)


def test_docs_layout_names_every_module_and_only_real_ones():
    """docs/layout.md has one row per module: a new module must be described there, a removed one dropped."""
    import re

    doc = (SRC.parent / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`((?:cli/|serve/)?[a-z_*]+\.py)`", doc))
    files = {str(p.relative_to(SRC / PKG)) for p in (SRC / PKG).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    covered = {f for f in files if f in named or (f.startswith("cli/") and f.endswith("_cmd.py") and "cli/*_cmd.py" in named)}
    assert files - covered == set(), f"modules missing from docs/layout.md: {sorted(files - covered)}"
    stale = {n for n in named if "*" not in n and n not in files}
    assert not stale, f"docs/layout.md names modules that do not exist: {sorted(stale)}"
