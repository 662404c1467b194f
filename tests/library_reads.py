"""Which config fields a model library's forward reads, from its installed modeling sources (shared by the PaddleNLP
suite and tests/formers: each checks the library it has against paddle_scorer.compute.config_support)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

READ = re.compile(r"""(?:self\.)?config\.([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()|getattr\((?:self\.)?config,\s*["']([A-Za-z_0-9]+)["']"""
                  r"""|config\.get\(\s*["']([A-Za-z_0-9]+)["']""")


def fields_read(paths: list[Path]) -> set[str]:
    found = set()
    for p in paths:
        for m in READ.finditer(p.read_text()):
            found.add(next(g for g in m.groups() if g))
    return found


def library_sources() -> list[Path]:
    """The modeling code of the architectures the decoder computes, in whichever library is installed."""
    out = []
    if importlib.util.find_spec("paddlenlp"):
        root = Path(importlib.util.find_spec("paddlenlp").origin).parent / "transformers"
        out += [root / "llama" / "modeling.py", root / "qwen2" / "modeling.py"]
    if importlib.util.find_spec("paddleformers"):
        root = Path(importlib.util.find_spec("paddleformers").origin).parent
        out += [root / "transformers" / "llama" / "modeling.py", root / "transformers" / "ernie4_5" / "modeling.py",
                *(root / "nn" / n for n in ("mlp.py", "norm.py", "embedding.py", "lm_head.py", "linear.py"))]
    return out


def unclassified(known) -> set[str]:
    sources = library_sources()
    assert sources and all(p.is_file() for p in sources), sources
    return fields_read(sources) - set(known)
