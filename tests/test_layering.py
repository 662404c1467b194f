"""The layering of src/: the folders are the layers and a lower one never imports a higher one; no import cycle among
our modules (imports inside functions count); the CLI only parses, prints and calls tasks; no module or function grows
past the size a newcomer can read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = "paddle_scorer"
MAX_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_ROOT_MODULES = 8
# The layers, lowest first: a package may import its own modules and those of the packages before it.
LAYERS = ("process", "checkpoint", "model", "compute", "runs", "tasks", "serve", "cli")
ROOT = {"paddle_scorer", "paddle_scorer.errors", "paddle_scorer.jsonio"}  # below every layer (the facade: lazy)


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
    f.write_text("def f():\n    from paddle_scorer.model import loader\n    import paddle_scorer.model.load_plan\n")
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
    named = set(re.findall(r"`((?:[a-z0-9_]+/)*[a-z0-9_*]+\.py)`", doc))
    files = {str(p.relative_to(SRC / PKG)) for p in (SRC / PKG).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    covered = {f for f in files if f in named or (f.startswith("cli/") and f.endswith("_cmd.py") and "cli/*_cmd.py" in named)}
    assert files - covered == set(), f"modules missing from docs/layout.md: {sorted(files - covered)}"
    stale = {n for n in named if "*" not in n and n not in files and not n.endswith("__init__.py") and not n.startswith("tests/")}
    assert not stale, f"docs/layout.md names modules that do not exist: {sorted(stale)}"


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer to a higher one (and from the root modules into any layer but through the facade)."""
    bad = []
    for a, targets in g.items():
        la = layer_of(a)
        for b in targets:
            lb = layer_of(b)
            if lb is None:
                continue
            if la is None and a not in ("paddle_scorer", "paddle_scorer.__main__"):
                bad.append(f"{a} -> {b} (a root module imports a layer)")
            elif la is not None and LAYERS.index(lb) > LAYERS.index(la):
                bad.append(f"{a} -> {b} ({la} is below {lb})")
    return sorted(bad)


def test_the_layer_checker_finds_an_upward_import():
    g = {"paddle_scorer.model.loader": {"paddle_scorer.compute.gemm"}, "paddle_scorer.compute.gemm": set()}
    assert upward_imports(g) == ["paddle_scorer.model.loader -> paddle_scorer.compute.gemm (model is below compute)"]


def test_a_lower_layer_never_imports_a_higher_one():
    bad = upward_imports(graph())
    assert not bad, "imports that climb the layers " + " > ".join(LAYERS) + ": " + "; ".join(bad)


def test_every_module_is_in_a_layer_or_one_of_few_at_the_root():
    root = sorted(p.name for p in (SRC / PKG).glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root
    dirs = sorted(p.name for p in (SRC / PKG).iterdir() if p.is_dir() and p.name != "__pycache__")
    assert dirs == sorted(LAYERS), dirs


def test_the_cli_calls_only_tasks_serve_errors_and_the_public_api():
    allowed = ("paddle_scorer.cli", "paddle_scorer.tasks", "paddle_scorer.serve")
    bad = sorted(f"{a} -> {b}" for a, targets in graph().items() if a.startswith("paddle_scorer.cli.")
                 for b in targets if not b.startswith(allowed) and b not in ("paddle_scorer", "paddle_scorer.errors"))
    assert not bad, "the CLI reaches below tasks/serve: " + "; ".join(bad)


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name:line (n lines)`` of every function (nested ones included, methods too) longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append(f"{node.name}:{node.lineno} ({n} lines)")
    return out


def test_the_length_checker_finds_a_long_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def short():\n    return 1\n\n\nclass C:\n    def long(self):\n" + "        x = 1\n" * 85)
    assert long_functions(f, 80) == ["long:6 (86 lines)"]


def test_no_function_is_longer_than_a_screen_and_a_half():
    found = [f"{p.relative_to(SRC)} {x}" for p in sorted((SRC / PKG).rglob("*.py")) for x in long_functions(p)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(found)


def test_no_family_name_outside_its_own_module_and_the_registry():
    """Everything the code knows of a model family is in its module of model/families/ (and the registry that lists
    them): a family's name as a string anywhere else in src/ means family knowledge leaked into shared code.
    model/libraries.py names the libraries' own model classes (PaddleNLP's ``llama``/``qwen2`` model types and body
    prefixes, PaddleFormers' ``ernie4_5``): facts about a library, not a family."""
    from paddle_scorer.model.families import FAMILIES

    names = set(FAMILIES)
    allowed = {f"model/families/{n}.py" for n in names} | {"model/families/__init__.py", "model/libraries.py"}
    leaks = []
    for path in (SRC / PKG).rglob("*.py"):
        rel = str(path.relative_to(SRC / PKG))
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                leaks.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not leaks, "family names outside their modules: " + ", ".join(leaks)
